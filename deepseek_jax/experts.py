"""Routed-expert math on one device: sort assignments by expert, run the expert FFNs, combine.

Plain functions of arrays, shared by the single-device path (moe.py) and the per-device body of expert
parallelism (sharding/expert_parallel.py). Letters: T tokens, k experts per token, M = T*k assignments,
E experts, C capacity slots per expert, D model width, F expert hidden width.

Three ways to run the experts (ModelConfig.moe_impl, capacity_factor):
  dense     every expert on every token, combined with a dense [T, E] matrix: the test oracle.
  dropless  assignments sorted by expert, one grouped matmul per projection (kernels.grouped_matmul.gmm).
  capacity  a fixed [E, C, D] buffer (C = ceil(cf * T * k / E)); an expert's assignments past C are dropped.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax import fp8 as fp8_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.grouped_matmul import GmmTiles, gmm


class ExpertOrder(NamedTuple):
  """The T*k assignments sorted by expert (stable, so ties keep token order)."""
  order_M: jnp.ndarray        # index into the flattened [T*k] assignments (token = order // k)
  inverse_M: jnp.ndarray      # inverse permutation: sorted position of each flattened assignment
  expert_M: jnp.ndarray       # expert of each sorted assignment
  rank_M: jnp.ndarray         # position of the assignment within its expert's group
  group_sizes_E: jnp.ndarray  # assignments per expert


def sort_by_expert(idx_Tk, n_experts: int) -> ExpertOrder:
  flat_M = idx_Tk.reshape(-1)
  M = flat_M.shape[0]
  order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
  inverse_M = jnp.zeros((M,), jnp.int32).at[order_M].set(jnp.arange(M, dtype=jnp.int32))
  expert_M = flat_M[order_M]
  group_sizes_E = jnp.bincount(flat_M, length=n_experts).astype(jnp.int32)
  starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  rank_M = jnp.arange(M, dtype=jnp.int32) - starts_E[expert_M]
  return ExpertOrder(order_M, inverse_M, expert_M, rank_M.astype(jnp.int32), group_sizes_E)


def capacity(n_tokens: int, cfg: ModelConfig, n_experts: int | None = None) -> int:
  """Static per-expert slots for the capacity path: ceil(cf * T * k / E)."""
  E = n_experts or cfg.n_routed_experts
  return max(1, math.ceil(cfg.capacity_factor * n_tokens * cfg.n_activated_experts / E))


# The expert FFN (SwiGLU), once for every layout ------------------------------------------------------------

def swiglu(gate, up):
  return jax.nn.silu(gate) * up


def grouped_swiglu(x_MD, sizes_E, w1_EDF, w3_EDF, w2_EFD, impl: str, tiles: GmmTiles = GmmTiles(),
                   fp8: str = "none"):
  """SwiGLU over rows sorted by expert (group e = the next sizes_E[e] rows); rows past sum(sizes) give 0.
  fp8: an FP8 recipe (fp8.RECIPES) for all three grouped GEMMs of each projection, or "none"."""
  dt = x_MD.dtype
  F = w1_EDF.shape[2]
  M = x_MD.shape[0]
  if impl == "mgpu" and M % tiles.block_m:   # the kernel's TMA tiles need whole row blocks: zero rows, last group
    pad = tiles.block_m - M % tiles.block_m
    x_MD, sizes_E = jnp.pad(x_MD, ((0, pad), (0, 0))), sizes_E.at[-1].add(pad)
  kernel = functools.partial(gmm, impl=impl, tiles=tiles)
  matmul = kernel if fp8 == "none" else functools.partial(fp8_lib.fp8_gmm, recipe=fp8, gmm_fn=kernel)
  if tiles.fuse_w13 and impl == "mgpu":
    h_MH = matmul(x_MD, jnp.concatenate([w1_EDF.astype(dt), w3_EDF.astype(dt)], axis=2), sizes_E)
    h_MF = swiglu(h_MH[:, :F], h_MH[:, F:])
  else:
    h_MF = swiglu(matmul(x_MD, w1_EDF.astype(dt), sizes_E), matmul(x_MD, w3_EDF.astype(dt), sizes_E))
  return matmul(h_MF, w2_EFD.astype(dt), sizes_E)[:M]


def batched_swiglu(x_ECD, w1_EDF, w3_EDF, w2_EFD, fp8: str = "none", fp8_gemm: str = "f8"):
  """SwiGLU of a capacity buffer [E, C, D]: one batched matmul per projection (FP8 per expert if asked)."""
  dt = x_ECD.dtype
  if fp8 == "none":
    matmul = lambda x, w: jnp.einsum("ecd,edf->ecf", x, w.astype(dt))
  else:
    matmul = jax.vmap(lambda x, w: fp8_lib.fp8_dot(x, w.astype(dt), fp8, fp8_gemm))
  return matmul(swiglu(matmul(x_ECD, w1_EDF), matmul(x_ECD, w3_EDF)), w2_EFD)


def dense_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD):
  """Reference: every expert on every token, combined with a dense [T, E] weight matrix. Test oracle."""
  T, E = x_TD.shape[0], w1_EDF.shape[0]
  combine_TE = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], idx_Tk].add(w_Tk)
  x_ETD = jnp.broadcast_to(x_TD, (E, *x_TD.shape))
  y_ETD = batched_swiglu(x_ETD, w1_EDF, w3_EDF, w2_EFD)
  return jnp.einsum("etd,te->td", y_ETD.astype(jnp.float32), combine_TE).astype(x_TD.dtype)


# Permutations with gather-only VJPs ------------------------------------------------------------------------

@jax.custom_vjp
def permute_rows(y_MD, perm_M, inv_M):
  """y[perm]; the VJP is the inverse permutation (a gather), not a scatter-add."""
  return y_MD[perm_M]


def _permute_rows_fwd(y_MD, perm_M, inv_M):
  return y_MD[perm_M], (perm_M, inv_M)


def _permute_rows_bwd(res, g_MD):
  _, inv_M = res
  return g_MD[inv_M], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_assignments(x_TD, order_M, inv_M, k: int):
  """x[order // k]: each token's row once per assignment, in expert order. The VJP gathers the k rows of
  every token back (inverse permutation) and sums them, instead of a scatter-add."""
  return x_TD[order_M // k]


def _gather_fwd(x_TD, order_M, inv_M, k):
  return x_TD[order_M // k], (inv_M,)


def _gather_bwd(k, res, g_MD):
  (inv_M,) = res
  T = inv_M.shape[0] // k
  dx_TD = g_MD[inv_M].reshape(T, k, -1).astype(jnp.float32).sum(1).astype(g_MD.dtype)
  return dx_TD, None, None


gather_assignments.defvjp(_gather_fwd, _gather_bwd)


def weighted_sum_k(y_TkD, w_Tk):
  """sum_k w[t, k] * y[t, k, :] in float32. Multiply + reduce, not einsum: XLA turns the einsum into T tiny
  fp32 batched GEMMs (~1 ms per layer on H100)."""
  return jnp.sum(y_TkD.astype(jnp.float32) * w_Tk[:, :, None], axis=1).astype(y_TkD.dtype)


# Single-device routed experts -------------------------------------------------------------------------------

def dropless_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, impl: str, tiles: GmmTiles = GmmTiles(),
                     fp8: str = "none"):
  """Sort the T*k assignments by expert, grouped SwiGLU, unsort, weighted sum over k. Nothing dropped."""
  T, k = idx_Tk.shape
  s = sort_by_expert(idx_Tk, w1_EDF.shape[0])
  x_MD = gather_assignments(x_TD, s.order_M, s.inverse_M, k)
  y_MD = grouped_swiglu(x_MD, s.group_sizes_E, w1_EDF, w3_EDF, w2_EFD, impl, tiles, fp8)
  return weighted_sum_k(permute_rows(y_MD, s.inverse_M, s.order_M).reshape(T, k, -1), w_Tk)


def capacity_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, cfg: ModelConfig):
  """Per-expert buffers of C slots; each expert keeps its first C assignments in token order.
  Returns (y_TD, dropped assignments)."""
  T, k = idx_Tk.shape
  E = w1_EDF.shape[0]
  s = sort_by_expert(idx_Tk, E)
  C = capacity(T, cfg, E)
  keep_M = s.rank_M < C
  slot_M = jnp.where(keep_M, s.rank_M, C)          # C = out of range -> dropped by mode="drop"
  buf_ECD = jnp.zeros((E, C, x_TD.shape[1]), x_TD.dtype)
  buf_ECD = buf_ECD.at[s.expert_M, slot_M].set(gather_assignments(x_TD, s.order_M, s.inverse_M, k), mode="drop")
  out_ECD = batched_swiglu(buf_ECD, w1_EDF, w3_EDF, w2_EFD, cfg.fp8, cfg.fp8_gemm)
  y_MD = out_ECD.at[s.expert_M, slot_M].get(mode="fill", fill_value=0)
  y_TkD = permute_rows(y_MD, s.inverse_M, s.order_M).reshape(T, k, -1)
  return weighted_sum_k(y_TkD, w_Tk), jnp.sum(~keep_M).astype(jnp.int32)
