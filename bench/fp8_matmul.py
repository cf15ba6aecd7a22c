"""FP8 Linear GEMMs (deepseek_jax/fp8.py) against bf16, forward + backward, on DeepSeek shapes (issue #12).

For each shape (M tokens, K in, N out) and implementation, times y = x w with both gradients (3 GEMMs,
6 M K N FLOPs), checks what XLA compiled them to, and the error against the float32 product:

  bf16           jnp.dot in bf16 (autodiff)                            cuBLAS bf16
  blockwise-f8   fp8_dot, DeepSeek tiles, e4m3 operands per K chunk     cuBLASLt f8, one batched GEMM per pass
  blockwise-qdq  fp8_dot, DeepSeek tiles, quantize-dequantize + bf16    cuBLAS bf16 (FP8 numerics only)
  blockwise-mgpu fp8_dot, DeepSeek tiles, Pallas Mosaic-GPU kernel        fp8_gemm_mgpu (Hopper only)
  rowwise-f8     fp8_dot, per-row/column scales, one f8 GEMM per pass   cuBLASLt f8
  tensorwise-f8  fp8_dot, per-tensor scales, one f8 GEMM per pass       cuBLASLt f8

The `f8 calls` column counts `__cublas$lt$matmul$f8` custom calls in the compiled fwd+bwd (3 expected for the
*-f8 rows on Hopper; XLA upcasts f8 dots on CPU, so 0 there), `mgpu` the Mosaic GPU kernels (3 for -mgpu).
Then, forward GEMM only on pre-quantized operands (the kernels against cuBLAS): bf16 jnp.dot, `raw-f8`
(jnp.dot on per-tensor e4m3 operands: cuBLAS per-tensor FP8, the ceiling of issue #12) and the blockwise kernel
in both variants, each kernel checked against the exact dequantized float32 product (rel err must be < 1e-5).
With --grouped, the routed experts' grouped matmul (fp8_gmm: quantize-dequantize around the grouped kernels).

  PYTHONPATH=. python bench/fp8_matmul.py                 # H100: DeepSeek-V3 + configs/bench.yaml shapes
  PYTHONPATH=. python bench/fp8_matmul.py --grouped       # ... and the MoE grouped matmul
  PYTHONPATH=. python bench/fp8_matmul.py --smoke         # CPU, toy shapes, < 30 s
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import fp8
from deepseek_jax.config import load_config

IMPLS = ("bf16", "blockwise-f8", "blockwise-qdq", "blockwise-mgpu", "rowwise-f8", "tensorwise-f8")
F8_CALL = "__cublas$lt$matmul$f8"


def bench_shapes(config: str) -> list[tuple[str, int, int, int]]:
  """(name, M, K, N): DeepSeek-V3's expert-sized GEMM, then every Linear of one block of `config`."""
  cfg = load_config(config)
  m = cfg.model
  M = cfg.train.batch_size * cfg.data.seq_len
  H, F = m.n_heads, m.moe_inter_dim * m.n_shared_experts
  shapes = [("v3 16384x7168x2048", 16384, 7168, 2048)]
  if m.q_lora_rank:
    shapes += [("wq_a", M, m.dim, m.q_lora_rank), ("wq_b", M, m.q_lora_rank, H * m.qk_head_dim)]
  else:
    shapes += [("wq", M, m.dim, H * m.qk_head_dim)]
  shapes += [("wkv_a", M, m.dim, m.kv_lora_rank + m.qk_rope_head_dim),
             ("wkv_b", M, m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim)),
             ("wo", M, H * m.v_head_dim, m.dim),
             ("mlp w1|w3", M, m.dim, m.inter_dim), ("mlp w2", M, m.inter_dim, m.dim)]
  if F:
    shapes += [("shared w1|w3", M, m.dim, F), ("shared w2", M, F, m.dim)]
  return shapes


def _linear(impl: str):
  if impl == "bf16":
    return lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  recipe, gemm = impl.split("-")
  return lambda x, w: fp8.fp8_dot(x, w, recipe, gemm)


def _fwd_bwd(f):
  def run(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))
  return jax.jit(run)


def _time(fn, args, iters: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def _hlo_counts(compiled_text: str) -> tuple[int, int, int]:
  """(f8 cuBLASLt calls, other cuBLAS GEMM calls, Mosaic GPU kernels) in compiled HLO."""
  f8 = compiled_text.count(f'custom_call_target="{F8_CALL}"')
  gemms = compiled_text.count('custom_call_target="__cublas$gemm"') + compiled_text.count(
      'custom_call_target="__cublas$lt$matmul"')
  return f8, gemms, compiled_text.count('custom_call_target="mosaic_gpu')


def _inputs(M, K, N, dtype, seed=0):
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (M, K), jnp.float32)
  w = jax.random.normal(kw, (K, N), jnp.float32) * K ** -0.5
  dy = jax.random.normal(kd, (M, N), jnp.float32) * 1e-3
  return x.astype(dtype), w.astype(dtype), dy.astype(dtype)


def _reference(x, w, dy):
  """float32 products (fp32 accumulation, highest precision) for the error column."""
  x, w, dy = (a.astype(jnp.float32) for a in (x, w, dy))
  hi = jax.lax.Precision.HIGHEST
  f = jax.jit(lambda x, w, dy: (jnp.dot(x, w, precision=hi), jnp.dot(dy, w.T, precision=hi),
                                jnp.dot(x.T, dy, precision=hi)))
  return f(x, w, dy)


def run_dense(shapes, impls, dtype, iters, warmup, gpu: bool, hopper: bool):
  print(f"\nforward + backward\n{'shape':<20}{'M':>7}{'K':>6}{'N':>6} {'impl':<15}{'ms':>9}{'TFLOP/s':>9}"
        f"{'vs bf16':>8}{'f8 calls':>9}{'gemms':>6}{'mgpu':>5}  rel err y / dx / dw")
  totals: dict[str, float] = {}
  for name, M, K, N in shapes:
    x, w, dy = _inputs(M, K, N, dtype)
    ref = _reference(x, w, dy)
    flops = 6.0 * M * K * N
    base = None
    for impl in impls:
      if impl.endswith("-mgpu") and not hopper:
        continue
      fn = _fwd_bwd(_linear(impl))
      try:
        compiled = fn.lower(x, w, dy).compile()
        sec = _time(compiled, (x, w, dy), iters, warmup)
        out = compiled(x, w, dy)
      except Exception as e:  # noqa: BLE001  (e.g. out of memory for the chunked partial sums)
        print(f"{name:<20}{M:>7}{K:>6}{N:>6} {impl:<15}  failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:90]}")
        continue
      base = sec if impl == "bf16" else base
      f8_calls, gemms, mgpu = _hlo_counts(compiled.as_text())
      errs = " / ".join(f"{_rel(o, r):.4f}" for o, r in zip(out, ref))
      flag = "  (f8 GEMM MISSING)" if gpu and impl.endswith("-f8") and f8_calls < 3 else ""
      ratio = f"{base / sec:>8.2f}" if base else f"{'-':>8}"
      print(f"{name:<20}{M:>7}{K:>6}{N:>6} {impl:<15}{sec * 1e3:>9.3f}{flops / sec / 1e12:>9.1f}{ratio}"
            f"{f8_calls:>9}{gemms:>6}{mgpu:>5}  {errs}{flag}")
      if not name.startswith("v3"):
        totals[impl] = totals.get(impl, 0.0) + sec
  if totals:
    base = totals.get("bf16")
    print("\nsum over the rows above (without the v3 shape): " + ", ".join(
        f"{k} {v * 1e3:.2f} ms" + (f" ({base / v:.2f}x)" if base else "") for k, v in totals.items()))


def run_forward_gemms(shapes, iters, warmup, hopper: bool):
  """Forward GEMM only, on operands quantized beforehand: the kernels against cuBLAS."""
  print(f"\nforward GEMM only (operands pre-quantized)\n{'shape':<20}{'M':>7}{'K':>6}{'N':>6} {'gemm':<16}"
        f"{'ms':>9}{'TFLOP/s':>9}{'vs bf16':>8}{'f8 calls':>9}  rel err vs exact")
  for name, M, K, N in shapes:
    x, w, _ = _inputs(M, K, N, jnp.float32)
    flops = 2.0 * M * K * N
    rows = {"bf16": (jax.jit(lambda a, b: jnp.dot(a, b)), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), None)}
    a8, sa = fp8.quantize(x, (-1, -1))
    b8, sb = fp8.quantize(w, (-1, -1))
    s = (sa * sb)[0, 0]
    rows["raw-f8 (tensor)"] = (jax.jit(lambda a, b, s: jnp.dot(a, b, preferred_element_type=jnp.bfloat16) * s.astype(
        jnp.bfloat16)), (a8, b8, s), fp8.dequantize(a8, sa, (-1, -1)) @ fp8.dequantize(b8, sb, (-1, -1)))
    if hopper and M % 128 == 0 and K % 128 == 0 and N % 128 == 0:
      from deepseek_jax.kernels import fp8_gemm as fp8_gemm_mgpu
      qa, sa_Mc = fp8.quantize(x, (1, 128))
      qb, sb_kn = fp8.quantize(w, (128, 128))
      exact = fp8.dequantize(qa, sa_Mc, (1, 128)) @ fp8.dequantize(qb, sb_kn, (128, 128))
      args = (qa, sa_Mc, qb.T, jnp.repeat(sb_kn, 128, axis=1))   # the kernel takes b K-major: [N, K]
      for ws in (True, False):
        rows[f"mgpu {'ws' if ws else 'simple'}"] = (jax.jit(functools.partial(
            fp8_gemm_mgpu.blockwise_gemm, out_dtype=jnp.float32, warp_specialized=ws)), args, exact)
    base = None
    for gemm, (fn, args, exact) in rows.items():
      try:
        compiled = fn.lower(*args).compile()
        sec = _time(compiled, args, iters, warmup)
        err = "" if exact is None else f"{_rel(compiled(*args).astype(jnp.float32), exact):.2e}"
        if gemm.startswith("mgpu") and _rel(compiled(*args), exact) > 1e-5:
          err += "  MISMATCH"
      except Exception as e:  # noqa: BLE001
        print(f"{name:<20}{M:>7}{K:>6}{N:>6} {gemm:<16}  failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
        continue
      base = sec if gemm == "bf16" else base
      ratio = f"{base / sec:>8.2f}" if base else f"{'-':>8}"
      print(f"{name:<20}{M:>7}{K:>6}{N:>6} {gemm:<16}{sec * 1e3:>9.3f}{flops / sec / 1e12:>9.1f}{ratio}"
            f"{_hlo_counts(compiled.as_text())[0]:>9}  {err}")


def _grouped_gmm():
  """The MoE path's grouped matmul (kernels.grouped_matmul.gmm): Pallas Mosaic-GPU on Hopper, else ragged_dot."""
  from deepseek_jax.kernels.grouped_matmul import gmm, resolve_impl
  impl = resolve_impl("auto", jnp.bfloat16, 128, 128)
  return impl, functools.partial(gmm, impl=impl)


def run_grouped(M, E, K, N, dtype, iters, warmup):
  """Routed experts: M = tokens x top-k rows in E equal groups, [E, K, N] weights."""
  name, gmm_fn = _grouped_gmm()
  gs = jnp.full((E,), M // E, jnp.int32)
  kx, kw, kd = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (E, K, N), jnp.float32) * K ** -0.5).astype(dtype)
  dy = (jax.random.normal(kd, (M, N), jnp.float32) * 1e-3).astype(dtype)
  print(f"\ngrouped M={M} E={E} K={K} N={N} {dtype.__name__} kernels={name}")
  flops = 6.0 * M * K * N
  base = None
  for impl, f in (("bf16", lambda x, w: gmm_fn(x, w, gs)),
                  ("blockwise-qdq", lambda x, w: fp8.fp8_gmm(x, w, gs, "blockwise", gmm_fn))):
    try:
      sec = _time(_fwd_bwd(f), (x, w, dy), iters, warmup)
    except Exception as e:  # noqa: BLE001
      print(f"  {impl:<15} failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
      continue
    base = sec if impl == "bf16" else base
    print(f"  {impl:<15}{sec * 1e3:>9.3f} ms{flops / sec / 1e12:>9.1f} TFLOP/s"
          + (f"{base / sec:>8.2f}x" if base else ""))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="toy shapes on CPU (< 30 s)")
  p.add_argument("--config", default="configs/bench.yaml", help="model whose Linear shapes are timed")
  p.add_argument("--shapes", default="", help="'M,K,N;M,K,N' instead of the config's shapes")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--grouped", action="store_true", help="also time the routed experts' grouped matmul")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  hopper = gpu and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__}"
        + ("" if hopper else "  (no Hopper: the -mgpu rows are skipped)"))
  if args.smoke:
    shapes, iters, warmup = [("smoke", 256, 384, 256), ("smoke ragged", 200, 320, 200)], 2, 1
  elif args.shapes:
    shapes = [(s, *map(int, s.split(","))) for s in args.shapes.split(";")]
    iters, warmup = args.iters, args.warmup
  else:
    shapes, iters, warmup = bench_shapes(args.config), args.iters, args.warmup
  if not gpu and not args.smoke:
    print("note: not a GPU; XLA upcasts f8 GEMMs here, so the times say nothing about FP8 hardware")
  run_dense(shapes, args.impls.split(","), jnp.bfloat16, iters, warmup, gpu, hopper)
  run_forward_gemms(shapes, iters, warmup, hopper)
  if args.grouped or args.smoke:
    if args.smoke:
      run_grouped(512, 4, 256, 128, jnp.bfloat16, iters, warmup)
    else:
      cfg = load_config(args.config)
      m = cfg.model
      M = cfg.train.batch_size * cfg.data.seq_len * m.n_activated_experts
      run_grouped(M, m.n_routed_experts, m.dim, 2 * m.moe_inter_dim, jnp.bfloat16, iters, warmup)
      run_grouped(M, m.n_routed_experts, m.moe_inter_dim, m.dim, jnp.bfloat16, iters, warmup)


if __name__ == "__main__":
  main()
