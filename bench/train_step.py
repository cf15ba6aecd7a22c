"""The training step train.py runs, timed: ours against Hugging Face transformers, and train.py's own loop.

Systems (--systems; each runs in its own subprocess, so each has the whole accelerator and its memory):
  ours       Run(cfg).train_step exactly as deepseek_jax/loop.py calls it: under the run's mesh, batches placed
             by run.device_batch, donated state, the loop's metrics. Timed over --steps steps dispatched back to
             back (as the loop dispatches them), after --warmup steps that include the compilation.
  hf         transformers' DeepseekV3ForCausalLM built from the same config (convert.config_to_hf) and ours'
             initial weights, on the same batches: bf16 weights and AdamW state on GPU (float32 on CPU),
             torch.optim.AdamW (fused on GPU) with ours' decay mask, clipping and per-step learning rate, sdpa
             attention, the loss over the same loss mask. Rows pass their per-document position ids, from which
             transformers builds the document mask itself (its packed-sequence path): the same model as ours.
  hf_causal  the same with positions 0..S-1 in every row: one causal mask per row (documents see each other),
             Hugging Face's fastest attention kernel; the setting of the reference HF figure.
  loop       deepseek_jax.loop.train (train.py without its command line) for warmup + steps steps: its own
             tokens/s and MFU from its metric records after the first (which holds the compilation). It reads
             its batches through Grain, as train.py does.

Batches (--data): "real" = the first batches train.py draws (deepseek_jax.data, needs Grain); "synthetic" =
random documents packed in numpy (segment ids, positions, loss mask); "auto" = real where Grain is installed.
Every system but the loop gets these batches; the loop draws the real ones itself. train.log_every is set to
--warmup, so the loop's first record covers exactly the warm-up steps. Throughput counts batch_size x seq_len
tokens a step, as the loop does; MFU = flops.train_flops_per_token x tokens/s / (train.peak_tflops x devices).

  PYTHONPATH=. python -m bench.train_step --out $OUT/train_step.json                  # ours vs HF, bench config
  PYTHONPATH=. python -m bench.train_step --systems ours,loop --out $OUT/loop.json    # train.py vs the bench
  PYTHONPATH=. python -m bench.train_step --smoke                                      # CPU: tiny config, 3 steps
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import common
from deepseek_jax import flops
from deepseek_jax.config import Config
from deepseek_jax.loss import Batch

SYSTEMS = ("ours", "hf", "hf_causal", "loop")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.config_args(p, "train_step.json")
  p.add_argument("--systems", default=None,
                 help=f"comma-separated, run in this order, from {','.join(SYSTEMS)} (default ours,hf; smoke: "
                      "ours, then hf if transformers is installed, loop if Grain is)")
  p.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps, compilation included (default 5; smoke 1)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default 45; smoke 2)")
  p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.warmup = (1 if args.smoke else 5) if args.warmup is None else args.warmup
  args.steps = (2 if args.smoke else 45) if args.steps is None else args.steps
  if args.systems is None:
    have = importlib.util.find_spec
    args.systems = ("ours" + (",hf" if have("transformers") and have("torch") else "")
                    + (",loop" if have("grain") else "")) if args.smoke else "ours,hf"
  args.systems = args.systems.split(",")
  if args.warmup < 1 or args.steps < 1:
    p.error(f"--warmup {args.warmup} and --steps {args.steps} must be >= 1 (the first step compiles)")
  if unknown := [s for s in args.systems if s not in SYSTEMS]:
    p.error(f"--systems: unknown {unknown}; choose from {SYSTEMS}")
  return args


def bench_config(args) -> Config:
  """The config every system runs: the file and --set, plus what makes the loop comparable (no evals, no
  checkpoints, warmup + steps steps, one metrics record per warm-up length)."""
  return common.bench_config(args, [f"train.steps={args.warmup + args.steps}", f"train.log_every={args.warmup}",
                                    "train.eval_every=0", "train.ckpt_dir=", "train.log_file="])


def throughput(cfg: Config, step_s: float, n_devices: int) -> dict:
  """tokens/s and MFU as loop.MetricsLog computes them."""
  tokens_per_s = cfg.train.batch_size * cfg.data.seq_len / step_s
  peak = cfg.train.peak_tflops * 1e12 * n_devices
  return {"step_s": step_s, "tokens_per_s": tokens_per_s,
          "mfu": flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s / peak}


def save_batches(batches: list[dict], workdir: pathlib.Path) -> None:
  np.savez(workdir / "batches.npz", **{f: np.stack([b[f] for b in batches]) for f in Batch._fields})


def load_batches(workdir: pathlib.Path) -> list[dict]:
  with np.load(workdir / "batches.npz") as z:
    stacked = {f: z[f] for f in Batch._fields}
  return [{f: stacked[f][i] for f in Batch._fields} for i in range(len(stacked["inputs"]))]


# ours -------------------------------------------------------------------------------------------------------

def run_ours(cfg: Config, args, workdir: pathlib.Path) -> dict:
  import jax

  from deepseek_jax.run import Run
  jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))   # shared with the loop worker
  run = Run(cfg)
  state = run.init_state()
  if any(s.startswith("hf") for s in args.systems):
    save_hf_init(run, state, workdir / "hf_init")
  batches = load_batches(workdir)
  metrics, t = [], [time.perf_counter()]
  for i, b in enumerate(batches):
    if i == args.warmup:
      jax.block_until_ready((state, metrics[-1]))
      t.append(time.perf_counter())
    state, m = run.train_step(state, run.device_batch(b))
    metrics.append(m)
  jax.block_until_ready((state, metrics[-1]))
  t.append(time.perf_counter())
  metrics = [{k: np.asarray(v).tolist() for k, v in jax.device_get(m).items()} for m in metrics]
  stats = jax.devices()[0].memory_stats() or {}
  return {**common.device_info(), **throughput(cfg, (t[2] - t[1]) / args.steps, jax.device_count()),
          "warmup_s": t[1] - t[0], "mesh": common.mesh_name(run.mesh), "gmm_impl": run.cfg.model.gmm_impl,
          "attn_impl": cfg.model.attn_impl, "losses": [m["loss"] for m in metrics], "metrics": metrics[-1],
          "peak_bytes": stats.get("peak_bytes_in_use")}


def save_hf_init(run, state, path: pathlib.Path) -> None:
  """Ours' initial parameters and router biases as a Hugging Face checkpoint (bf16 on GPU, else float32)."""
  import jax

  from deepseek_jax import convert
  from deepseek_jax import model as model_lib

  def merge(a: dict, b: dict) -> dict:
    return {k: merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in a | b}
  params = model_lib.unstack_layers(run.cfg.model, merge(jax.device_get(state.params), jax.device_get(state.bias)))
  dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  convert.save_hf_checkpoint(run.cfg.model, params, path, fused_experts=True, dtype=dtype, max_shard_bytes=1 << 40)


# Hugging Face -----------------------------------------------------------------------------------------------

def run_hf(cfg: Config, args, workdir: pathlib.Path, causal: bool) -> dict:
  import torch
  import transformers

  from deepseek_jax.optim import make_schedule
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  model, init = hf_model(cfg, workdir / "hf_init", device)
  opt = hf_adamw(model, cfg.optim, fused=cuda)
  schedule = make_schedule(cfg.optim)
  lrs = [float(schedule(i)) for i in range(args.warmup + args.steps)]
  batches = [hf_batch(b, device, causal) for b in load_batches(workdir)]
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  losses, t = [], [time.perf_counter()]
  for i, b in enumerate(batches):
    if i == args.warmup:
      sync()
      t.append(time.perf_counter())
    losses.append(hf_step(model, opt, b, lrs[i], cfg.optim.clip_norm))
  sync()
  t.append(time.perf_counter())
  return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
          "transformers": transformers.__version__, "dtype": str(next(model.parameters()).dtype), "init": init,
          "attention": "causal rows" if causal else "documents (position ids)",
          **throughput(cfg, (t[2] - t[1]) / args.steps, 1), "warmup_s": t[1] - t[0],
          "losses": [float(x) for x in losses], "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def hf_model(cfg: Config, init_dir: pathlib.Path, device: str):
  """(model, where its weights come from): ours' initial weights if the ours worker wrote them, else HF's init."""
  import torch
  import transformers

  from deepseek_jax import convert
  dtype = torch.bfloat16 if device == "cuda" else torch.float32
  kw = {"dtype": dtype, "attn_implementation": "sdpa"}
  if init_dir.exists():
    model, init = transformers.AutoModelForCausalLM.from_pretrained(init_dir, **kw), "ours (same initial weights)"
  else:
    hf = convert.config_to_hf(cfg.model)
    hf_cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(cfg.train.seed)
    model, init = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kw), "transformers' own (no ours worker)"
  return model.to(device).train(), init


def hf_adamw(model, o, fused: bool):
  """torch AdamW with ours' hyperparameters and decay mask (optim.decay_mask: ndim >= 2, no norms or biases)."""
  import torch

  from deepseek_jax.optim import NO_DECAY_NAMES

  def decays(name, p):
    return p.ndim >= 2 and not any(w in name.lower() for w in NO_DECAY_NAMES)
  named = list(model.named_parameters())
  groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": o.weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, fused=fused)


def hf_batch(b: dict, device: str, causal: bool) -> dict:
  import torch

  def t(x):
    return torch.from_numpy(np.ascontiguousarray(x)).long().to(device)
  B, S = b["inputs"].shape
  positions = np.broadcast_to(np.arange(S), (B, S)) if causal else b["positions"]
  return {"input_ids": t(b["inputs"]), "position_ids": t(positions), "targets": t(b["targets"]),
          "mask": t(b["loss_mask"]).float()}


def hf_step(model, opt, b: dict, lr: float, clip_norm: float):
  """One AdamW step on the masked mean cross entropy (float32 logits); returns the loss without syncing."""
  import torch
  for group in opt.param_groups:
    group["lr"] = lr
  logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
  ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), reduction="none")
  loss = (ce * b["mask"].flatten()).sum() / b["mask"].sum().clamp(min=1.0)
  loss.backward()
  if clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss.detach()


# train.py's loop --------------------------------------------------------------------------------------------

def run_loop(cfg: Config, args, workdir: pathlib.Path) -> dict:
  import jax

  from deepseek_jax.loop import train
  jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  t0 = time.perf_counter()
  _, history = train(cfg)
  wall_s = time.perf_counter() - t0
  logs = [h for h in history if "tokens_per_s" in h]
  if len(logs) < 2:
    raise ValueError(f"the loop wrote {len(logs)} metric records; 2 are needed (--steps >= 1)")
  # Each record's rates cover the steps since the one before: the run's rate is their step-weighted harmonic mean.
  n = [b["step"] - a["step"] for a, b in zip(logs, logs[1:])]
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  out = throughput(cfg, sum(k * tokens_per_step / r["tokens_per_s"] for k, r in zip(n, logs[1:])) / sum(n),
                   jax.device_count())
  loop_mfu = sum(n) / sum(k / r["mfu"] for k, r in zip(n, logs[1:]))
  if not np.isclose(out["mfu"], loop_mfu, rtol=1e-6):
    raise AssertionError(f"the loop's MFU {loop_mfu} differs from the bench's formula {out['mfu']}")
  return {**common.device_info(), **out, "wall_s": wall_s, "records": logs,
          "warmup_s": logs[0]["step"] * tokens_per_step / logs[0]["tokens_per_s"],
          "losses_at": {r["step"]: r["loss"] for r in logs}}


WORKERS = {"ours": run_ours, "loop": run_loop,
           "hf": lambda cfg, args, d: run_hf(cfg, args, d, causal=False),
           "hf_causal": lambda cfg, args, d: run_hf(cfg, args, d, causal=True)}


def worker_main(args) -> None:
  workdir = pathlib.Path(args.workdir)
  try:
    result = {"system": args.worker, **WORKERS[args.worker](bench_config(args), args, workdir)}
  except Exception as e:   # recorded for the table, then re-raised with its traceback
    (workdir / f"{args.worker}.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}))
    raise
  (workdir / f"{args.worker}.json").write_text(json.dumps(result, default=str))


# Orchestration and report -----------------------------------------------------------------------------------

def spawn(system: str, argv: list[str], workdir: pathlib.Path) -> dict:
  """Runs one system's worker in a fresh Python process (the Hugging Face ones with JAX kept off the GPU)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu") if system.startswith("hf") else dict(os.environ)
  cmd = [sys.executable, "-m", "bench.train_step", *argv, "--worker", system, "--workdir", str(workdir)]
  print(f"== {system}", flush=True)
  t0 = time.perf_counter()
  rc = subprocess.run(cmd, cwd=common.ROOT, env=env).returncode
  out = workdir / f"{system}.json"
  result = json.loads(out.read_text()) if out.exists() else {"error": f"worker exited with status {rc}"}
  return {**result, "worker_s": time.perf_counter() - t0}


def compare(results: dict) -> dict:
  """Ratios of tokens/s and loss agreement between the systems that ran."""
  s = {k: v for k, v in results["systems"].items() if "tokens_per_s" in v}
  out = {}
  ours = s.get("ours")
  for other in ("hf", "hf_causal"):
    if ours and other in s:
      out[f"ours_over_{other}"] = ours["tokens_per_s"] / s[other]["tokens_per_s"]
      out[f"loss_rel_diff_{other}"] = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], s[other]["losses"])]
  if ours and "loop" in s:
    out["loop_over_ours"] = s["loop"]["tokens_per_s"] / ours["tokens_per_s"]
    out["loop_within_3pct"] = out["loop_over_ours"] >= 0.97
    if results["data"].startswith("real"):   # the same batches: the loop's logged losses are ours'
      out["loop_loss_max_abs_diff"] = max(abs(loss - ours["losses"][int(step) - 1])
                                          for step, loss in s["loop"]["losses_at"].items())
  return out


def report(results: dict) -> str:
  rows = []
  for name, r in results["systems"].items():
    losses = r.get("losses") or list(r.get("losses_at", {}).values())
    rows.append({**r, "name": name, "loss_first": losses[0] if losses else None,
                 "loss_last": losses[-1] if losses else None, "ms": r["step_s"] * 1e3 if "step_s" in r else None,
                 "peak_gib": r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None,
                 "notes": r.get("error") or _notes(r)})
  head = (f"train step: {results['config']} {' '.join(results['overrides'])}\n"
          f"batch {results['batch']} x {results['seq_len']}, data {results['data']}, {results['warmup']} warm-up + "
          f"{results['steps']} timed steps; {results['gflops_per_token']:.3f} GFLOP/token "
          f"(flops.train_flops_per_token), MFU vs {results['peak_tflops']:g} TFLOP/s per device")
  cols = [("name", "system", "s"), ("device", "device", "s"), ("ms", "ms/step", ".1f"),
          ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"), ("loss_first", "loss first", ".4f"),
          ("loss_last", "loss last", ".4f"), ("peak_gib", "peak GiB", ".1f"), ("notes", "notes", "s")]
  cmp = "; ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in results["compare"].items() if not isinstance(v, list))
  return f"{head}\n{common.table(rows, cols)}\n{cmp}"


def _notes(r: dict) -> str:
  parts = [f"{k} {r[k]}" for k in ("mesh", "gmm_impl", "attn_impl", "attention", "init", "dtype") if k in r]
  if "warmup_s" in r:
    parts.append(f"warm-up {r['warmup_s']:.0f} s")
  return ", ".join(parts)


def main(argv=None) -> dict | None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.worker:
    return worker_main(args)
  cfg = bench_config(args)
  results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv, "config": common.config_path(args),
             "overrides": args.set, "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
             "warmup": args.warmup, "steps": args.steps,
             "gflops_per_token": flops.train_flops_per_token(cfg.model, cfg.data.seq_len) / 1e9,
             "peak_tflops": cfg.train.peak_tflops, "systems": {}}
  with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
    batches, results["data"] = common.packed_batches(cfg, args.warmup + args.steps, args.data)
    save_batches(batches, pathlib.Path(tmp))
    for system in args.systems:
      results["systems"][system] = spawn(system, argv, pathlib.Path(tmp))
  results["compare"] = compare(results)
  print(report(results))
  common.write_json(args.out, results)
  return results


if __name__ == "__main__":
  main()
