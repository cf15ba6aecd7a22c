"""Expert parallelism: the routed experts inside one explicit shard_map, with every collective written here.

Layout (rules.py; `/n` = split over those mesh axes, scaling-book notation):
  tokens   x_TD, idx_Tk, w_Tk                  [T/(data·fsdp·expert), ...]   replicated over tensor
  weights  w1_EDF, w3_EDF [E/expert, D/fsdp, F/tensor];  w2_EFD [E/expert, F/tensor, D/fsdp]
The shard_map is manual over every mesh axis. On each device (P = size of 'expert', E_l = E/P local experts):
  1. plan: sort the local assignments (T*k) by global expert id, so they are contiguous per destination shard
     (shard = expert // E_l), and give each a row in a fixed buffer [P, cap, D].
  2. dispatch: all_to_all over 'expert'; shard p receives [P (sources), cap, D].
  3. experts: all_gather the weights' D over 'fsdp'; run the local experts on the received rows; each
     tensor shard computes its F slice, so the result is a partial sum over 'tensor'.
  4. combine: all_to_all back over 'expert', gather each assignment's row, weighted sum over k,
     then psum over 'tensor' (the F contraction).

Two buffer layouts (cfg.capacity_factor):
  * dropless (cf = 0): cap = T * min(k, E_l) rows per destination, enough for every assignment of every local
    token. Rows are packed in expert order; the expert ids travel with them (a second, int all_to_all) and
    the receiver re-sorts its P*cap rows by local expert for the grouped matmul (experts.grouped_swiglu, with
    the implementation cfg.gmm_impl resolves to: the Pallas Mosaic-GPU kernel on Hopper).
  * capacity (cf > 0): C = ceil(cf * T * k / E) slots per expert per *source* shard (experts.capacity of the local
    tokens), so cap = E_l * C per destination (= ceil(cf * T * k / P) up to rounding). The receiver regroups
    [P, E_l, C, D] -> [E_l, P*C, D] by a transpose and runs a batched einsum (experts.batched_swiglu).
    Drop policy (deterministic): on each source device, each expert keeps its first C assignments in local
    token order (the stable argsort of experts.sort_by_expert); the rest contribute 0 to the output. This is
    exactly experts.capacity_experts applied to each device's local tokens, and with one token shard it is
    the single-device path. `dropped` is the global count of dropped assignments (psum over token axes).

Collectives, and the implicit ones added by autodiff:
  forward:  all_gather(w, fsdp) | all_to_all(x, ids: expert) | all_to_all(y: expert) | psum(y: tensor)
            | psum(dropped: data, fsdp, expert); pcast(w: data) and pcast(x, w_Tk: tensor) move no data
  backward: all_to_all transposes to all_to_all; all_gather to psum_scatter over fsdp (weight grads summed
            over the fsdp token shards); pcast(w: data) to psum over 'data' (weight grads summed over the
            data shards); pcast(x, w_Tk: tensor) to psum over 'tensor' (their grads summed over F slices).

Cost: the dropless buffer is sized for the worst case, P * T * min(k, E_l) rows per device (P times what is
sent on average); at large expert-parallel degree use the capacity path, whose buffers hold about cf * T * k.

Weights enter the shard_map already cast to the compute dtype (bf16), so the FSDP all_gather moves half the
bytes of float32 master weights; the cast's transpose returns float32 gradients outside.

Backends: this dense fixed-capacity all_to_all runs everywhere (CPU tests, GPU, TPU).
jax.lax.ragged_all_to_all (which would send only the valid rows of the dropless buffer) does not run on
XLA:CPU (jax#34755), so it is not used here: CPU tests exercise exactly what GPUs run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax import experts
from deepseek_jax.config import ModelConfig
from sharding.rules import axis_size, mesh_spec, spec_axes

EXPERT_AXIS = "expert"
# Logical names of the routed-expert weights (moe.MoE declares its parameters with these).
W_IN_NAMES = ("expert", "expert_embed", "moe_mlp")    # w1, w3 [E, D, F]
W_OUT_NAMES = ("expert", "moe_mlp", "expert_embed")   # w2     [E, F, D]
TOKEN_NAMES = ("batch", None)                  # x_TD, idx_Tk, w_Tk


class Layout(NamedTuple):
  """Static facts about how one call is split (all from the mesh and the rules)."""
  token_spec: P                 # x_TD / idx_Tk / w_Tk
  w_in_spec: P                  # w1, w3
  w_out_spec: P                 # w2
  token_axes: tuple[str, ...]   # axes the tokens are split over
  embed_axes: tuple[str, ...]   # axes the weights' D is split over (all_gather inside)
  mlp_axes: tuple[str, ...]     # axes the weights' F is split over (psum of the output)
  expert_axis: str | None       # the all_to_all axis (None: the mesh has no expert axis)
  n_shards: int                 # P: size of the expert axis
  w_only_axes: tuple[str, ...]  # token axes the weights are replicated over (their grads: psum over these)
  x_only_axes: tuple[str, ...]  # weight axes the tokens are replicated over (dx: psum over these)


def _layout(mesh, n_tokens: int, n_experts: int) -> Layout:
  token_spec, w_in, w_out = (mesh_spec(n, mesh) for n in (TOKEN_NAMES, W_IN_NAMES, W_OUT_NAMES))
  expert_axis = EXPERT_AXIS if EXPERT_AXIS in mesh.axis_names else None
  n_shards = axis_size(mesh, expert_axis)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  where = f"expert parallelism on mesh {sizes}"
  if spec_axes(w_in[0]) not in ((), (EXPERT_AXIS,)) or w_in[0] != w_out[0]:
    raise ValueError(f"{where}: the expert dim of the weights must be split over {EXPERT_AXIS!r} only")
  token_axes = spec_axes(token_spec[0])
  if n_shards > 1 and EXPERT_AXIS not in token_axes:
    raise ValueError(f"{where}: tokens must also be split over {EXPERT_AXIS!r} (rule 'batch')")
  if n_experts % n_shards:
    raise ValueError(f"{where}: {n_shards} expert shards do not divide the {n_experts} routed experts")
  if n_tokens % axis_size(mesh, token_axes):
    raise ValueError(f"{where}: {n_tokens} tokens cannot be split into {axis_size(mesh, token_axes)} shards "
                     f"over {token_axes}")
  w_axes = tuple(a for entry in w_in for a in spec_axes(entry))
  return Layout(token_spec, w_in, w_out, token_axes, spec_axes(w_in[1]), spec_axes(w_in[2]), expert_axis,
                n_shards, tuple(a for a in token_axes if a not in w_axes),
                tuple(a for a in w_axes if a not in token_axes))


def routed_experts(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD, cfg: ModelConfig, impl: str, mesh):
  """Dropless or capacity routed experts inside one shard_map over `mesh` (every axis manual).

  `impl` is the resolved grouped-matmul implementation (kernels.grouped_matmul). Returns (y_TD, dropped):
  the weighted sum of each token's k expert outputs, and the number of dropped assignments over all devices
  (0 when dropless).
  """
  lay = _layout(mesh, x_TD.shape[0], w1_EDF.shape[0])
  dt = x_TD.dtype
  w1_EDF, w3_EDF, w2_EFD = (w.astype(dt) for w in (w1_EDF, w3_EDF, w2_EFD))   # gathered in bf16, not f32

  def body(x_TD, idx_Tk, w_Tk, w1_eDF, w3_eDF, w2_eFD):   # T = T_global / (data·fsdp·expert)
    w1_eDF, w3_eDF, w2_eFD = _gather_embed(w1_eDF, w3_eDF, w2_eFD, lay)
    # Mark what each operand is replicated over as varying, so that the backward's reductions are these
    # pcasts' transposes, written here: psum of the weight grads over the token shards they do not split
    # ('data'), psum of dx and of the combine weights' grads over the F slices ('tensor').
    w1_eDF, w3_eDF, w2_eFD = (_vary(w, lay.w_only_axes) for w in (w1_eDF, w3_eDF, w2_eFD))
    x_TD, w_Tk = _vary(x_TD, lay.x_only_axes), _vary(w_Tk, lay.x_only_axes)
    if lay.n_shards == 1 and cfg.capacity_factor <= 0:   # no expert axis to cross: experts on local tokens
      y_TD = experts.dropless_experts(x_TD, idx_Tk, w_Tk, w1_eDF, w3_eDF, w2_eFD, impl, cfg.gmm_tiles, cfg.fp8)
      y_TD = jax.lax.psum(y_TD, lay.mlp_axes) if lay.mlp_axes else y_TD
      return y_TD, jnp.zeros((), jnp.int32)
    plan = _plan(idx_Tk, w1_eDF.shape[0] * lay.n_shards, lay.n_shards, cfg)
    recv_PcD, recv_ids_Pc = _dispatch(x_TD, plan, lay, send_ids=cfg.capacity_factor <= 0)
    if cfg.capacity_factor > 0:
      out_PcD = _capacity_experts(recv_PcD, w1_eDF, w3_eDF, w2_eFD, cfg)
    else:
      out_PcD = _dropless_experts(recv_PcD, recv_ids_Pc, w1_eDF, w3_eDF, w2_eFD, impl, cfg)
    y_TD = _combine(out_PcD, plan, w_Tk, lay)
    if lay.mlp_axes:
      y_TD = jax.lax.psum(y_TD, lay.mlp_axes)   # each tensor shard summed over its F slice only
    dropped = jnp.sum(plan.row_M >= plan.cap).astype(jnp.int32)
    # Global drop count; tokens are replicated over the other axes, so this is invariant everywhere.
    dropped = jax.lax.psum(dropped, lay.token_axes) if lay.token_axes else dropped
    return y_TD, dropped

  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(lay.token_spec,) * 3 + (lay.w_in_spec, lay.w_in_spec, lay.w_out_spec),
                     out_specs=(lay.token_spec, P()))
  return fn(x_TD, idx_Tk, w_Tk, w1_EDF, w3_EDF, w2_EFD)


def dispatched(x_TD, idx_Tk, cfg: ModelConfig, mesh):
  """The buffer the experts see after the dispatch all_to_all, as a global array [n_devices * P, cap, D]
  sharded like the tokens, with the local expert id of every row ([n_devices * P, cap]; E_l = empty row).
  For tests and debugging."""
  lay = _layout(mesh, x_TD.shape[0], cfg.n_routed_experts)
  stacked = P(lay.token_spec[0], None, None)   # shards stacked over the token axes (replicated over tensor)

  def body(x_TD, idx_Tk):
    plan = _plan(idx_Tk, cfg.n_routed_experts, lay.n_shards, cfg)
    return _dispatch(x_TD, plan, lay, send_ids=True)

  return jax.shard_map(body, mesh=mesh, in_specs=(lay.token_spec, lay.token_spec),
                       out_specs=(stacked, P(lay.token_spec[0], None)))(x_TD, idx_Tk)


# Pieces of the per-device body ---------------------------------------------------------------------------

class DispatchPlan(NamedTuple):
  """Where each local assignment goes. M = T*k assignments, sorted by global expert."""
  order_M: jnp.ndarray   # index into the flattened [T*k] assignments (token = order // k)
  inverse_M: jnp.ndarray # sorted position of each flattened assignment
  shard_M: jnp.ndarray   # destination expert shard
  row_M: jnp.ndarray     # row in the destination's buffer; == cap when the assignment is dropped
  local_M: jnp.ndarray   # expert id on the destination shard (0 .. E_l-1)
  cap: int               # rows per destination shard (static)
  n_local: int           # E_l: experts per shard (static)


def _plan(idx_Tk, n_experts: int, n_shards: int, cfg: ModelConfig) -> DispatchPlan:
  T, k = idx_Tk.shape
  E_l = n_experts // n_shards
  s = experts.sort_by_expert(idx_Tk, n_experts)
  shard_M, local_M = s.expert_M // E_l, s.expert_M % E_l
  if cfg.capacity_factor > 0:   # C slots per expert; rank = position among this expert's local assignments
    C = experts.capacity(T, cfg)
    cap = E_l * C
    row_M = jnp.where(s.rank_M < C, local_M * C + s.rank_M, cap)
  else:                         # dropless: packed in expert order, each destination has room for all
    cap = T * min(k, E_l)       # a token sends at most min(k, E_l) assignments to one shard
    per_shard = s.group_sizes_E.reshape(n_shards, E_l).sum(1)
    start = jnp.cumsum(per_shard) - per_shard
    row_M = jnp.arange(T * k, dtype=jnp.int32) - start[shard_M]
  return DispatchPlan(s.order_M, s.inverse_M, shard_M, row_M.astype(jnp.int32), local_M.astype(jnp.int32), cap, E_l)


def _dispatch(x_TD, plan: DispatchPlan, lay: Layout, send_ids: bool):
  """Packs [P, cap, D] (+ local expert ids [P, cap]) and exchanges them over the expert axis."""
  k = plan.order_M.shape[0] // x_TD.shape[0]
  send_PcD = jnp.zeros((lay.n_shards, plan.cap, x_TD.shape[1]), x_TD.dtype)
  x_MD = experts.gather_assignments(x_TD, plan.order_M, plan.inverse_M, k)
  send_PcD = send_PcD.at[plan.shard_M, plan.row_M].set(x_MD, mode="drop")
  # all_to_all #1 (dispatch): chunk p of axis 0 goes to expert shard p; received chunks stacked by source.
  recv_PcD = _all_to_all(send_PcD, lay)
  if not send_ids:
    return recv_PcD, None
  ids_Pc = jnp.full((lay.n_shards, plan.cap), plan.n_local, jnp.int32)   # empty rows: id E_l, sorted last
  ids_Pc = ids_Pc.at[plan.shard_M, plan.row_M].set(plan.local_M, mode="drop")
  # all_to_all #2 (dispatch): the local expert id of every row travels with it.
  return recv_PcD, _all_to_all(ids_Pc, lay)


def _all_to_all(x, lay: Layout):
  """Tiled all_to_all over the expert axis: [P, ...] chunk p goes to shard p, received chunks by source."""
  if lay.expert_axis is None:
    return x
  return jax.lax.all_to_all(x, lay.expert_axis, 0, 0, tiled=True)


def _vary(x, axes: tuple[str, ...]):
  """pcast to varying over `axes` (no data moves); its transpose in the backward is psum over `axes`."""
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def _gather_embed(w1_eDF, w3_eDF, w2_eFD, lay: Layout):
  """FSDP: the weights arrive with D split; all_gather it (the backward is a psum_scatter of the grads)."""
  if not lay.embed_axes:
    return w1_eDF, w3_eDF, w2_eFD
  gather = lambda w, axis: jax.lax.all_gather(w, lay.embed_axes, axis=axis, tiled=True)
  return gather(w1_eDF, 1), gather(w3_eDF, 1), gather(w2_eFD, 2)


def _dropless_experts(recv_PcD, ids_Pc, w1_eDF, w3_eDF, w2_eFD, impl: str, cfg: ModelConfig):
  """Re-sort the received rows by local expert, grouped SwiGLU, and put them back in received order.

  Empty rows (id E_l) sort last and are counted into the last expert's group, so the groups cover every
  row (as the Mosaic-GPU kernel requires): they are zero rows, whose output and weight gradients are 0."""
  n_src, cap, D = recv_PcD.shape
  E_l = w1_eDF.shape[0]
  s = experts.sort_by_expert(ids_Pc.reshape(-1, 1), E_l + 1)
  sizes_e = s.group_sizes_E[:E_l].at[E_l - 1].add(s.group_sizes_E[E_l])
  x_RD = experts.permute_rows(recv_PcD.reshape(n_src * cap, D), s.order_M, s.inverse_M)
  y_RD = experts.grouped_swiglu(x_RD, sizes_e, w1_eDF, w3_eDF, w2_eFD, impl, cfg.gmm_tiles, cfg.fp8)
  return experts.permute_rows(y_RD, s.inverse_M, s.order_M).reshape(n_src, cap, D)


def _capacity_experts(recv_PcD, w1_eDF, w3_eDF, w2_eFD, cfg: ModelConfig):
  """Rows arrive in [source, local expert, slot] order: regroup by expert, batched einsum, regroup back."""
  n_src, cap, D = recv_PcD.shape
  E_l = w1_eDF.shape[0]
  C = cap // E_l
  x_ECD = recv_PcD.reshape(n_src, E_l, C, D).transpose(1, 0, 2, 3).reshape(E_l, n_src * C, D)
  y_ECD = experts.batched_swiglu(x_ECD, w1_eDF, w3_eDF, w2_eFD, cfg.fp8, cfg.fp8_gemm)
  return y_ECD.reshape(E_l, n_src, C, D).transpose(1, 0, 2, 3).reshape(n_src, cap, D)


def _combine(out_PcD, plan: DispatchPlan, w_Tk, lay: Layout):
  # all_to_all #3 (combine): results go back to the shard that sent the rows, stacked by expert shard.
  back_PcD = _all_to_all(out_PcD, lay)
  y_MD = back_PcD.at[plan.shard_M, plan.row_M].get(mode="fill", fill_value=0)   # dropped rows -> 0
  T, k = w_Tk.shape
  y_TkD = experts.permute_rows(y_MD, plan.inverse_M, plan.order_M).reshape(T, k, -1)
  return experts.weighted_sum_k(y_TkD, w_Tk)
