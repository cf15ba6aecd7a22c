"""DeepSeekMoE: shared + fine-grained routed experts (report Eq. 12-20, spec sections 4-5).

The router and the expert math are plain functions of arrays so that `sharding/expert_parallel.py` can wrap
them in a shard_map; `MoE` only holds the parameters and wires the pieces together.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, RouterBias, param


class Routing(NamedTuple):
  idx_Tk: jnp.ndarray      # int32 chosen experts
  w_Tk: jnp.ndarray        # float32 combine weights (normalized, scaled)
  scores_TE: jnp.ndarray   # float32 affinities s (sigmoid or softmax), before the bias


def route(x_TD, gate_DE, bias_E, cfg: ModelConfig) -> Routing:
  """Scores, group-limited top-k on (scores + bias), weights from the unbiased scores."""
  logits_TE = jnp.dot(x_TD.astype(jnp.float32), gate_DE.astype(jnp.float32))
  if cfg.score_func == "sigmoid":
    scores_TE = jax.nn.sigmoid(logits_TE)
  else:
    scores_TE = jax.nn.softmax(logits_TE, axis=-1)
  choice_TE = scores_TE + bias_E if cfg.router_bias else scores_TE
  G = cfg.n_expert_groups
  if G > 1 and cfg.n_limited_groups < G:
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.reshape(T, G, E // G)
    if cfg.router_bias:   # V3 noaux_tc: a group scores the sum of its two best experts
      group_TG = jax.lax.top_k(grouped_TGe, 2)[0].sum(-1)
    else:                 # V2 group_limited_greedy: a group scores its best expert
      group_TG = grouped_TGe.max(-1)
    _, keep_idx = jax.lax.top_k(group_TG, cfg.n_limited_groups)
    keep_TG = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep_idx].set(True)
    choice_TE = jnp.where(jnp.repeat(keep_TG, E // G, axis=1), choice_TE, -jnp.inf)
  _, idx_Tk = jax.lax.top_k(choice_TE, cfg.n_activated_experts)
  w_Tk = jnp.take_along_axis(scores_TE, idx_Tk, axis=-1)
  if cfg.norm_topk_prob:
    w_Tk = w_Tk / (w_Tk.sum(-1, keepdims=True) + 1e-20)
  return Routing(idx_Tk.astype(jnp.int32), w_Tk * cfg.route_scale, scores_TE)


# Expert math ---------------------------------------------------------------------------------------------

def swiglu(x, w1, w3, w2, eq_in: str, eq_out: str):
  dt = x.dtype
  h = jax.nn.silu(jnp.einsum(eq_in, x, w1.astype(dt))) * jnp.einsum(eq_in, x, w3.astype(dt))
  return jnp.einsum(eq_out, h, w2.astype(dt))


def dense_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD):
  """Reference: every expert on every token, combined with a dense [T, E] weight matrix. Test oracle."""
  E = w1_EDF.shape[0]
  combine_TE = jnp.zeros((x_TD.shape[0], E), jnp.float32).at[jnp.arange(x_TD.shape[0])[:, None], idx_Tk].add(w_Tk)
  y_TED = swiglu(x_TD, w1_EDF, w3_EDF, w2_EFD, "td,edf->tef", "tef,efd->ted")
  return jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), combine_TE).astype(x_TD.dtype)


class Plan(NamedTuple):
  """Assignments (token, slot) sorted by expert. M = T * k."""
  order_M: jnp.ndarray        # index into the flattened [T*k] assignments
  expert_M: jnp.ndarray       # expert of each sorted assignment
  rank_M: jnp.ndarray         # position of the assignment within its expert's group
  group_sizes_E: jnp.ndarray  # assignments per expert


def sort_by_expert(idx_Tk, n_experts: int) -> Plan:
  flat_M = idx_Tk.reshape(-1)
  order_M = jnp.argsort(flat_M, stable=True)
  expert_M = flat_M[order_M]
  group_sizes_E = jnp.bincount(flat_M, length=n_experts).astype(jnp.int32)
  starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  rank_M = jnp.arange(flat_M.shape[0], dtype=jnp.int32) - starts_E[expert_M]
  return Plan(order_M, expert_M, rank_M, group_sizes_E)


def capacity(n_tokens: int, cfg: ModelConfig, n_experts: int | None = None) -> int:
  """Static per-expert slots for the capacity-factor path: ceil(cf * T * k / E)."""
  E = n_experts or cfg.n_routed_experts
  return max(1, math.ceil(cfg.capacity_factor * n_tokens * cfg.n_activated_experts / E))


def grouped_ffn(x_MD, group_sizes_E, w1_EDF, w3_EDF, w2_EFD):
  """Dropless grouped matmul over rows sorted by expert (lax.ragged_dot)."""
  dt = x_MD.dtype
  gate = jax.lax.ragged_dot(x_MD, w1_EDF.astype(dt), group_sizes_E)
  up = jax.lax.ragged_dot(x_MD, w3_EDF.astype(dt), group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w2_EFD.astype(dt), group_sizes_E)


def padded_ffn(x_ECD, w1_EDF, w3_EDF, w2_EFD):
  """Capacity buffer [E, C, D] through a batched matmul per expert."""
  return swiglu(x_ECD, w1_EDF, w3_EDF, w2_EFD, "ecd,edf->ecf", "ecf,efd->ecd")


def local_routed_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, cfg: ModelConfig):
  """Routed experts on one device. Returns (y_TD, dropped assignments)."""
  if cfg.moe_impl == "dense":
    return dense_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD), jnp.zeros((), jnp.int32)
  if cfg.capacity_factor <= 0:   # dropless: a fast grouped matmul where one exists (see grouped_matmul_impl)
    impl = grouped_matmul_impl(x_TD.dtype, *w1_EDF.shape[1:])
    if impl != "xla":
      return sorted_routed_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, impl), jnp.zeros((), jnp.int32)
  T, k = idx_Tk.shape
  plan = sort_by_expert(idx_Tk, w1_EDF.shape[0])
  x_MD = x_TD[plan.order_M // k]
  if cfg.capacity_factor > 0:
    C = capacity(T, cfg)
    keep_M = plan.rank_M < C
    slot_M = jnp.where(keep_M, plan.rank_M, C)          # C = out of range -> dropped by mode="drop"
    buf_ECD = jnp.zeros((w1_EDF.shape[0], C, x_TD.shape[1]), x_TD.dtype)
    buf_ECD = buf_ECD.at[plan.expert_M, slot_M].set(x_MD, mode="drop")
    out_ECD = padded_ffn(buf_ECD, w1_EDF, w3_EDF, w2_EFD)
    y_MD = jnp.where(keep_M[:, None], out_ECD.at[plan.expert_M, slot_M].get(mode="fill", fill_value=0), 0)
    dropped = jnp.sum(~keep_M).astype(jnp.int32)
  else:
    y_MD = grouped_ffn(x_MD, plan.group_sizes_E, w1_EDF, w3_EDF, w2_EFD)
    dropped = jnp.zeros((), jnp.int32)
  return combine(y_MD, plan.order_M, w_Tk), dropped


def combine(y_MD, order_M, w_Tk):
  """Un-sort the expert outputs and take the weighted sum over each token's k experts."""
  T, k = w_Tk.shape
  y_TkD = jnp.zeros_like(y_MD).at[order_M].set(y_MD).reshape(T, k, -1)
  return weighted_sum_k(y_TkD, w_Tk)


def weighted_sum_k(y_TkD, w_Tk):
  """sum_k w[t, k] * y[t, k, :] in float32. Multiply + reduce, not einsum: XLA turns the einsum into T tiny
  fp32 batched GEMMs (~1 ms per layer on H100)."""
  return jnp.sum(y_TkD.astype(jnp.float32) * w_Tk[:, :, None], axis=1).astype(y_TkD.dtype)


# Fast dropless path: sort by expert, grouped matmul with a custom VJP, permutations as gathers -------------
# `grouped_matmul_impl` picks the kernel for the dropless single-device path (local_routed_experts):
#   "mgpu"  Pallas Mosaic-GPU ragged_dot / transposed_ragged_dot (Hopper, bf16/f16): ~10x lax.ragged_dot on H100
#   "ref"   the same custom-VJP structure on lax.ragged_dot / ragged_dot_general (CPU tests of the VJP)
#   "xla"   moe.grouped_ffn (lax.ragged_dot, autodiff), the original path
# GROUPED_MATMUL = "auto" takes "mgpu" where it can run and "xla" elsewhere. Override with the environment
# variable DEEPSEEK_JAX_GROUPED_MATMUL or by assigning the module attribute before tracing.
GROUPED_MATMUL = os.environ.get("DEEPSEEK_JAX_GROUPED_MATMUL", "auto")
# Tile shapes of the Mosaic-GPU kernels (forward / input-gradient kernel, and weight-gradient kernel).
# Measured on H100, bench shapes (M = 98304, D = 1536, F = 768, 64 experts), MoE layer fwd+bwd: these 7.40 ms;
# grid_block_n=1 8.58 ms; block_n=192 7.56 ms; weight-gradient tiles (128, 128, 128, 3, 1) 7.64 ms.
MGPU_GMM_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=2)
MGPU_TGMM_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
MGPU_FUSE_W13 = True   # one [E, D, 2F] gate|up matmul instead of two [E, D, F] ones


def _is_hopper() -> bool:
  try:
    devs = jax.devices()
  except RuntimeError:
    return False
  return bool(devs) and all(d.platform == "gpu" and str(getattr(d, "compute_capability", "")) == "9.0"
                            for d in devs)


def grouped_matmul_impl(dtype, dim: int, inter_dim: int) -> str:
  """The grouped-matmul implementation the dropless path uses for these shapes (see GROUPED_MATMUL)."""
  impl = GROUPED_MATMUL
  if impl != "auto":
    return impl
  tiles_ok = all(n % 128 == 0 for n in (dim, inter_dim))
  if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and tiles_ok and _is_hopper():
    return "mgpu"
  return "xla"


def _gmm_fwd_kernel(x_MK, w_GKN, gs_G, impl: str, transpose_rhs: bool = False):
  """[M, K] x [G, K, N] (or [G, N, K] transposed) -> [M, N], rows grouped by gs (sum(gs) == M)."""
  if impl == "mgpu":
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(x_MK, w_GKN, group_sizes=gs_G, transpose_rhs=transpose_rhs,
                                      **MGPU_GMM_BLOCKS)
  w = jnp.swapaxes(w_GKN, 1, 2) if transpose_rhs else w_GKN
  return jax.lax.ragged_dot(x_MK, w, gs_G, preferred_element_type=jnp.float32).astype(x_MK.dtype)


def _gmm_weight_grad_kernel(x_MK, dy_MN, gs_G, impl: str):
  """sum over each group's rows of x^T dy -> [G, K, N]."""
  if impl == "mgpu":
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(x_MK, dy_MN, group_sizes=gs_G, **MGPU_TGMM_BLOCKS)
  dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                         lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return jax.lax.ragged_dot_general(x_MK, dy_MN, gs_G, dn,
                                    preferred_element_type=jnp.float32).astype(x_MK.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(x_MK, w_GKN, gs_G, impl: str):
  """Grouped matmul with an explicit VJP: dx = dy w^T (grouped), dw = grouped x^T dy."""
  return _gmm_fwd_kernel(x_MK, w_GKN, gs_G, impl)


def _gmm_fwd(x_MK, w_GKN, gs_G, impl):
  return _gmm_fwd_kernel(x_MK, w_GKN, gs_G, impl), (x_MK, w_GKN, gs_G)


def _gmm_bwd(impl, res, dy_MN):
  x_MK, w_GKN, gs_G = res
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = _gmm_fwd_kernel(dy_MN, w_GKN, gs_G, impl, transpose_rhs=True)
  dw_GKN = _gmm_weight_grad_kernel(x_MK, dy_MN, gs_G, impl)
  return dx_MK, dw_GKN.astype(w_GKN.dtype), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def fast_grouped_ffn(x_MD, group_sizes_E, w1_EDF, w3_EDF, w2_EFD, impl: str):
  """SwiGLU over rows sorted by expert through `gmm` (sum(group_sizes) must equal M)."""
  dt = x_MD.dtype
  F = w1_EDF.shape[2]
  if MGPU_FUSE_W13:
    w13_EDH = jnp.concatenate([w1_EDF.astype(dt), w3_EDF.astype(dt)], axis=2)
    h_MH = gmm(x_MD, w13_EDH, group_sizes_E, impl)
    gate, up = h_MH[:, :F], h_MH[:, F:]
  else:
    gate = gmm(x_MD, w1_EDF.astype(dt), group_sizes_E, impl)
    up = gmm(x_MD, w3_EDF.astype(dt), group_sizes_E, impl)
  return gmm(jax.nn.silu(gate) * up, w2_EFD.astype(dt), group_sizes_E, impl)


@jax.custom_vjp
def _permute_rows(y_MD, perm_M, inv_M):
  """y[perm]; the VJP is the inverse permutation (a gather), not a scatter-add."""
  return y_MD[perm_M]


def _permute_rows_fwd(y_MD, perm_M, inv_M):
  return y_MD[perm_M], (perm_M, inv_M)


def _permute_rows_bwd(res, g_MD):
  perm_M, inv_M = res
  return g_MD[inv_M], None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch_rows(x_TD, order_M, inv_M, k: int):
  """x[order // k]: each token's row once per assignment, in expert order. The VJP gathers the k rows of
  every token back (inverse permutation) and sums them, instead of a scatter-add."""
  return x_TD[order_M // k]


def _dispatch_rows_fwd(x_TD, order_M, inv_M, k):
  return x_TD[order_M // k], (inv_M,)


def _dispatch_rows_bwd(k, res, g_MD):
  (inv_M,) = res
  T = inv_M.shape[0] // k
  dx_TD = g_MD[inv_M].reshape(T, k, -1).astype(jnp.float32).sum(1).astype(g_MD.dtype)
  return dx_TD, None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


def sorted_routed_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, impl: str):
  """Dropless routed experts: sort the T*k assignments by expert, one grouped matmul per projection, unsort
  and combine. Same result as the "grouped" path of local_routed_experts, nothing dropped."""
  T, k = idx_Tk.shape
  M = T * k
  plan = sort_by_expert(idx_Tk, w1_EDF.shape[0])
  order_M = plan.order_M.astype(jnp.int32)
  inv_M = jnp.zeros((M,), jnp.int32).at[order_M].set(jnp.arange(M, dtype=jnp.int32))
  x_MD = _dispatch_rows(x_TD, order_M, inv_M, k)
  y_MD = fast_grouped_ffn(x_MD, plan.group_sizes_E, w1_EDF, w3_EDF, w2_EFD, impl)
  y_TkD = _permute_rows(y_MD, inv_M, order_M).reshape(T, k, -1)
  return weighted_sum_k(y_TkD, w_Tk)


# Balancing -----------------------------------------------------------------------------------------------

def expert_counts(idx_BSk, mask_BS, n_experts: int):
  """Assignments per expert per sequence, padding excluded: float32 [B, E]."""
  onehot_BSkE = jax.nn.one_hot(idx_BSk, n_experts, dtype=jnp.float32)
  return jnp.einsum("bske,bs->be", onehot_BSkE, mask_BS.astype(jnp.float32))


def seq_aux_loss(scores_BSE, counts_BE, mask_BS, cfg: ModelConfig):
  """L_Bal = alpha * sum_i f_i P_i per sequence, averaged over sequences (report Eq. 17-20)."""
  E, k = cfg.n_routed_experts, cfg.n_activated_experts
  n_B = jnp.maximum(mask_BS.sum(-1).astype(jnp.float32), 1.0)
  norm_BSE = scores_BSE / scores_BSE.sum(-1, keepdims=True)     # s' (identity for softmax scores)
  f_BE = counts_BE * (E / k) / n_B[:, None]
  p_BE = jnp.einsum("bse,bs->be", norm_BSE, mask_BS.astype(jnp.float32)) / n_B[:, None]
  return cfg.seq_aux_alpha * jnp.mean(jnp.sum(f_BE * p_BE, -1))


def update_router_bias(bias_E, load_E, gamma: float):
  """Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i) (overloaded experts go down)."""
  return bias_E + gamma * jnp.sign(jnp.mean(load_E) - load_E)


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    E, D, F, std = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.init_std
    self.gate = param(rngs, (D, E), ("embed", None), std)
    self.bias = RouterBias(jnp.zeros((E,), jnp.float32), axes=(None,))
    self.w1 = param(rngs, (E, D, F), ("expert", "embed", "moe_mlp"), std)
    self.w3 = param(rngs, (E, D, F), ("expert", "embed", "moe_mlp"), std)
    self.w2 = param(rngs, (E, F, D), ("expert", "moe_mlp", "embed"), std)
    self.shared_experts = MLP(cfg, cfg.n_shared_experts * F, rngs=rngs) if cfg.n_shared_experts else None

  def __call__(self, x_BSD, mask_BS):
    from sharding.expert_parallel import routed_experts  # sharding depends on this module, not vice versa
    cfg = self.cfg
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    r = route(x_TD, self.gate[...], self.bias[...], cfg)
    y_TD, dropped = routed_experts(x_TD, r.idx_Tk, r.w_Tk, self.w1[...], self.w3[...], self.w2[...], cfg)
    y_BSD = y_TD.reshape(B, S, D)
    if self.shared_experts is not None:
      y_BSD = y_BSD + self.shared_experts(x_BSD)
    counts_BE = expert_counts(r.idx_Tk.reshape(B, S, -1), mask_BS, cfg.n_routed_experts)
    stats = {"load": counts_BE.sum(0), "dropped": dropped,
             "aux_loss": seq_aux_loss(r.scores_TE.reshape(B, S, -1), counts_BE, mask_BS, cfg)}
    return y_BSD, stats
