"""FP8 (e4m3) linear layers with DeepSeek-V3's fine-grained scaling (report section 3.3, spec section 7).

Every GEMM of a Linear layer y = x w, forward (fprop), input gradient (dgrad: dx = dy w^T) and weight gradient
(wgrad: dw = x^T dy), runs on e4m3 operands. Each operand is scaled per tile with an fp32 scale taken from the
tile's online max-abs (no delayed scaling, no state): q = e4m3(x / s), s = amax / 448, x ~= q * s.
A tile is (rows, cols) of the operand as stored (x_MK, w_KN, dy_MN); -1 means the whole dimension.

  recipe       fprop x / w            dgrad dy / w            wgrad x / dy
  blockwise    1x128 / 128x128        1x128 / 128x128         128x1 / 128x1   (DeepSeek-V3)
  rowwise      1xK   / Kx1            1xN   / 1xN             Mx1   / Mx1
  tensorwise   MxK   / KxN            MxN   / KxN             MxK   / MxN

Scales are constant along each 128-wide chunk of the contraction dim, so a GEMM is a sum over chunks c of
(q_a[:, c] @ q_b[c, :]) * s_a[:, c] * s_b[c, :], with each chunk's exact e4m3 products summed in fp32: the
"promotion to fp32 every 128 elements of K" of the report. For rowwise and tensorwise there is one chunk.

Three ways to run the products (`gemm`, from ModelConfig.fp8_gemm):
  "f8"   the e4m3 operands go into lax.dot_general (preferred_element_type=float32), one batched dot over the
         K chunks, then the scales and the sum over chunks in fp32. On Ada/Hopper XLA lowers f8 dots to
         cuBLASLt (`__cublas$lt$matmul$f8`); on CPU XLA upcasts them (exact, slow). With 128-wide chunks the
         per-chunk fp32 partial sums go through memory ([K/128, M, N] floats), which costs far more than the
         GEMM itself: only a kernel that keeps the partial sums in registers (DeepGEMM-style) is fast.
  "mgpu" a Pallas Mosaic-GPU kernel for Hopper (kernels/fp8_gemm.py): e4m3 WGMMAs, each 128-deep K step scaled
         and added to an fp32 sum in registers (the DeepSeek/DeepGEMM scheme). Any recipe; operands padded
         to its 128 x 128 x 128 tiles.
  "qdq"  quantize, dequantize to the operand dtype, ordinary GEMM: the same numbers up to the rounding of
         q * s to that dtype (2^-9 relative in bf16, far below e4m3's 2^-4 step), at bf16 GEMM speed.
         Also the path for the routed experts' grouped matmul (`fp8_gmm`), until a grouped FP8 kernel exists.

Kept in higher precision (callers simply do not use these functions there): embedding, output head, router gate,
norms, attention softmax(QK^T)V, the MTP projection; master weights and the optimizer stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0          # largest finite e4m3fn value
BLOCK = 128               # DeepSeek's tile edge and fp32 promotion interval
Tile = tuple[int, int]    # (rows, cols); -1 = the whole dimension


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Scaling tiles of each operand of the three GEMMs of y = x w, given on the operand as stored."""
  x: Tile       # x_MK  in fprop  y = x w
  w: Tile       # w_KN  in fprop
  dy: Tile      # dy_MN in dgrad  dx = dy w^T
  w_t: Tile     # w_KN  in dgrad
  x_t: Tile     # x_MK  in wgrad  dw = x^T dy
  dy_t: Tile    # dy_MN in wgrad


RECIPES = {
    "blockwise": Recipe(x=(1, BLOCK), w=(BLOCK, BLOCK), dy=(1, BLOCK), w_t=(BLOCK, BLOCK),
                        x_t=(BLOCK, 1), dy_t=(BLOCK, 1)),
    "rowwise": Recipe(x=(1, -1), w=(-1, 1), dy=(1, -1), w_t=(1, -1), x_t=(-1, 1), dy_t=(-1, 1)),
    "tensorwise": Recipe(x=(-1, -1), w=(-1, -1), dy=(-1, -1), w_t=(-1, -1), x_t=(-1, -1), dy_t=(-1, -1)),
}
GEMMS = ("f8", "qdq", "mgpu")


def _check(recipe: str, gemm: str):
  if recipe not in RECIPES:
    raise ValueError(f"fp8 recipe {recipe!r} is not one of {tuple(RECIPES)}")
  if gemm not in GEMMS:
    raise ValueError(f"fp8 gemm {gemm!r} is not one of {GEMMS}")


# Quantization ------------------------------------------------------------------------------------------

def _resolve(tile: Tile, shape: tuple[int, int]) -> Tile:
  return tuple(n if t == -1 else t for t, n in zip(tile, shape))


def _transpose(tile: Tile) -> Tile:
  return tile[1], tile[0]


def quantize(x_RC, tile: Tile):
  """-> (q_RC e4m3, scale_rc float32 [ceil(R/tr), ceil(C/tc)]) with x ~= q * scale per tile.

  Ragged edge tiles are zero-padded for the max-abs (as in DeepSeek's checkpoints). Values saturate at +-448;
  an all-zero tile gets scale 1.
  """
  (R, C), (tr, tc) = x_RC.shape, _resolve(tile, x_RC.shape)
  r, c = -(-R // tr), -(-C // tc)
  x_rtct = jnp.pad(x_RC.astype(jnp.float32), ((0, r * tr - R), (0, c * tc - C))).reshape(r, tr, c, tc)
  amax_rc = jnp.max(jnp.abs(x_rtct), axis=(1, 3))
  scale_rc = jnp.where(amax_rc > 0, amax_rc / E4M3_MAX, 1.0)
  q_rtct = jnp.clip(x_rtct / scale_rc[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
  return q_rtct.reshape(r * tr, c * tc)[:R, :C], scale_rc


def expand_scale(scale_rc, tile: Tile, shape: tuple[int, int]):
  """Per-tile scales [r, c] -> per-element [R, C]."""
  tr, tc = _resolve(tile, shape)
  return jnp.repeat(jnp.repeat(scale_rc, tr, axis=0), tc, axis=1)[:shape[0], :shape[1]]


def dequantize(q_RC, scale_rc, tile: Tile, dtype=jnp.float32):
  return (q_RC.astype(jnp.float32) * expand_scale(scale_rc, tile, q_RC.shape)).astype(dtype)


def qdq(x_RC, tile: Tile):
  """Quantize-dequantize: x rounded to e4m3 on its tiles' scales, in x's dtype."""
  return dequantize(*quantize(x_RC, tile), tile, x_RC.dtype)


# One scaled GEMM ---------------------------------------------------------------------------------------

def scaled_matmul(a_MK, a_tile: Tile, b_KN, b_tile: Tile, gemm: str, out_dtype=jnp.float32):
  """a @ b with both operands quantized on their tiles, accumulated in fp32 -> [M, N] in out_dtype."""
  (M, K), N = a_MK.shape, b_KN.shape[1]
  qa_MK, sa_mk = quantize(a_MK, a_tile)
  qb_KN, sb_kn = quantize(b_KN, b_tile)
  if gemm == "qdq":
    dt = jnp.promote_types(a_MK.dtype, b_KN.dtype)
    return jnp.dot(dequantize(qa_MK, sa_mk, a_tile, dt), dequantize(qb_KN, sb_kn, b_tile, dt),
                   preferred_element_type=jnp.float32).astype(out_dtype)
  chunk = _resolve(a_tile, a_MK.shape)[1]
  assert chunk == _resolve(b_tile, b_KN.shape)[0], (a_tile, b_tile, a_MK.shape, b_KN.shape)
  # Scales per row of a and per column of b, for each K chunk c.
  sa_Mc = jnp.repeat(sa_mk, _resolve(a_tile, a_MK.shape)[0], axis=0)[:M]
  sb_cN = jnp.repeat(sb_kn, _resolve(b_tile, b_KN.shape)[1], axis=1)[:, :N]
  n_c = sa_mk.shape[1]
  if gemm == "mgpu":
    return _mgpu_matmul(qa_MK, sa_Mc, qb_KN, sb_cN, out_dtype)
  if n_c == 1:   # one chunk: a single f8 GEMM, scales applied to its fp32 output
    p_MN = jax.lax.dot(qa_MK, qb_KN, preferred_element_type=jnp.float32)
    return (p_MN * sa_Mc * sb_cN).astype(out_dtype)
  pad = n_c * chunk - K                   # zeros contribute nothing to any chunk
  qa_cMk = jnp.pad(qa_MK, ((0, 0), (0, pad))).reshape(M, n_c, chunk).transpose(1, 0, 2)
  qb_ckN = jnp.pad(qb_KN, ((0, pad), (0, 0))).reshape(n_c, chunk, N)
  p_cMN = jax.lax.dot_general(qa_cMk, qb_ckN, (((2,), (1,)), ((0,), (0,))),
                              preferred_element_type=jnp.float32)
  return jnp.sum(p_cMN * sa_Mc.T[:, :, None] * sb_cN[:, None, :], axis=0).astype(out_dtype)


def _mgpu_matmul(qa_MK, sa_Mc, qb_KN, sb_cN, out_dtype, block_n: int = 128):
  """The Hopper kernel (kernels/fp8_gemm.py): operands zero-padded to its tiles, b handed over K-major ([N, K])."""
  from deepseek_jax.kernels import fp8_gemm as fp8_gemm_mgpu   # Pallas Mosaic GPU, imported only when used
  (M, K), N = qa_MK.shape, qb_KN.shape[1]
  block_m = fp8_gemm_mgpu.tile_m(warp_specialized=True)
  up = lambda n, m: -(-n // m) * m
  Mp, Np, Kp = up(M, block_m), up(N, block_n), up(K, BLOCK)
  n_c = Kp // BLOCK
  sa_Mc = jnp.broadcast_to(sa_Mc, (M, n_c)) if sa_Mc.shape[1] == 1 else sa_Mc   # one scale over all of K
  sb_cN = jnp.broadcast_to(sb_cN, (n_c, N)) if sb_cN.shape[0] == 1 else sb_cN
  qa_MK = jnp.pad(qa_MK, ((0, Mp - M), (0, Kp - K)))
  qb_NK = jnp.pad(qb_KN, ((0, Kp - K), (0, Np - N))).T
  out = fp8_gemm_mgpu.blockwise_gemm(qa_MK, jnp.pad(sa_Mc, ((0, Mp - M), (0, 0))), qb_NK,
                                     jnp.pad(sb_cN, ((0, 0), (0, Np - N))), out_dtype=out_dtype,
                                     block_n=block_n)
  return out[:M, :N]


# Dense linear ------------------------------------------------------------------------------------------

def fp8_dot(x, w_KN, recipe: str = "blockwise", gemm: str = "f8"):
  """x [..., K] @ w [K, N] -> [..., N] in x's dtype, with all three GEMMs in FP8 (see module docstring)."""
  _check(recipe, gemm)
  lead = x.shape[:-1]
  y_MN = _fp8_matmul(x.reshape(-1, x.shape[-1]), w_KN.astype(x.dtype), recipe, gemm)
  return y_MN.reshape(*lead, w_KN.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fp8_matmul(x_MK, w_KN, recipe, gemm):
  r = RECIPES[recipe]
  return scaled_matmul(x_MK, r.x, w_KN, r.w, gemm, x_MK.dtype)


def _fp8_matmul_fwd(x_MK, w_KN, recipe, gemm):
  return _fp8_matmul(x_MK, w_KN, recipe, gemm), (x_MK, w_KN)


def _fp8_matmul_bwd(recipe, gemm, res, dy_MN):
  x_MK, w_KN = res
  r = RECIPES[recipe]
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = scaled_matmul(dy_MN, r.dy, w_KN.T, _transpose(r.w_t), gemm, x_MK.dtype)
  dw_KN = scaled_matmul(x_MK.T, _transpose(r.x_t), dy_MN, r.dy_t, gemm, w_KN.dtype)
  return dx_MK, dw_KN


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def project(x, w, n_in: int = 1, fp8: str = "none", fp8_gemm: str = "f8"):
  """A Linear layer in x's dtype: contracts the last `n_in` dims of x with the first `n_in` dims of w.

  fp8 = "none": a plain tensordot. Otherwise the weight is viewed as [K, N] (row-major flattening, so the
  128x128 blocks are those of the Hugging Face [out, in] weight, transposed) and the product is fp8_dot.
  """
  w = w.astype(x.dtype)
  if fp8 == "none":
    return jnp.tensordot(x, w, axes=n_in)
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  assert x.shape[x.ndim - n_in:] == in_shape, (x.shape, w.shape, n_in)
  K = math.prod(in_shape)
  x_MK = x.reshape(*x.shape[:x.ndim - n_in], K)
  y = fp8_dot(x_MK, w.reshape(K, -1), fp8, fp8_gemm)
  return y.reshape(*y.shape[:-1], *out_shape)


# Grouped linear (routed experts) -----------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def qdq_ste(x_RC, tile: Tile):
  """qdq in the forward; the gradient passes straight through (the rounding has no useful derivative)."""
  return qdq(x_RC, tile)


qdq_ste.defvjp(lambda x, tile: (qdq(x, tile), None), lambda tile, _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def qdq_grad(y_RC, tile: Tile):
  """Identity in the forward; the incoming gradient is rounded to e4m3 on `tile` (the dy of the GEMMs)."""
  return y_RC


qdq_grad.defvjp(lambda y, tile: (y, None), lambda tile, _, g: (qdq(g, tile),))


def fp8_gmm(x_MK, w_GKN, gs_G, recipe: str, gmm_fn: Callable):
  """Grouped x [M, K] @ w[g] [K, N] through `gmm_fn(x, w, gs)` (any differentiable grouped matmul, e.g.
  kernels.grouped_matmul.gmm, so it runs inside the expert-parallel shard_map) with FP8 numerics in all three
  GEMMs: x on 1x128 tiles and each expert's weight on 128x128 blocks in the forward, dy on 1x128 tiles in
  both backward GEMMs (which reuse the quantized x and w).

  Quantize-dequantize around the bf16 kernels: DeepSeek's rounding at bf16 speed (no grouped FP8 kernel yet).
  One difference from DeepSeek: the wgrad reuses x quantized on 1x128 tiles (DeepSeek requantizes x^T per
  128x1)."""
  _check(recipe, "qdq")
  r = RECIPES[recipe]
  x_q = qdq_ste(x_MK, r.x)
  w_q = jax.vmap(qdq_ste, in_axes=(0, None))(w_GKN.astype(x_MK.dtype), r.w)
  return qdq_grad(gmm_fn(x_q, w_q, gs_G), r.dy)


# Hardware ----------------------------------------------------------------------------------------------

def check_devices(fp8: str, fp8_gemm: str, devices) -> None:
  """Raises a one-line ValueError when the FP8 GEMMs asked for cannot run on `devices`.

  "f8" needs FP8 tensor cores (sm >= 8.9): elsewhere XLA would upcast the e4m3 operands and run the GEMM at
  bf16/fp32 speed without a word. "mgpu" needs Hopper (sm 9.x: WGMMA). "qdq" is an explicit emulation and
  runs anywhere.
  """
  if fp8 == "none" or fp8_gemm == "qdq":
    return
  for d in devices:
    cc = str(getattr(d, "compute_capability", "")) if d.platform == "gpu" else ""
    major, _, minor = cc.partition(".")
    sm = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (0, 0)
    ok = sm[0] == 9 if fp8_gemm == "mgpu" else sm >= (8, 9)
    if not ok:
      need = "Hopper GPUs (compute capability 9.x)" if fp8_gemm == "mgpu" else \
          "FP8 GPUs (compute capability >= 8.9, Ada/Hopper or later)"
      raise ValueError(f"model.fp8={fp8!r} with model.fp8_gemm={fp8_gemm!r} needs {need}, got {d.platform} "
                       f"{d.device_kind!r}{' sm ' + cc if cc else ''}; set model.fp8_gemm=qdq to emulate FP8 numerics")
