"""Helpers of bench/train_step.py: GPU profile attribution, component micro-benchmarks (MoE layer, attention),
and the result table."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import tempfile
import time

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


def attribute_kernels(hlo_text: str, names) -> dict:
  """Kernel (fusion) name -> its HLO result type and the JAX op_name metadata, from the optimized HLO."""
  import re
  out = {}
  for name in names:
    m = re.search(r"%" + re.escape(name) + r" = ([^ ]+) .*?op_name=\"([^\"]*)\"", hlo_text)
    if m:
      out[name] = (m.group(1)[:80], m.group(2)[-260:])
  return out


def f32_gemms(hlo_text: str) -> list:
  """cuBLAS GEMM calls whose first operand is float32 (result type, op_name), deduplicated."""
  import re
  seen, out = set(), []
  for line in hlo_text.splitlines():
    if "__cublas$gemm" not in line and "__cublas$lt$matmul" not in line:
      continue
    m = re.search(r"custom-call\((\w+)\[([^\]]*)\]", line)
    if not m or m.group(1) != "f32":
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    key = (m.group(2), op.group(1)[-200:] if op else "")
    if key not in seen:
      seen.add(key)
      out.append(key)
  return out[:40]


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


def summarize_profile(log_dir: str, n_steps: int, plane_prefix: str = "/device:GPU") -> dict:
  from jax._src.lib import _profile_data
  paths = sorted(pathlib.Path(log_dir).rglob("*.xplane.pb"))
  if not paths:
    return {"error": f"no xplane.pb under {log_dir}"}
  pd = _profile_data.ProfileData.from_file(str(paths[-1]))
  out = {"lines": {}, "by_class_ms_per_step": {}, "top_kernels_ms_per_step": []}
  for plane in pd.planes:
    if not plane.name.startswith(plane_prefix):
      continue
    for line in plane.lines:
      agg, n_ev = {}, 0
      for ev in line.events:
        agg[ev.name] = agg.get(ev.name, 0.0) + ev.duration_ns
        n_ev += 1
      total = sum(agg.values())
      top = sorted(agg.items(), key=lambda kv: -kv[1])[:40]
      out["lines"][f"{plane.name}|{line.name}"] = {
          "total_ms_per_step": total / 1e6 / n_steps, "n_events": n_ev,
          "top": [(k[:160], v / 1e6 / n_steps) for k, v in top]}
      if line.name.lower().startswith("stream") or "stream" in line.name.lower():
        for k, v in agg.items():
          c = classify_kernel(k)
          out["by_class_ms_per_step"][c] = out["by_class_ms_per_step"].get(c, 0.0) + v / 1e6 / n_steps
        out["top_kernels_ms_per_step"] += [(k[:160], v / 1e6 / n_steps) for k, v in top[:25]]
  out["top_kernels_ms_per_step"] = sorted(out["top_kernels_ms_per_step"], key=lambda kv: -kv[1])[:40]
  return out


# Worker: Hugging Face ------------------------------------------------------------------------------------


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
  res = {"moe": {}, "attention": {}, "moe_shape": dict(T=T, D=D, F=F, E=E, k=k),
         "device": str(jax.devices()[0].device_kind),
         "compute_capability": str(getattr(jax.devices()[0], "compute_capability", None)),
         "auto_impl": moe.grouped_matmul_impl(dt, D, F)}
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
        if best.get(kind + "_ms") is None and not (blocks and kind in blocks) and best[kind] is None:
          best[kind], best[kind + "_ms"] = dict(moe.MGPU_GMM_BLOCKS if kind == "gmm" else moe.MGPU_TGMM_BLOCKS), \
              entry["fwd_bwd_ms"]
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
    for k_, v in prof.get("top_kernels_ms_per_step", [])[:20]:
      a = prof.get("attribution", {}).get(k_)
      print(f"  {v:7.2f} ms  {k_[:60]:<60} {(a[1][-110:] if a else '')}")
    for shape, op in prof.get("f32_gemms", [])[:10]:
      print(f"  f32 GEMM lhs [{shape}]  {op[-120:]}")
  elif prof:
    print(f"\nprofile: {prof.get('error')}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))
