"""Blockwise-scaled FP8 GEMM for Hopper as a Pallas Mosaic-GPU kernel (DeepSeek-V3 report section 3.3).

  out[m, n] = sum_c (a[m, c] . b[n, c]) * sa[m, c] * sb[c, n]      c = 128-wide chunks of K

a [M, K] and b [N, K] are e4m3 with K contiguous (fp8 WGMMA takes both operands K-major). Each K step is one
128-deep e4m3 WGMMA into a fresh fp32 accumulator, which is then scaled by the chunk's row scales (sa, one per
row of a: 1x128 activation tiles) and column scales (sb, one per column of b: 128x128 weight blocks repeated
over their 128 columns, or 128x1 tiles for the weight gradient) and added to the running fp32 sum in registers:
the "promotion to CUDA cores every 128 elements" of the report, with nothing going through memory.

Each consumer warpgroup owns a 64 x block_n tile (the running sum and the per-step accumulator take 64
registers per thread each at block_n = 128), K is pipelined through shared memory, and a persistent loop walks
the output tiles. Two variants:
  warp_specialized=False  one warpgroup per block, `plgpu.emit_pipeline` (TMA issued by the same warpgroup)
  warp_specialized=True   two consumer warpgroups (128 x block_n per block, sharing each b tile) and a
                          producer warpgroup issuing the TMA loads (`plgpu.emit_pipeline_warp_specialized`)
Not tuned. Correctness is checked on CPU in Mosaic GPU's interpret mode (with b stored [K, N], as the
interpreter cannot transpose shared-memory refs), lowering for CUDA on CPU, and on H100 by bench/fp8_matmul.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHUNK = 128   # K step: one e4m3 swizzle group (128 bytes), and DeepSeek's promotion interval


def _num_sms() -> int:
  dev = jax.devices()[0]
  return (getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132   # 132: H100 SXM


def blockwise_gemm(a_MK, sa_Mc, b_NK, sb_cN, *, out_dtype=jnp.bfloat16, block_n: int = 128,
                   max_concurrent_steps: int = 4, warp_specialized: bool = True, interpret=None):
  """e4m3 a [M, K], b [N, K] (b [K, N] under `interpret`), fp32 scales sa [M, K/128], sb [K/128, N] -> [M, N].

  M, N, K must be multiples of `tile_m(warp_specialized)`, block_n and 128 (fp8._mgpu_matmul pads).
  """
  if warp_specialized:
    return _gemm_ws(a_MK, sa_Mc, b_NK, sb_cN, out_dtype, block_n, max_concurrent_steps, interpret)
  return _gemm_simple(a_MK, sa_Mc, b_NK, sb_cN, out_dtype, block_n, max_concurrent_steps, interpret)


WG_M = 64   # rows per consumer warpgroup


def tile_m(warp_specialized: bool) -> int:
  return 2 * WG_M if warp_specialized else WG_M


def _shapes(a_MK, b_NK, sa_Mc, sb_cN, block_m, block_n, interpret):
  """Checks the tiling; regroups the scales by output tile, so that each tile's pipeline reads one contiguous
  row of scales per K step: sa [M tiles, K chunks, block_m], sb [N tiles, K chunks, block_n]."""
  M, K = a_MK.shape
  N = b_NK.shape[1] if interpret is not None else b_NK.shape[0]
  if M % block_m or N % block_n or K % CHUNK:
    raise ValueError(f"blockwise_gemm: M={M}, N={N}, K={K} must be multiples of {block_m}, {block_n}, {CHUNK}")
  n_c, m_t, n_t = K // CHUNK, M // block_m, N // block_n
  sa_tcm = sa_Mc.T.reshape(n_c, m_t, block_m).transpose(1, 0, 2)
  sb_tcn = sb_cN.reshape(n_c, n_t, block_n).transpose(1, 0, 2)
  return (M, N, n_c, m_t, n_t), sa_tcm, sb_tcn


def _scaled_step(a_smem, b_smem, sa, sb, acc, k_major_b: bool):
  """acc + (a @ b) * sa[:, None] * sb[None, :] for one 128-deep K chunk, the product in a fresh accumulator."""
  def mma(p_ref):
    plgpu.wgmma(p_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)) if k_major_b else b_smem)
    return p_ref[...]
  p = pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))
  return acc + p * lax.broadcast_in_dim(sa, p.shape, [0]) * lax.broadcast_in_dim(sb, p.shape, [1])


def _zeros(shape, interpret):
  acc = jnp.zeros(shape, jnp.float32)
  return acc if interpret is not None else plgpu.layout_cast(acc, plgpu.Layout.WGMMA)  # no interpreter rule


def _b_spec(block_n, ni, k_major_b):
  if k_major_b:
    return plgpu.BlockSpec((block_n, CHUNK), lambda c: (ni, c))
  return plgpu.BlockSpec((CHUNK, block_n), lambda c: (c, ni))


def _gemm_simple(a_MK, sa_Mc, b_NK, sb_cN, out_dtype, block_n, max_concurrent_steps, interpret):
  block_m = WG_M
  (M, N, n_c, m_t, n_t), sa_tcm, sb_tcn = _shapes(a_MK, b_NK, sa_Mc, sb_cN, block_m, block_n, interpret)
  k_major_b = interpret is None
  def body(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem):
    @plgpu.nd_loop((m_t * n_t,), collective_axes="sm")
    def _tile(info):
      (t,) = info.index
      mi, ni = lax.div(t, n_t), lax.rem(t, n_t)

      def step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
        return _scaled_step(a_smem, b_smem, sa_smem[0], sb_smem[0], acc, k_major_b)

      acc = plgpu.emit_pipeline(
          step, grid=(n_c,), max_concurrent_steps=max_concurrent_steps,
          init_carry=_zeros((block_m, block_n), interpret),
          in_specs=[plgpu.BlockSpec((block_m, CHUNK), lambda c: (mi, c)), _b_spec(block_n, ni, k_major_b),
                    plgpu.BlockSpec((1, block_m), lambda c: (c, 0)),
                    plgpu.BlockSpec((1, block_n), lambda c: (c, 0))],
      )(a_gmem, b_gmem, sa_gmem.at[mi], sb_gmem.at[ni])

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), out_dtype))
      def _store(o_smem):
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * block_m, block_m), pl.ds(ni * block_n, block_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
      grid=(min(_num_sms(), m_t * n_t) if interpret is None else 1,), grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret)
  return kernel(a_MK, b_NK, sa_tcm, sb_tcn)


def _gemm_ws(a_MK, sa_Mc, b_NK, sb_cN, out_dtype, block_n, max_concurrent_steps, interpret):
  block_m = 2 * WG_M
  (M, N, n_c, m_t, n_t), sa_tcm, sb_tcn = _shapes(a_MK, b_NK, sa_Mc, sb_cN, block_m, block_n, interpret)
  k_major_b = interpret is None

  def body(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem):
    def pipeline(step, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          step, grid=(n_c,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
          max_concurrent_steps=max_concurrent_steps, compute_context=compute_context,
          in_specs=[plgpu.BlockSpec((block_m, CHUNK), lambda c: (0, c)), _b_spec(block_n, 0, k_major_b),
                    plgpu.BlockSpec((1, block_m), lambda c: (c, 0)),
                    plgpu.BlockSpec((1, block_n), lambda c: (c, 0))])

    def tile_args(mi, ni):
      b_tile = b_gmem.at[pl.ds(ni * block_n, block_n)] if k_major_b else b_gmem.at[:, pl.ds(ni * block_n, block_n)]
      return a_gmem.at[pl.ds(mi * block_m, block_m)], b_tile, sa_gmem.at[mi], sb_gmem.at[ni]

    ignore = lambda *_, **__: None
    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(*tile_args(0, 0)),
                       o_smem=plgpu.SMEM((2, WG_M, block_n), out_dtype), collective_axes="wg")
    def _scope(allocs, o_smem):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * WG_M, WG_M)            # this consumer warpgroup's half of the block's rows

      @plgpu.nd_loop((m_t * n_t,), collective_axes="sm")
      def _tile(info):
        (t,) = info.index
        mi, ni = lax.div(t, n_t), lax.rem(t, n_t)

        def step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
          return _scaled_step(a_smem.at[rows], b_smem, sa_smem[0, rows], sb_smem[0], acc, k_major_b)

        def compute(run):
          acc = run(_zeros((WG_M, block_n), interpret))
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # o_smem free again (previous tile's store)
          o_smem[wg] = acc.astype(out_dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              o_smem.at[wg], o_gmem.at[pl.ds(mi * block_m + wg * WG_M, WG_M), pl.ds(ni * block_n, block_n)])

        pipeline(step, compute)(*tile_args(mi, ni), allocations=allocs)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
      grid=(min(_num_sms(), m_t * n_t) if interpret is None else 1,), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret)
  return kernel(a_MK, b_NK, sa_tcm, sb_tcn)
