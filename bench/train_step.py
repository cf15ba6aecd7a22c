"""Train-step benchmark: deepseek_jax vs Hugging Face transformers' DeepseekV3ForCausalLM (issue #5).

One invocation runs, each in its own subprocess (so each framework gets the whole GPU and memory is freed
between them), then prints one table:
  ckpt   (CPU, in the background) our initial parameters -> a bf16 HF checkpoint, so both start identical
  micro  (optional) component timings: MoE routed-expert layer per implementation, attention per implementation
  ours   our jitted train_step (bf16 compute, fp32 params, AdamW from deepseek_jax.optim, donated state)
  hf     DeepseekV3ForCausalLM with the same dims, bf16 weights, torch.optim.AdamW(fused), same data and lr
  ours variants (optional, fewer steps)
Both train `--steps` steps on the same stream of byte-tokenized windows of the bundled Shakespeare corpus
(fixed seed); step times are the median after `--warmup` steps; the loss at the last step is compared.

  PYTHONPATH=. python3 bench/train_step.py --micro --out bench/results/h100.json        # H100
  PYTHONPATH=. python3 bench/train_step.py --small                                       # CPU smoke (< 1 min)

FLOPs: model FLOPs per token from deepseek_jax.flops.train_flops_per_token (6 x active matmul params + causal
attention counted at half the S x S square, no recomputation). The "full-attn" column counts the whole square
(the convention of the reference HF figure: 4.26 GFLOP/token for this model).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from profiling import _profile_steps, attribute_kernels, f32_gemms, print_table, run_micro  # noqa: E402

CORPUS = ROOT / "deepseek_jax" / "corpus" / "shakespeare.jsonl.gz"
PEAK_TFLOPS = 989.0   # H100 SXM dense bf16


# Configuration -------------------------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=str(ROOT / "configs" / "bench.yaml"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--small", action="store_true", help="CPU smoke preset: tiny config, batch 2 x 128, 6 steps")
  p.add_argument("--steps", type=int, default=None, help="training steps per system (default 50; small: 6)")
  p.add_argument("--warmup", type=int, default=None, help="steps excluded from the median (default 5)")
  p.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
  p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
  p.add_argument("--only", choices=("ours", "hf", "both"), default="both")
  p.add_argument("--moe-impl", default=None,
                 help="auto | mgpu | xla | ref | dense | capacity=CF (default: the config; grouped = auto)")
  p.add_argument("--attn-impl", default=None, help="xla | cudnn | cudnn-padded (default: the config)")
  p.add_argument("--remat", default=None, choices=("none", "full", "save_dots"))
  p.add_argument("--mgpu-blocks", default=None, help='JSON {"gmm": {...}, "tgmm": {...}} tile overrides')
  p.add_argument("--hf-dtype", default=None, choices=("bfloat16", "float32"), help="default bf16 (CPU: fp32)")
  p.add_argument("--hf-attn", default="auto", help="auto (flash_attention_2 if installed, else sdpa) | sdpa | eager")
  p.add_argument("--hf-experts", default=None, help="HF experts_implementation (default: the library's choice)")
  p.add_argument("--hf-autocast", type=int, default=0, help="1: HF weights in --hf-dtype, forward under bf16 autocast")
  p.add_argument("--hf-fp32-row", action="store_true",
                 help="also run HF with fp32 master weights + bf16 autocast (loss-parity check)")
  p.add_argument("--same-init", type=int, default=1, help="1: HF starts from our initial weights (via ckpt)")
  p.add_argument("--micro", action="store_true", help="also time the MoE and attention components")
  p.add_argument("--variants", default="", help='extra ours rows: "name:key=val,key=val;name2:..." '
                 "(keys: config keys, moe, attn, remat, steps, env.NAME)")
  p.add_argument("--variant-steps", type=int, default=15)
  p.add_argument("--profile", type=int, default=1, help="1: trace 2 steps of ours and summarize GPU kernels")
  p.add_argument("--deadline", type=float, default=0, help="seconds: skip workers that would start after it")
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our workers")
  p.add_argument("--out", default="", help="JSON results file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
  p.add_argument("--ckpt-dir", default="", help=argparse.SUPPRESS)
  p.add_argument("--tag", default="ours", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.small:
    args.config = str(ROOT / "configs" / "tiny.yaml")
    args.set = ["model.n_mtp_layers=0", "model.seq_aux_alpha=0.0", "train.bias_update_speed=0.0",
                "optim.warmup_steps=2", "optim.decay_steps=0", "optim.constant_steps=100"] + args.set
    args.batch = args.batch or 2
    args.seq_len = args.seq_len or 128
    args.steps = args.steps or 6
    args.warmup = 2 if args.warmup is None else args.warmup
    args.profile = 0
    args.variant_steps = min(args.variant_steps, 4)
  args.steps = args.steps or 50
  args.warmup = 5 if args.warmup is None else args.warmup
  return args


def build_config(args):
  from deepseek_jax.config import load_config
  overrides = list(args.set)
  if args.seq_len:
    overrides.append(f"data.seq_len={args.seq_len}")
  if args.batch:
    overrides.append(f"train.batch_size={args.batch}")
  if args.moe_impl and args.moe_impl.startswith("capacity="):
    overrides += ["model.moe_impl=grouped", f"model.capacity_factor={float(args.moe_impl.split('=')[1])}"]
  elif args.moe_impl == "dense":
    overrides.append("model.moe_impl=dense")
  elif args.moe_impl:
    overrides += ["model.moe_impl=grouped", "model.capacity_factor=0.0"]
  if args.attn_impl:
    overrides.append(f"model.attn_impl={'cudnn' if args.attn_impl.startswith('cudnn') else args.attn_impl}")
  if args.remat:
    overrides.append(f"model.remat={args.remat}")
  return load_config(args.config, overrides)


def worker_env(args) -> dict:
  """Environment knobs read by deepseek_jax at trace time (moe.GROUPED_MATMUL, the cuDNN MLA switch)."""
  env = {}
  if args.moe_impl in ("auto", "mgpu", "xla", "ref"):
    env["DEEPSEEK_JAX_GROUPED_MATMUL"] = args.moe_impl
  if args.attn_impl == "cudnn-padded":
    env["DEEPSEEK_JAX_CUDNN_MLA"] = "0"
  return env


def flops_per_token(model_cfg, seq_len: int) -> tuple[float, float]:
  """(causal-halved, full-square) training FLOPs per token."""
  from deepseek_jax import flops
  halved = flops.train_flops_per_token(model_cfg, seq_len, mtp=model_cfg.n_mtp_layers > 0)
  blocks = model_cfg.n_layers + model_cfg.n_mtp_layers
  return halved, halved + 3.0 * blocks * flops.attention_flops_per_token(model_cfg, seq_len)


# Data: byte-tokenized windows of the bundled corpus ------------------------------------------------------

def corpus_batches(n_steps: int, batch: int, seq_len: int, seed: int = 0):
  """n_steps batches of (inputs, targets) int32 [batch, seq_len]: windows of seq_len+1 bytes, fixed order."""
  import numpy as np
  with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
    text = "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
  toks = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  n_win = (toks.size - 1) // (seq_len + 1)
  order = np.random.default_rng(seed).permutation(n_win)
  out = []
  for s in range(n_steps):
    rows = [order[(s * batch + b) % n_win] for b in range(batch)]
    win = np.stack([toks[r * (seq_len + 1):(r + 1) * (seq_len + 1)] for r in rows])
    out.append((win[:, :-1].copy(), win[:, 1:].copy()))
  return out


def _median_after(times, warmup):
  t = times[warmup:] if len(times) > warmup else times
  return statistics.median(t)


# Worker: ours --------------------------------------------------------------------------------------------

def run_ours(args, cfg) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from deepseek_jax import moe, trainer
  if args.mgpu_blocks:
    blocks = json.loads(args.mgpu_blocks)
    moe.MGPU_GMM_BLOCKS.update(blocks.get("gmm", {}))
    moe.MGPU_TGMM_BLOCKS.update(blocks.get("tgmm", {}))
  dev = jax.devices()[0]
  B, S = cfg.train.batch_size, cfg.data.seq_len
  res = {"system": "ours", "device": dev.device_kind, "jax": jax.__version__, "batch": B, "seq_len": S,
         "model": dataclasses.asdict(cfg.model), "env": {k: v for k, v in os.environ.items()
                                                         if k.startswith(("DEEPSEEK_JAX", "XLA_"))}}
  res["grouped_matmul"] = (moe.grouped_matmul_impl(cfg.model.dtype, cfg.model.dim, cfg.model.moe_inter_dim)
                           if cfg.model.capacity_factor <= 0 and cfg.model.moe_impl == "grouped" else "-")
  res["mgpu_blocks"] = {"gmm": dict(moe.MGPU_GMM_BLOCKS), "tgmm": dict(moe.MGPU_TGMM_BLOCKS)}
  t0 = time.perf_counter()
  graphdef, state, tx = trainer.init_state(cfg)
  jax.block_until_ready(state)
  res["init_s"] = time.perf_counter() - t0
  res["embed_checksum"] = float(jnp.sum(jnp.abs(state.params["embed"])))
  step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, cfg=cfg), donate_argnums=0)
  data = corpus_batches(args.steps, B, S)
  pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))

  # Unpacked rows: segment_ids=None gives the plain causal mask (cuDNN is_causal, as HF). MTP needs segment ids
  # (its targets are masked across documents), so MTP configs get all-ones ids and a dense [B,1,S,S] mask.
  seg = jnp.ones((B, S), jnp.int32) if cfg.model.n_mtp_layers else None

  def to_batch(inp, tgt):
    return {"inputs": jnp.asarray(inp), "targets": jnp.asarray(tgt), "positions": jnp.asarray(pos),
            "loss_mask": jnp.ones((B, S), bool), "segment_ids": seg}
  batches = [to_batch(*b) for b in data]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  res["compile_s"] = time.perf_counter() - t0
  times, losses, dropped = [], [], []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batches[i])
    losses.append(float(m["loss"]))       # waits for the whole step (one executable)
    times.append(time.perf_counter() - t0)
    dropped.append(int(m["dropped"]))
    if not math.isfinite(losses[-1]):
      break
  res.update(step_times=times, losses=losses, median_step_s=_median_after(times, args.warmup))
  n_assign = B * S * cfg.model.n_activated_experts * cfg.model.n_moe_layers
  res["dropped_frac"] = sum(dropped) / max(1, n_assign * len(dropped))
  # Pipelined window (host does not wait between steps, as in train.py).
  n_pipe = min(10, args.steps)
  t0 = time.perf_counter()
  for i in range(n_pipe):
    state, m = compiled(state, batches[i])
  jax.block_until_ready(m["loss"])
  res["pipelined_step_s"] = (time.perf_counter() - t0) / n_pipe
  stats = dev.memory_stats() or {}
  res["peak_bytes"] = stats.get("peak_bytes_in_use")
  res["bytes_limit"] = stats.get("bytes_limit")
  if args.profile and dev.platform == "gpu":
    t0 = time.perf_counter()
    state, res["profile"] = _profile_steps(compiled, state, batches)
    try:
      hlo = compiled.as_text()
      names = [k_ for k_, _ in res["profile"].get("top_kernels_ms_per_step", [])]
      res["profile"]["attribution"] = attribute_kernels(hlo, names)
      res["profile"]["f32_gemms"] = f32_gemms(hlo)
    except Exception as e:  # noqa: BLE001
      res["profile"]["attribution_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["profile_s"] = time.perf_counter() - t0
  # Optimizer update alone (clip + AdamW + apply) on the full parameter tree.
  try:
    import optax

    def opt_only(params, opt_state):
      grads = jax.tree.map(lambda p: p * 1e-3, params)
      upd, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, upd), opt_state
    f = jax.jit(opt_only, donate_argnums=(0, 1))
    p_, o_ = state.params, state.opt_state
    state = None
    ts = []
    for _ in range(6):
      t0 = time.perf_counter()
      p_, o_ = f(p_, o_)
      jax.block_until_ready(p_)
      ts.append(time.perf_counter() - t0)
    res["optimizer_only_s"] = statistics.median(ts[1:])
  except Exception as e:  # noqa: BLE001
    res["optimizer_only_error"] = repr(e)[:300]
  return res


def run_hf(args, cfg) -> dict:
  import importlib.util

  import torch
  import torch.nn.functional as F
  import transformers
  from deepseek_jax import convert
  from deepseek_jax.optim import make_schedule   # JAX_PLATFORMS=cpu in this process: schedule values only

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  dtype = getattr(torch, args.hf_dtype or ("bfloat16" if cuda else "float32"))
  B, S, m = cfg.train.batch_size, cfg.data.seq_len, cfg.model
  hf_dict = convert.config_to_hf(m)
  hf_dict = {k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")}
  attn = args.hf_attn
  if attn == "auto":
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
  hf_cfg = transformers.DeepseekV3Config(**hf_dict, attn_implementation=attn)
  if args.hf_experts:
    hf_cfg._experts_implementation = args.hf_experts
  res = {"system": "hf", "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
         "autocast_bf16": bool(args.hf_autocast),
         "transformers": transformers.__version__, "dtype": str(dtype), "attn_implementation": attn,
         "batch": B, "seq_len": S}
  torch.manual_seed(0)
  t0 = time.perf_counter()
  prev = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  with torch.device(device):
    model = transformers.DeepseekV3ForCausalLM(hf_cfg)
  torch.set_default_dtype(prev)
  res["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
  if args.ckpt_dir:
    from safetensors.torch import load_file
    sd = load_file(str(pathlib.Path(args.ckpt_dir) / "model.safetensors"), device=device)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    res["init"] = f"ours ({dtype} checkpoint)" if not (missing or unexpected) else "PARTIAL"
    res["missing"], res["unexpected"] = missing[:10], unexpected[:10]
    res["embed_checksum"] = float(model.model.embed_tokens.weight.detach().float().abs().sum())
    del sd
  else:
    res["init"] = "HF default init"
  res["init_s"] = time.perf_counter() - t0
  model.train()
  o = cfg.optim
  decay, no_decay = [], []
  for n, p in model.named_parameters():
    (decay if p.ndim >= 2 and "norm" not in n and "bias" not in n else no_decay).append(p)
  groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
  try:
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, fused=cuda)
    res["fused_adamw"] = cuda
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    res["fused_adamw"] = False
  sched = make_schedule(o)
  lrs = [float(sched(i)) for i in range(args.steps)]
  params = [p for g in groups for p in g["params"]]
  data = corpus_batches(args.steps, B, S)
  batches = [(torch.from_numpy(a).long().to(device), torch.from_numpy(b).long().to(device)) for a, b in data]

  def sync():
    if cuda:
      torch.cuda.synchronize()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times, losses = [], []
  for i in range(args.steps):
    sync()
    t0 = time.perf_counter()
    for g in opt.param_groups:
      g["lr"] = lrs[i]
    inp, tgt = batches[i]
    if args.hf_autocast:
      with torch.autocast(device_type=device, dtype=torch.bfloat16):
        logits = model(input_ids=inp, use_cache=False).logits
    else:
      logits = model(input_ids=inp, use_cache=False).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.view(-1))
    loss.backward()
    if o.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    del logits
    lv = float(loss.detach())
    sync()
    times.append(time.perf_counter() - t0)
    losses.append(lv)
    if not math.isfinite(lv):
      break
  res.update(step_times=times, losses=losses, median_step_s=_median_after(times, args.warmup))
  res["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
  return res


# Worker: checkpoint of our initial parameters for HF (CPU) -----------------------------------------------

def run_ckpt(args, cfg) -> dict:
  import jax
  import numpy as np
  from deepseek_jax import convert
  from deepseek_jax import model as model_lib
  t0 = time.perf_counter()
  mdl = model_lib.init_model(cfg.model, cfg.train.seed)
  params = jax.tree.map(np.asarray, model_lib.to_pure_dict(mdl))
  del mdl
  out = pathlib.Path(args.ckpt_dir)
  hf_dtype = args.hf_dtype or ("float32" if args.small else "bfloat16")
  convert.save_hf_checkpoint(cfg.model, params, out, fused_experts=True, dtype=hf_dtype, max_shard_bytes=1 << 42)
  return {"ckpt_s": time.perf_counter() - t0, "dtype": hf_dtype,
          "embed_checksum": float(np.abs(params["embed"]).sum(dtype=np.float64))}


# Worker: component micro-benchmarks (GPU) ----------------------------------------------------------------

# Orchestrator --------------------------------------------------------------------------------------------

WORKERS = {"ours": run_ours, "hf": run_hf, "ckpt": run_ckpt, "micro": run_micro}


def worker_main(args):
  if args.worker in ("hf", "ckpt"):
    os.environ["JAX_PLATFORMS"] = "cpu"   # these never touch the GPU through JAX
  cfg = build_config(args)
  try:
    res = WORKERS[args.worker](args, cfg)
  except Exception as e:  # noqa: BLE001
    res = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
  pathlib.Path(args.worker_out).write_text(json.dumps(res, default=str))
  return 0 if "error" not in res else 1


def _spawn(argv_base, worker, extra=(), env=None, background=False, timeout=None):
  fd, out = tempfile.mkstemp(prefix=f"bench_{worker}_", suffix=".json")
  os.close(fd)
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve())] + argv_base + list(extra) + \
      ["--worker", worker, "--worker-out", out]
  e = dict(os.environ)
  e.setdefault("PYTHONUNBUFFERED", "1")
  e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
  e.update(env or {})
  proc = subprocess.Popen(cmd, env=e)
  proc.t_start = time.perf_counter()
  if background:
    return proc, out
  return _collect(proc, out, timeout)


def _collect(proc, out, timeout=None):
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return {"error": f"timed out after {timeout} s"}
  try:
    res = json.loads(pathlib.Path(out).read_text())
  except (OSError, ValueError):
    res = {"error": f"worker exited with {proc.returncode} and no result"}
  res["worker_wall_s"] = time.perf_counter() - proc.t_start
  print(f"   ({res['worker_wall_s']:.0f} s{', ERROR ' + str(res['error'])[:300] if res.get('error') else ''})",
        flush=True)
  return res


def _strip_orchestrator_args(argv):
  """Arguments passed through to workers (orchestrator-only ones removed)."""
  out, skip = [], False
  drop_with_value = {"--variants", "--out", "--deadline", "--only", "--variant-steps"}
  if "--hf-fp32-row" in argv:
    argv = [a for a in argv if a != "--hf-fp32-row"]
  for a in argv:
    if skip:
      skip = False
      continue
    key = a.split("=", 1)[0]
    if key in drop_with_value:
      skip = "=" not in a
      continue
    if key == "--micro":
      continue
    out.append(a)
  return out


def parse_variants(spec: str):
  variants = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, _, kvs = part.partition(":")
    extra, env, steps = [], {}, None
    for kv in filter(None, (x.strip() for x in kvs.split(","))):
      key, _, val = kv.partition("=")
      if key.startswith("env."):
        env[key[4:]] = val
      elif key == "steps":
        steps = int(val)
      elif key in ("moe", "attn", "remat"):
        extra += [{"moe": "--moe-impl", "attn": "--attn-impl", "remat": "--remat"}[key], val]
      elif key == "xla_flags":
        env["XLA_FLAGS"] = val.replace("+", " ")
      else:
        extra += ["--set", f"{key}={val}"]
    variants.append((name.strip(), extra, env, steps))
  return variants


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.worker:
    return worker_main(args)
  t_start = time.perf_counter()
  cfg = build_config(args)
  base = _strip_orchestrator_args(argv)
  results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv, "rows": {}, "config": args.config}
  jax_env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")}
  if args.xla_flags:
    jax_env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  jax_env.update(worker_env(args))

  def save():
    if args.out:
      pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))

  def time_left():
    return args.deadline - (time.perf_counter() - t_start) if args.deadline else float("inf")

  want_hf = args.only in ("hf", "both")
  want_ours = args.only in ("ours", "both")
  ckpt_proc = None
  ckpt_dir = ""
  if want_hf and args.same_init:
    ckpt_dir = tempfile.mkdtemp(prefix="bench_init_")
    ckpt_proc = _spawn(base, "ckpt", ["--ckpt-dir", ckpt_dir], env={"JAX_PLATFORMS": "cpu"}, background=True)
  if args.micro:
    print("== micro-benchmarks", flush=True)
    results["micro"] = _spawn(base, "micro", env=jax_env, timeout=300)
    save()
    mic = results["micro"]
    if args.moe_impl is None and not mic.get("error"):
      if mic.get("mgpu_ok"):
        base += ["--mgpu-blocks", json.dumps(mic["mgpu_best"])]
        if cfg.model.capacity_factor <= 0 and cfg.model.moe_impl == "grouped":
          jax_env["DEEPSEEK_JAX_GROUPED_MATMUL"] = "mgpu"
      elif cfg.model.capacity_factor <= 0 and cfg.model.moe_impl == "grouped":
        jax_env["DEEPSEEK_JAX_GROUPED_MATMUL"] = "xla"
        results["note_moe"] = "mgpu failed its micro check: ours uses lax.ragged_dot"
    if args.attn_impl is None and not mic.get("error") and not mic.get("cudnn_mla_ok"):
      jax_env["DEEPSEEK_JAX_CUDNN_MLA"] = "0"
      results["note_attn"] = "private cuDNN MLA failed its micro check: padded V"
  if want_ours:
    print("== ours", flush=True)
    results["rows"]["ours"] = _spawn(base, "ours", env=jax_env, timeout=900)
    err = str(results["rows"]["ours"].get("error", ""))
    if ("RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower()) and cfg.model.remat == "none":
      print("== ours OOM with remat=none: retrying with remat=save_dots", flush=True)
      results["rows"]["ours[remat=none, OOM]"] = results["rows"].pop("ours")
      base += ["--remat", "save_dots"]
      results["rows"]["ours"] = _spawn(base, "ours", env=jax_env, timeout=900)
    save()
  if want_hf:
    if ckpt_proc is not None:
      ck = _collect(*ckpt_proc, timeout=900)
      results["ckpt"] = ck
      if ck.get("error"):
        ckpt_dir = ""
    print("== hf", flush=True)
    results["rows"]["hf"] = _spawn(base, "hf", ["--ckpt-dir", ckpt_dir] if ckpt_dir else [], timeout=900)
    save()
    if args.hf_fp32_row and time_left() > 100:
      print("== hf[fp32 master + bf16 autocast]", flush=True)
      results["rows"]["hf[fp32+autocast]"] = _spawn(
          base, "hf", (["--ckpt-dir", ckpt_dir] if ckpt_dir else []) + ["--hf-dtype", "float32", "--hf-autocast", "1"],
          timeout=max(60, min(600, time_left())))
      save()
    if ckpt_dir:
      import shutil
      shutil.rmtree(ckpt_dir, ignore_errors=True)
  if want_ours:
    for name, extra, env, steps in parse_variants(args.variants):
      if time_left() < 100:
        results["rows"][f"ours[{name}]"] = {"error": "skipped: deadline"}
        continue
      print(f"== ours[{name}]", flush=True)
      results["rows"][f"ours[{name}]"] = _spawn(base, "ours", extra + ["--steps", str(steps or args.variant_steps),
                                                                      "--profile", "0"],
                                               env={**jax_env, **env}, timeout=max(60, min(600, time_left())))
      save()
  results["flops_per_token"] = dict(zip(("causal_halved", "full_square"),
                                        flops_per_token(cfg.model, cfg.data.seq_len)))
  results["wall_s"] = time.perf_counter() - t_start
  save()
  print_table(results, cfg, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
