"""The one table where logical axis names meet mesh axes.

Parameters and activations use different logical names, so that no mesh axis appears twice in one spec.
Mesh axes: data (pure data parallel: weights replicated, e.g. across slices or nodes joined by a slow network),
fsdp (data parallel + parameter sharding), expert (expert parallel; tokens are also split over it outside the
MoE), tensor (heads / hidden width).

Weights are sharded ZeRO-3 style: the model width of every non-expert weight is split over fsdp *and* expert
(outside the MoE the expert axis is one more data-parallel axis, so replicating weights over it would waste
memory), and the low-rank dims that feed the per-head up-projections (wq_b, wkv_b) are split likewise. Routed
experts split E over expert and their width over fsdp ('expert_embed'). Nothing larger than a norm or the
router bias is replicated on every device.

Parameters carry their logical names as the `axes` metadata of their `nnx.Variable` (see layers.param);
`param_shardings` turns a State of them into NamedShardings, and refuses (rather than silently replicating)
a dimension that its mesh axes do not divide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "expert_embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "moe_mlp": "tensor",
    "q_lora": None,        # output dim of wq_a (its input D is already split)
    "kv_lora": None,       # output dim of wkv_a
    "lora_in": ("fsdp", "expert"),   # input dim of wq_b / wkv_b
    "head_dim": None,
    "norm": None,
    "layers": None,        # the leading axis of scanned layer stacks
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "act_expert": "expert",
}


def logical_to_spec(names: Sequence[str | None]) -> P:
  """('batch', 'seq', 'act_embed') -> P(('data', 'fsdp', 'expert'), None, None). Unknown names raise."""
  axes = []
  for n in names:
    if n is not None and n not in RULES:
      raise KeyError(f"logical axis {n!r} has no rule in sharding/rules.py")
    axes.append(None if n is None else RULES[n])
  return P(*axes)


def mesh_spec(names: Sequence[str | None], mesh) -> P:
  """logical_to_spec, restricted to the axes `mesh` has (e.g. a 1-axis test mesh)."""
  return _drop_missing_axes(logical_to_spec(names), mesh)


def spec_axes(entry) -> tuple[str, ...]:
  """One PartitionSpec entry (None, 'x' or ('x', 'y')) as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def axis_size(mesh, entry) -> int:
  """Product of the sizes of the mesh axes in `entry` (1 for None or for axes the mesh lacks)."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes.get(a, 1) for a in spec_axes(entry))


def current_mesh():
  """The mesh set by `jax.set_mesh`, or None when running unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh is set (single-device use)."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, mesh_spec(names, mesh))


def _drop_missing_axes(spec: P, mesh) -> P:
  """Removes mesh axes the current mesh does not have (e.g. a 1-axis test mesh)."""
  names = set(mesh.axis_names)
  out = []
  for entry in spec:
    if entry is None:
      out.append(None)
    elif isinstance(entry, tuple):
      kept = tuple(a for a in entry if a in names)
      out.append(kept or None)
    else:
      out.append(entry if entry in names else None)
  return P(*out)


# Parameters ----------------------------------------------------------------------------------------------

def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _var_names(var: nnx.Variable) -> tuple[str | None, ...]:
  """The `axes` metadata of a variable; a variable without one is replicated."""
  names = var.get_metadata().get("axes")
  return tuple(names) if names is not None else (None,) * len(var.shape)


def param_specs(state) -> Any:
  """Same tree as `state` (e.g. a State of Variables), each Variable holding its PartitionSpec; leaves
  outside Variables (an optimizer's step count) get P()."""
  spec = lambda v: v.replace(logical_to_spec(_var_names(v))) if _is_var(v) else P()
  return jax.tree.map(spec, state, is_leaf=_is_var)


def param_shardings(state, mesh) -> Any:
  """Same tree as `state`, each Variable holding a NamedSharding on `mesh` (values may be arrays or
  ShapeDtypeStructs; leaves outside Variables are replicated). Raises ValueError naming the parameter when
  a dimension is not divisible by its mesh axes."""

  def one(path, var):
    if not _is_var(var):
      return NamedSharding(mesh, P())
    spec = mesh_spec(_var_names(var), mesh)
    name = jax.tree_util.keystr(path)
    if len(spec) != len(var.shape):
      raise ValueError(f"param {name}: axes {_var_names(var)} do not match its shape {var.shape}")
    for dim, (size, entry) in enumerate(zip(var.shape, spec)):
      n = axis_size(mesh, entry)
      if size % n:
        raise ValueError(f"param {name} {tuple(var.shape)}: dim {dim} ({_var_names(var)[dim]}) of size {size} "
                         f"is not divisible by mesh axes {spec_axes(entry)} of total size {n}")
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def shard_state(state, mesh) -> Any:
  """Places every variable of `state` as the rules say (device_put; works for replicated host values)."""
  return jax.device_put(state, param_shardings(state, mesh))
