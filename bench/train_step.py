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

  def to_batch(inp, tgt):
    return {"inputs": jnp.asarray(inp), "targets": jnp.asarray(tgt), "positions": jnp.asarray(pos),
            "loss_mask": jnp.ones((B, S), bool), "segment_ids": None}   # unpacked rows: plain causal mask
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


def _profile_steps(compiled, state, batches, n_steps: int = 2):
  """Trace n_steps of the compiled step; GPU kernel time summed by name (jax.profiler + ProfileData)."""
  import jax
  d = tempfile.mkdtemp(prefix="jaxprof_")
  jax.profiler.start_trace(d)
  for i in range(n_steps):
    state, m = compiled(state, batches[i])
  jax.block_until_ready(m["loss"])
  jax.profiler.stop_trace()
  try:
    return state, summarize_profile(d, n_steps)
  except Exception as e:  # noqa: BLE001
    return state, {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def classify_kernel(name: str) -> str:
  n = name.lower()
  if any(s in n for s in ("fmha", "sdpa", "flash", "cudnn", "fprop", "dgrad_attn", "attention")):
    return "attention (cuDNN)"
  if any(s in n for s in ("mosaic", "ragged", "mn_loop", "pallas", "body")):
    return "MoE grouped matmul (Pallas)"
  if any(s in n for s in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "sm90_", "triton_gemm",
                          "dot")):
    return "dense matmul (cuBLAS/XLA)"
  if any(s in n for s in ("sort", "radix", "cub::")):
    return "sort"
  if "scatter" in n:
    return "scatter"
  if "gather" in n or "dynamic_slice" in n:
    return "gather"
  if any(s in n for s in ("memcpy", "memset", "copy")):
    return "copy/memset"
  if "reduce" in n:
    return "reduction fusions"
  return "other fusions (elementwise)"


def summarize_profile(log_dir: str, n_steps: int) -> dict:
  from jax._src.lib import _profile_data
  paths = sorted(pathlib.Path(log_dir).rglob("*.xplane.pb"))
  if not paths:
    return {"error": f"no xplane.pb under {log_dir}"}
  pd = _profile_data.ProfileData.from_file(str(paths[-1]))
  out = {"lines": {}, "by_class_ms_per_step": {}, "top_kernels_ms_per_step": []}
  for plane in pd.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      agg = {}
      for ev in line.events:
        agg[ev.name] = agg.get(ev.name, 0.0) + ev.duration_ns
      total = sum(agg.values())
      top = sorted(agg.items(), key=lambda kv: -kv[1])[:40]
      out["lines"][f"{plane.name}|{line.name}"] = {
          "total_ms_per_step": total / 1e6 / n_steps, "n_events": len(line.events),
          "top": [(k[:160], v / 1e6 / n_steps) for k, v in top]}
      if line.name.lower().startswith("stream") or "stream" in line.name.lower():
        for k, v in agg.items():
          c = classify_kernel(k)
          out["by_class_ms_per_step"][c] = out["by_class_ms_per_step"].get(c, 0.0) + v / 1e6 / n_steps
        out["top_kernels_ms_per_step"] += [(k[:160], v / 1e6 / n_steps) for k, v in top[:25]]
  out["top_kernels_ms_per_step"] = sorted(out["top_kernels_ms_per_step"], key=lambda kv: -kv[1])[:40]
  return out


# Worker: Hugging Face ------------------------------------------------------------------------------------

def run_hf(args, cfg) -> dict:
  import importlib.util

  import numpy as np
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
  import jax.numpy as jnp
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

def _time_fn(f, *a, n=10, warm=2):
  import jax
  for _ in range(warm):
    jax.block_until_ready(f(*a))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _relerr(a, b):
  import jax.numpy as jnp
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def run_micro(args, cfg) -> dict:
  import jax
  import jax.numpy as jnp
  from deepseek_jax import moe
  from deepseek_jax.attention import dot_product_attention
  m = cfg.model
  B, S = cfg.train.batch_size, cfg.data.seq_len
  T, D, F, E, k = B * S, m.dim, m.moe_inter_dim, m.n_routed_experts, m.n_activated_experts
  dt = jnp.dtype(m.dtype)
  res = {"moe": {}, "attention": {}, "moe_shape": dict(T=T, D=D, F=F, E=E, k=k)}
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (T, D), jnp.float32).astype(dt)
  gate = jax.random.normal(ks[1], (D, E), jnp.float32) * m.init_std
  r = moe.route(x, gate, jnp.zeros((E,), jnp.float32), m)
  idx, w = r.idx_Tk, r.w_Tk
  load = jnp.bincount(idx.reshape(-1), length=E)
  res["moe_load_max_over_mean"] = float(load.max() / load.mean())
  w1 = jax.random.normal(ks[2], (E, D, F), jnp.float32) * m.init_std
  w3 = jax.random.normal(ks[3], (E, D, F), jnp.float32) * m.init_std
  w2 = jax.random.normal(ks[4], (E, F, D), jnp.float32) * m.init_std
  R = jax.random.normal(ks[5], (T, D), jnp.float32).astype(dt)
  moe_flops = 3 * 2 * T * k * 3 * D * F   # fwd + bwd

  def make(impl, cf=0.0, moe_impl="grouped"):
    c = dataclasses.replace(m, capacity_factor=cf, moe_impl=moe_impl)

    def loss(x, w, w1, w3, w2):
      y, dropped = moe.local_routed_experts(x, idx, w, w1, w3, w2, c)
      return jnp.sum(y.astype(jnp.float32) * R.astype(jnp.float32)), (y, dropped)

    def f(x, w, w1, w3, w2):
      old = moe.GROUPED_MATMUL
      moe.GROUPED_MATMUL = impl
      try:
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, w1, w3, w2)
      finally:
        moe.GROUPED_MATMUL = old
    return jax.jit(f)

  args_ = (x, w, w1, w3, w2)
  ref = None
  variants = [("xla ragged_dot (dropless)", "xla", 0.0, None)]
  sweep = [dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1),
           dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=2),
           dict(block_m=128, block_n=192, block_k=64, max_concurrent_steps=4, grid_block_n=1)]
  for b in sweep:
    variants.append((f"mgpu gmm{tuple(b.values())}", "mgpu", 0.0, {"gmm": b}))
  variants += [("mgpu tgmm(128,128,128,3,1)", "mgpu", 0.0,
                {"tgmm": dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=3, grid_block_n=1)}),
               ("capacity cf=1.0", "xla", 1.0, None), ("capacity cf=1.25", "xla", 1.25, None)]
  gmm0, tgmm0 = dict(moe.MGPU_GMM_BLOCKS), dict(moe.MGPU_TGMM_BLOCKS)
  best = {"gmm": None, "tgmm": None}
  for name, impl, cf, blocks in variants:
    moe.MGPU_GMM_BLOCKS.clear(); moe.MGPU_GMM_BLOCKS.update(best["gmm"] or gmm0)
    moe.MGPU_TGMM_BLOCKS.clear(); moe.MGPU_TGMM_BLOCKS.update(best["tgmm"] or tgmm0)
    if blocks:
      moe.MGPU_GMM_BLOCKS.update(blocks.get("gmm", {}))
      moe.MGPU_TGMM_BLOCKS.update(blocks.get("tgmm", {}))
    entry = {"impl": impl, "capacity_factor": cf, "gmm": dict(moe.MGPU_GMM_BLOCKS),
             "tgmm": dict(moe.MGPU_TGMM_BLOCKS)}
    try:
      f = make(impl, cf)
      t0 = time.perf_counter()
      (val, (y, dropped)), grads = f(*args_)
      jax.block_until_ready(grads)
      entry["compile_s"] = time.perf_counter() - t0
      if ref is None:
        ref = (y, grads)
      else:
        entry["relerr_y"] = _relerr(y, ref[0])
        entry["relerr_grads"] = [_relerr(g, gr) for g, gr in zip(grads, ref[1])]
      entry["dropped_frac"] = int(dropped) / (T * k)
      entry["fwd_bwd_ms"] = _time_fn(f, *args_, n=8) * 1e3
      entry["tflops"] = moe_flops / (entry["fwd_bwd_ms"] / 1e3) / 1e12
    except Exception as e:  # noqa: BLE001
      entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    res["moe"][name] = entry
    if ref is None:   # the lax.ragged_dot reference failed: the dense oracle (every expert on every token)
      try:
        (_, (y, _)), grads = make("xla", 0.0, "dense")(*args_)
        ref = (y, grads)
        res["moe_reference"] = "dense"
      except Exception as e:  # noqa: BLE001
        res["moe_reference_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"[micro] moe {name}: {json.dumps({k_: v for k_, v in entry.items() if k_ not in ('gmm', 'tgmm')})}",
          flush=True)
    ok = "error" not in entry and entry.get("relerr_y", 1.0) < 2e-2
    if impl == "mgpu" and ok:
      for kind in ("gmm", "tgmm"):
        if blocks and kind in blocks:
          cur = best.get(kind + "_ms")
          if cur is None or entry["fwd_bwd_ms"] < cur:
            best[kind], best[kind + "_ms"] = dict(blocks[kind]), entry["fwd_bwd_ms"]
  res["mgpu_best"] = {"gmm": best["gmm"] or gmm0, "tgmm": best["tgmm"] or tgmm0}
  mg = [v for k_, v in res["moe"].items() if v["impl"] == "mgpu"]
  res["mgpu_ok"] = any("error" not in v and v.get("relerr_y", 1) < 2e-2 and
                       max(v.get("relerr_grads", [1])) < 3e-2 for v in mg)
  # Attention core, fwd + bwd, per implementation.
  H, Kd, Od = m.n_heads, m.qk_head_dim, m.v_head_dim
  q = jax.random.normal(ks[5], (B, S, H, Kd), jnp.float32).astype(dt)
  kk = jax.random.normal(ks[6], (B, S, H, Kd), jnp.float32).astype(dt)
  v = jax.random.normal(ks[7], (B, S, H, Od), jnp.float32).astype(dt)
  Ro = jax.random.normal(ks[0], (B, S, H, Od), jnp.float32).astype(dt)
  mask = jnp.tril(jnp.ones((S, S), bool))[None, None]
  attn_flops = 3 * 2 * B * H * S * S * (Kd + Od) / 2   # causal-halved, fwd + bwd
  aref = None
  for name, impl, env in (("xla", "xla", "1"), ("cudnn padded V", "cudnn", "0"), ("cudnn MLA (private)", "cudnn", "1")):
    entry = {}
    try:
      os.environ["DEEPSEEK_JAX_CUDNN_MLA"] = env

      def aloss(q, kk, v, impl=impl):
        o = dot_product_attention(q, kk, v, mask, m.softmax_scale, impl)
        return jnp.sum(o.astype(jnp.float32) * Ro.astype(jnp.float32)), o
      f = jax.jit(jax.value_and_grad(aloss, argnums=(0, 1, 2), has_aux=True))
      (_, o), g = f(q, kk, v)
      if aref is None:
        aref = (o, g)
      else:
        entry["relerr_out"] = _relerr(o, aref[0])
        entry["relerr_grads"] = [_relerr(a, b) for a, b in zip(g, aref[1])]
      entry["fwd_bwd_ms"] = _time_fn(f, q, kk, v, n=8) * 1e3
      entry["tflops"] = attn_flops / (entry["fwd_bwd_ms"] / 1e3) / 1e12
    except Exception as e:  # noqa: BLE001
      entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    res["attention"][name] = entry
    print(f"[micro] attention {name}: {json.dumps(entry)}", flush=True)
  os.environ.pop("DEEPSEEK_JAX_CUDNN_MLA", None)
  e = res["attention"].get("cudnn MLA (private)", {})
  res["cudnn_mla_ok"] = "error" not in e and e.get("relerr_out", 1) < 2e-2
  return res


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
    return json.loads(pathlib.Path(out).read_text())
  except (OSError, ValueError):
    return {"error": f"worker exited with {proc.returncode} and no result"}


def _strip_orchestrator_args(argv):
  """Arguments passed through to workers (orchestrator-only ones removed)."""
  out, skip = [], False
  drop_with_value = {"--variants", "--out", "--deadline", "--only", "--variant-steps"}
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
      elif cfg.model.capacity_factor <= 0 and cfg.model.moe_impl == "grouped":
        jax_env["DEEPSEEK_JAX_GROUPED_MATMUL"] = "xla"
        results["note_moe"] = "mgpu failed its micro check: ours uses lax.ragged_dot"
    if args.attn_impl is None and not mic.get("error") and not mic.get("cudnn_mla_ok"):
      jax_env["DEEPSEEK_JAX_CUDNN_MLA"] = "0"
      results["note_attn"] = "private cuDNN MLA failed its micro check: padded V"
  if want_ours:
    print("== ours", flush=True)
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


def fmt_gib(b):
  return f"{b / 2**30:.1f}" if b else "-"


def print_table(results, cfg, args):
  fh, ff = results["flops_per_token"]["causal_halved"], results["flops_per_token"]["full_square"]
  peak = cfg.train.peak_tflops if not args.small else None
  rows = results["rows"]
  print()
  print(f"model FLOPs/token: {fh / 1e9:.3f} G (causal-halved attention), {ff / 1e9:.3f} G (full square); "
        f"MFU vs {cfg.train.peak_tflops:g} TFLOP/s")
  hdr = (f"{'system':<24} {'s/step':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'TF/s full':>9} {'MFU full':>8} "
         f"{'peak GiB':>8} {'loss@1':>8} {'loss@end':>9} {'dropped':>8}")
  print(hdr)
  print("-" * len(hdr))
  tok_step = None
  for name, r in rows.items():
    if r.get("error") or "median_step_s" not in r:
      print(f"{name:<24} ERROR {str(r.get('error'))[:150]}")
      continue
    tok_step = r["batch"] * r["seq_len"]
    s = r["median_step_s"]
    tps = tok_step / s
    mfu = lambda f: f"{100 * tps * f / 1e12 / peak:.1f}%" if peak else "-"   # noqa: E731
    r["tokens_per_s"] = tps
    r["tflops_halved"], r["tflops_full"] = tps * fh / 1e12, tps * ff / 1e12
    drop = f"{100 * r['dropped_frac']:.2f}%" if "dropped_frac" in r else "0 (HF)"
    print(f"{name:<24} {s:8.4f} {tps:9.0f} {tps * fh / 1e12:8.1f} {mfu(fh):>6} {tps * ff / 1e12:9.1f} {mfu(ff):>8} "
          f"{fmt_gib(r.get('peak_bytes')):>8} {r['losses'][0]:8.4f} {r['losses'][-1]:9.4f} {drop:>8}")
  o, h = rows.get("ours", {}), rows.get("hf", {})
  if "tokens_per_s" in o and "tokens_per_s" in h:
    results["ratio_ours_over_hf"] = o["tokens_per_s"] / h["tokens_per_s"]
    lo, lh = o["losses"][-1], h["losses"][-1]
    results["loss_rel_diff"] = abs(lo - lh) / lh
    n = min(len(o["losses"]), len(h["losses"]))
    print(f"\nours/HF tokens/s: {results['ratio_ours_over_hf']:.2f}x   loss at step {n}: ours {lo:.4f}, HF {lh:.4f} "
          f"(rel diff {100 * results['loss_rel_diff']:.2f}%); step-1 loss ours {o['losses'][0]:.4f}, "
          f"HF {h['losses'][0]:.4f}")
    for i in sorted({0, 9, 19, 29, 39, n - 1}):
      if i < n:
        print(f"  step {i + 1:3d}: ours {o['losses'][i]:.4f}  HF {h['losses'][i]:.4f}")
  for name in ("ours", "hf"):
    r = rows.get(name, {})
    if "median_step_s" in r:
      extra = {k: r.get(k) for k in ("device", "compile_s", "pipelined_step_s", "optimizer_only_s", "grouped_matmul",
                                     "experts_implementation", "attn_implementation", "init", "embed_checksum")
               if r.get(k) is not None}
      print(f"{name}: {json.dumps(extra, default=str)}")
  if results.get("ckpt", {}).get("embed_checksum") is not None:
    print(f"ckpt embed checksum (CPU init): {results['ckpt']['embed_checksum']:.3f}")
  if "micro" in results and not results["micro"].get("error"):
    mic = results["micro"]
    print("\nmicro (fwd+bwd, one layer):")
    for name, e in mic.get("moe", {}).items():
      print(f"  moe  {name:<40} {e.get('fwd_bwd_ms', float('nan')):8.2f} ms {e.get('tflops', 0):6.0f} TF/s "
            f"err {e.get('relerr_y', 0):.1e} drop {100 * e.get('dropped_frac', 0):.2f}% {e.get('error', '')[:80]}")
    for name, e in mic.get("attention", {}).items():
      print(f"  attn {name:<40} {e.get('fwd_bwd_ms', float('nan')):8.2f} ms {e.get('tflops', 0):6.0f} TF/s "
            f"err {e.get('relerr_out', 0):.1e} {e.get('error', '')[:80]}")
  prof = rows.get("ours", {}).get("profile")
  if prof and not prof.get("error"):
    print("\nprofile (GPU kernel time per step, ms):")
    for c, v in sorted(prof.get("by_class_ms_per_step", {}).items(), key=lambda kv: -kv[1]):
      print(f"  {c:<34} {v:8.2f}")
  elif prof:
    print(f"\nprofile: {prof.get('error')}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
  sys.exit(main())
