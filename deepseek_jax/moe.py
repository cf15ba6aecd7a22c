"""DeepSeekMoE: shared + fine-grained routed experts (report Eq. 12-20, spec sections 4-5).

The router and the expert math are plain functions of arrays so that `sharding/expert_parallel.py` can wrap
them in a shard_map; `MoE` only holds the parameters and wires the pieces together.
"""

from __future__ import annotations

import math
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
  return jnp.einsum("tkd,tk->td", y_TkD.astype(jnp.float32), w_Tk).astype(y_MD.dtype)


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
