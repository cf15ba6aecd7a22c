"""Decode benchmark: deepseek_jax.generate vs Hugging Face `generate` (issue #10).

One invocation runs, each in its own subprocess (each framework gets the whole GPU; memory is freed between):
  ckpt  (CPU) our random-init model (configs/bench.yaml + one MTP module, seed 0) -> a bf16 HF checkpoint
  ours  that checkpoint through convert.load_hf_checkpoint -> generate.Generator: batch 1, 16, 64 x prompt 1024
        x 256 new tokens, greedy; then plain vs MTP speculative decoding at batch 1 and 16
  hf    transformers DeepseekV3ForCausalLM.from_pretrained(that checkpoint), bf16, sdpa, `generate` greedy
Prompts are the same random tokens on both sides; EOS is off (every run makes exactly 256 tokens).

  PYTHONPATH=. python3 bench/decode.py --out bench/results/h100-decode.json      # H100 (~10 min)
  PYTHONPATH=. python3 bench/decode.py --smoke                                    # CPU smoke, < 60 s

Timing: each (batch, system) runs once to compile / warm up, then `--reps` times; the fastest repetition.
A run of 256 tokens and a run of 1 token (prefill + first token; ours reuses the same compiled program, see
Generator.run's `capacity`) give decode ms/token = (t_256 - t_1) / 255 and end-to-end tokens/s = B * 256 / t_256.

Roofline: HBM bytes one decode step reads / step time / bandwidth (3.35 TB/s, H100 SXM). Bytes = the weights the
step touches (bf16; routed experts counted as the expected number of distinct experts hit by B tokens under
uniform routing, E * (1 - (1 - k/E)^B) per MoE layer; embedding rows only; the float32 router gate) + the whole
allocated cache (our absorbed attention reads all P + 256 slots every step). MTP speed-up: with random weights
the drafts are rarely right, so besides the measured speed-up we report the projection at 85% acceptance
(DeepSeek-V3's reported second-token acceptance): (1 + 0.85) x plain ms/token / speculative ms/step. Pass
`--mtp-checkpoint RUN_DIR` (a train.py run with an MTP module) to measure acceptance on trained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

HBM_BYTES_PER_S = 3.35e12   # H100 SXM


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=str(ROOT / "configs" / "bench.yaml"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--smoke", action="store_true", help="CPU: tiny 2-layer model, prompt 16, 48 tokens, no HF")
  p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16,64; smoke 1,4)")
  p.add_argument("--mtp-batches", default=None, help="batch sizes of the MTP rows (default 1,16; smoke 2)")
  p.add_argument("--prompt-len", type=int, default=None, help="default 1024 (smoke 16)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 256 (smoke 48)")
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--only", choices=("ours", "hf", "both"), default="both")
  p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation")
  p.add_argument("--mtp-checkpoint", default="", help="train.py run dir with an MTP module: MTP rows on it")
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our worker")
  p.add_argument("--out", default="", help="JSON results file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
  p.add_argument("--hf-dir", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  ints = lambda s: [int(x) for x in s.split(",") if x]
  args.batches = ints(args.batches or ("1,4" if args.smoke else "1,16,64"))
  args.mtp_batches = ints(args.mtp_batches or ("2" if args.smoke else "1,16"))
  args.prompt_len = args.prompt_len or (16 if args.smoke else 1024)
  args.new_tokens = args.new_tokens or (48 if args.smoke else 256)
  if args.smoke:
    args.reps = min(args.reps, 2)
  return args


def model_config(args):
  from deepseek_jax.config import load_config
  if args.smoke:
    return load_config(ROOT / "configs" / "tiny.yaml", ["model.n_layers=2"] + args.set).model
  return load_config(args.config, ["model.n_mtp_layers=1"] + args.set).model


def prompts(vocab: int, batch: int, length: int):
  import numpy as np
  return np.random.default_rng(batch).integers(0, vocab, (batch, length), dtype=np.int32)


def _best(times):
  """The fastest repetition: the least disturbed by other work on the machine."""
  return min(times) if times else float("nan")


# Bytes per decode step --------------------------------------------------------------------------------------

def step_bytes(cfg, batch: int, tokens: int, cache_slots: int, with_mtp: bool) -> int:
  """HBM bytes one decode step reads: touched weights (see the module docstring) + the allocated cache.
  `tokens` per sequence per step (2 for a speculative verify step, which also runs the MTP block)."""
  import jax
  from deepseek_jax import decode
  from deepseek_jax import model as model_lib
  _, params, _ = model_lib.abstract_model(cfg)
  E, k = cfg.n_routed_experts, cfg.n_activated_experts
  T = batch * tokens
  hit = E * (1 - (1 - k / E) ** T) if E else 0
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params.to_pure_dict()):
    names = [str(getattr(p, "key", "")) for p in path]
    if names[0] == "mtp" and not with_mtp:
      continue
    size = leaf.size
    if names[0] == "embed":
      size = T * cfg.dim
    elif names[-1] in ("w1", "w2", "w3") and "shared_experts" not in names and leaf.ndim == 3:
      size = size * hit / E
    total += size * (4 if names[-1] == "gate" else 2)
  n_cache_layers = cfg.n_layers + (1 if with_mtp else 0)
  return int(total + batch * cache_slots * decode.cache_bytes_per_token(cfg, n_cache_layers))


# Workers ------------------------------------------------------------------------------------------------------

def run_ckpt(args) -> dict:
  """Our initial parameters as a bf16 HF checkpoint (MTP module included, as layer n_layers)."""
  import jax
  from deepseek_jax import convert
  from deepseek_jax import model as model_lib
  cfg = model_config(args)
  t0 = time.time()
  tree = jax.tree.map(lambda x: jax.device_get(x), model_lib.to_pure_dict(model_lib.init_model(cfg, 0)))
  convert.save_hf_checkpoint(cfg, tree, args.hf_dir, dtype="bfloat16", fused_experts=True)
  return {"seconds": time.time() - t0, "params": sum(x.size for x in jax.tree.leaves(tree))}


def _time_ours(gen, prompt_BP, lens_B, new: int, reps: int, speculative: bool) -> dict:
  from deepseek_jax.sampling import SamplingConfig
  greedy = SamplingConfig()

  def once(n):
    start = time.perf_counter()
    out = gen.run(prompt_BP, lens_B, max_new_tokens=n, capacity=new, sampling_cfg=greedy, speculative=speculative)
    out.tokens_BN.block_until_ready()
    return time.perf_counter() - start, out

  compile_s, out = once(new)
  full, first = [], []
  for _ in range(reps):
    full.append(once(new)[0])
    first.append(once(1)[0])
  t_full, t_first = _best(full), _best(first)
  res = {"compile_and_first_run_s": compile_s, "t_total_s": t_full, "t_prefill_s": t_first,
         "steps": int(out.steps), "tokens_per_s": prompt_BP.shape[0] * new / t_full,
         "ms_per_step": 1e3 * (t_full - t_first) / max(int(out.steps), 1),
         "first_tokens": out.tokens_BN[0, :32].tolist()}
  if speculative:
    res["acceptance"] = int(out.accepted) / max(int(out.drafted), 1)
  res["ms_per_token"] = 1e3 * (t_full - t_first) / (new - 1)
  return res


def run_ours(args) -> dict:
  import jax
  import numpy as np
  from deepseek_jax import convert, decode
  from deepseek_jax import model as model_lib
  from deepseek_jax.generate import Generator
  dev = jax.devices()[0]
  base = model_config(args)
  if args.smoke:
    cfg, tree = base, jax.tree.map(np.asarray, model_lib.to_pure_dict(model_lib.init_model(base, 0)))
  else:
    cfg, tree = convert.load_hf_checkpoint(args.hf_dir, base=base)
  res = {"device": str(dev.device_kind), "cache_bytes_per_token": decode.cache_bytes_per_token(cfg), "rows": {}}
  P, N = args.prompt_len, args.new_tokens
  gen = Generator(cfg, tree)
  del tree
  for B in args.batches:
    prompt_BP, lens_B = prompts(cfg.vocab_size, B, P), np.full((B,), P, np.int32)
    row = _time_ours(gen, prompt_BP, lens_B, N, args.reps, speculative=False)
    stats = dev.memory_stats() or {}
    row["peak_bytes"] = stats.get("peak_bytes_in_use")
    row["cache_bytes"] = B * (P + N) * decode.cache_bytes_per_token(cfg)
    row["bytes_per_step"] = step_bytes(cfg, B, 1, P + N, with_mtp=False)
    row["roofline_fraction"] = row["bytes_per_step"] / (row["ms_per_step"] / 1e3) / HBM_BYTES_PER_S
    res["rows"][f"B{B}"] = row
    print(f"ours B={B}: {row['tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.2f} ms/step, "
          f"roofline {row['roofline_fraction']:.1%}", file=sys.stderr, flush=True)
  res["mtp"] = run_mtp(args, gen, cfg)
  return res


def run_mtp(args, gen, cfg) -> dict:
  """Plain vs speculative greedy decoding on the same model (ours only)."""
  import numpy as np
  from deepseek_jax.generate import Generator
  if args.mtp_checkpoint:
    from deepseek_jax import data
    from deepseek_jax.generate import load_checkpoint
    run_cfg, tree = load_checkpoint(args.mtp_checkpoint)
    cfg, gen = run_cfg.model, Generator(run_cfg.model, tree)
    docs = data.load_documents(run_cfg.data)
    tok = data.make_tokenizer(run_cfg.data)
    text = tok.encode("\n".join(docs[:50]))
  if cfg.n_mtp_layers < 1:
    return {"skipped": "the model has no MTP module"}
  out = {}
  P, N = args.prompt_len, args.new_tokens
  if P + N > cfg.max_seq_len:
    P = cfg.max_seq_len - N
  for B in args.mtp_batches:
    if args.mtp_checkpoint:   # real text: B windows of the corpus
      starts = np.random.default_rng(0).integers(0, len(text) - P, B)
      prompt_BP = np.stack([np.asarray(text[s:s + P], np.int32) for s in starts])
    else:
      prompt_BP = prompts(cfg.vocab_size, B, P)
    lens_B = np.full((B,), P, np.int32)
    plain = _time_ours(gen, prompt_BP, lens_B, N, args.reps, speculative=False)
    spec = _time_ours(gen, prompt_BP, lens_B, N, args.reps, speculative=True)
    spec_step_s = (spec["t_total_s"] - spec["t_prefill_s"]) / max(spec["steps"], 1)
    plain_tok_s = (plain["t_total_s"] - plain["t_prefill_s"]) / (N - 1)
    row = {"plain": plain, "speculative": spec, "same_tokens": plain["first_tokens"] == spec["first_tokens"],
           "acceptance": spec["acceptance"],
           "speedup_end_to_end": plain["t_total_s"] / spec["t_total_s"],
           "speedup_decode": (plain["t_total_s"] - plain["t_prefill_s"]) / (spec["t_total_s"] - spec["t_prefill_s"]),
           "spec_step_over_plain_step": spec_step_s / plain_tok_s,
           "projected_speedup_at_85pct": (1 + 0.85) * plain_tok_s / spec_step_s,
           "bytes_per_spec_step": step_bytes(cfg, B, 2, P + N, with_mtp=True)}
    out[f"B{B}"] = row
    print(f"mtp B={B}: acceptance {row['acceptance']:.1%}, decode speed-up {row['speedup_decode']:.2f}x, "
          f"projected at 85% {row['projected_speedup_at_85pct']:.2f}x", file=sys.stderr, flush=True)
  return out


def run_hf(args) -> dict:
  import numpy as np
  import torch
  import transformers
  transformers.logging.set_verbosity_error()   # the MTP layer's tensors are "unexpected" to HF: a long table
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(
      args.hf_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation=args.hf_attn).to(device)
  model.eval()
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  P, N = args.prompt_len, args.new_tokens
  res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "transformers": transformers.__version__,
         "rows": {}}

  def once(ids, n):
    sync()
    start = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    sync()
    return time.perf_counter() - start, out

  for B in args.batches:
    ids = torch.as_tensor(prompts(model.config.vocab_size, B, P), dtype=torch.long, device=device)
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    warm_s, out = once(ids, N)
    full, first = [], []
    for _ in range(args.reps):
      full.append(once(ids, N)[0])
      first.append(once(ids, 1)[0])
    t_full, t_first = _best(full), _best(first)
    cache = out.past_key_values
    tensors = [t for t in _tensors(cache)]
    row = {"warmup_s": warm_s, "t_total_s": t_full, "t_prefill_s": t_first, "tokens_per_s": B * N / t_full,
           "ms_per_token": 1e3 * (t_full - t_first) / (N - 1),
           "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "cache_bytes": sum(t.numel() * t.element_size() for t in tensors),
           "cache_type": type(cache).__name__,
           "first_tokens": out.sequences[0, P:P + 32].tolist()}
    res["rows"][f"B{B}"] = row
    print(f"hf B={B}: {row['tokens_per_s']:.1f} tok/s, {row['ms_per_token']:.2f} ms/token", file=sys.stderr,
          flush=True)
    del out, cache, tensors
  return res


def _tensors(obj, seen=None):
  """Every torch tensor reachable from a transformers Cache object (layers, lists, dicts, attributes)."""
  import torch
  seen = set() if seen is None else seen
  if id(obj) in seen:
    return
  seen.add(id(obj))
  if isinstance(obj, torch.Tensor):
    yield obj
  elif isinstance(obj, (list, tuple)):
    for x in obj:
      yield from _tensors(x, seen)
  elif isinstance(obj, dict):
    for x in obj.values():
      yield from _tensors(x, seen)
  elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers"):
    for x in vars(obj).values():
      yield from _tensors(x, seen)


# Orchestration ---------------------------------------------------------------------------------------------

def _spawn(args, worker: str, env_extra: dict | None = None, timeout: float | None = None) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  argv = [sys.executable, str(pathlib.Path(__file__).resolve()), *sys.argv[1:], "--worker", worker,
          "--worker-out", out, "--hf-dir", args.hf_dir]
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
  start = time.time()
  try:
    proc = subprocess.run(argv, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  if proc.returncode:
    return {"error": f"exit code {proc.returncode}", "seconds": time.time() - start}
  return json.loads(pathlib.Path(out).read_text())


def summarize(results: dict) -> str:
  ours, hf = results.get("ours", {}).get("rows", {}), results.get("hf", {}).get("rows", {})
  lines = [f"{'batch':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'x HF':>6} {'ours ms/tok':>12} {'HF ms/tok':>10} "
           f"{'roofline':>9} {'ours peak GiB':>14} {'HF peak GiB':>12} {'ours cache MiB':>15} {'HF cache MiB':>13}"]
  gib = lambda b: f"{b / 2**30:.2f}" if b else "-"
  mib = lambda b: f"{b / 2**20:.1f}" if b else "-"
  for name in sorted(ours.keys() | hf.keys(), key=lambda n: int(n[1:])):
    o, h = ours.get(name, {}), hf.get(name, {})
    ratio = o["tokens_per_s"] / h["tokens_per_s"] if o.get("tokens_per_s") and h.get("tokens_per_s") else None
    nan = float("nan")
    lines.append(f"{name[1:]:>6} {o.get('tokens_per_s', nan):11.1f} {h.get('tokens_per_s', nan):9.1f} "
                 f"{ratio or nan:6.2f} {o.get('ms_per_step', nan):12.2f} "
                 f"{h.get('ms_per_token', nan):10.2f} {o.get('roofline_fraction', nan):9.1%} "
                 f"{gib(o.get('peak_bytes')):>14} {gib(h.get('peak_bytes')):>12} {mib(o.get('cache_bytes')):>15} "
                 f"{mib(h.get('cache_bytes')):>13}")
  for name, row in (results.get("ours", {}).get("mtp") or {}).items():
    if isinstance(row, dict):
      lines.append(f"MTP {name}: acceptance {row['acceptance']:.1%}, decode speed-up {row['speedup_decode']:.2f}x "
                   f"(end to end {row['speedup_end_to_end']:.2f}x), spec step = {row['spec_step_over_plain_step']:.2f}"
                   f" plain steps, projected speed-up at 85% acceptance {row['projected_speedup_at_85pct']:.2f}x, "
                   f"greedy tokens equal: {row['same_tokens']}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    fn = {"ckpt": run_ckpt, "ours": run_ours, "hf": run_hf}[args.worker]
    pathlib.Path(args.worker_out).write_text(json.dumps(fn(args), default=str))
    return 0
  results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "prompt_len": args.prompt_len,
             "new_tokens": args.new_tokens}
  if args.smoke:   # in-process, CPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results["ours"] = run_ours(args)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      args.hf_dir = str(pathlib.Path(tmp) / "hf")
      results["ckpt"] = _spawn(args, "ckpt", {"JAX_PLATFORMS": "cpu"})
      if "error" in results["ckpt"]:
        print(f"checkpoint export failed: {results['ckpt']['error']}", file=sys.stderr)
        return 1
      if args.only in ("ours", "both"):
        flags = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), args.xla_flags) if x)
        results["ours"] = _spawn(args, "ours", {"XLA_FLAGS": flags} if flags else None)
      if args.only in ("hf", "both"):
        results["hf"] = _spawn(args, "hf")
  print(summarize(results))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
