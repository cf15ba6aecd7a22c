"""DeepSeekMoE: shared + fine-grained routed experts (report Eq. 12-20, spec sections 4-5).

The router, the balancing statistics and `routed_experts` (the one place that picks how the routed experts
run) are plain functions of arrays; `MoE` holds the parameters and wires the pieces together. The per-device
expert math is in experts.py, the expert-parallel shard_map in sharding/expert_parallel.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import experts
from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.grouped_matmul import resolve_impl
from deepseek_jax.layers import MLP, RouterBias, param
from sharding import expert_parallel
from sharding.rules import constrain, current_mesh


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


# How the routed experts run: decided here and nowhere else -------------------------------------------

def routed_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, cfg: ModelConfig):
  """{dense oracle, dropless, capacity} x {one device, expert-parallel over the current mesh}.

  dense: left to the compiler on any mesh (the oracle). Otherwise, with a mesh set (jax.set_mesh), the
  expert-parallel shard_map; without one, the same per-device math on all tokens. Dropless runs the
  grouped matmul cfg.gmm_impl resolves to. Returns (y_TD, dropped assignments).
  """
  no_drops = jnp.zeros((), jnp.int32)
  if cfg.moe_impl == "dense":
    return experts.dense_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD), no_drops
  impl = resolve_impl(cfg.gmm_impl, x_TD.dtype, *w1_EDF.shape[1:])
  mesh = current_mesh()
  if mesh is not None:
    return expert_parallel.routed_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, cfg, impl, mesh)
  if cfg.capacity_factor > 0:
    return experts.capacity_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, cfg)
  y_TD = experts.dropless_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, impl, cfg.gmm_tiles, cfg.fp8)
  return y_TD, no_drops


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
  """Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i) (overloaded experts go down).
  Works on one layer [E] or a stack of layers [L, E]."""
  return bias_E + gamma * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    E, D, F, std = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.init_std
    self.gate = param(rngs, (D, E), ("embed", None), std)
    self.bias = RouterBias(jnp.zeros((E,), jnp.float32), axes=(None,))
    self.w1 = param(rngs, (E, D, F), expert_parallel.W_IN_NAMES, std)
    self.w3 = param(rngs, (E, D, F), expert_parallel.W_IN_NAMES, std)
    self.w2 = param(rngs, (E, F, D), expert_parallel.W_OUT_NAMES, std)
    self.shared_experts = MLP(cfg, cfg.n_shared_experts * F, rngs=rngs) if cfg.n_shared_experts else None

  def __call__(self, x_BSD, mask_BS):
    cfg = self.cfg
    B, S, D = x_BSD.shape
    x_TD = constrain(x_BSD.reshape(B * S, D), ("batch", "act_embed"))
    r = route(x_TD, self.gate[...], self.bias[...], cfg)   # on each device's own tokens
    r = Routing(*(constrain(a, ("batch", None)) for a in r))
    y_TD, dropped = routed_experts(x_TD, r.idx_Tk, r.w_Tk, self.w1[...], self.w3[...], self.w2[...], cfg)
    y_BSD = y_TD.reshape(B, S, D)
    if self.shared_experts is not None:
      y_BSD = y_BSD + self.shared_experts(x_BSD)
    counts_BE = expert_counts(r.idx_Tk.reshape(B, S, -1), mask_BS, cfg.n_routed_experts)
    stats = {"load": counts_BE.sum(0), "dropped": dropped,
             "aux_loss": seq_aux_loss(r.scores_TE.reshape(B, S, -1), counts_BE, mask_BS, cfg)}
    return y_BSD, stats
