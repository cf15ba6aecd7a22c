"""The device mesh: axes ('data', 'fsdp', 'expert', 'tensor'), all Auto (compiler-propagated shardings).

`make_mesh` resolves a MeshConfig against the devices; `validate_mesh_for_model` checks up front that a mesh
can run a model at a given global batch, with one readable message instead of an XLA shape error later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from deepseek_jax.config import MeshConfig, ModelConfig
from sharding.rules import MESH_AXES, axis_size, logical_to_spec, param_shardings


def _describe(sizes: dict[str, int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items())


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order; one axis may be -1 (= the devices the others leave)."""
  sizes = {a: getattr(cfg, a) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(free) > 1:
    raise ValueError(f"mesh {_describe(sizes)}: sizes must be positive, with at most one axis = -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ValueError(f"mesh {_describe(sizes)}: the fixed axes use {fixed} devices, which does not divide "
                       f"the {n_devices} available")
    sizes[free[0]] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(f"mesh {_describe(sizes)} = {math.prod(sizes.values())} devices, but {n_devices} are "
                     f"available")
  return tuple(sizes.values())


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis Auto mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def validate_mesh_for_model(mesh: Mesh, cfg: ModelConfig, batch_size: int, abstract_params) -> None:
  """Raises ValueError if `mesh` cannot shard `cfg` at global `batch_size` sequences.

  Checks the expert axis against the experts, the tensor axis against the heads, the token axes against
  the batch, then every dimension of `abstract_params` (an nnx State of the model's parameters, e.g. from
  model.abstract_model) against the rules (inter_dim, vocab, dim, ...).
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  where = f"mesh {_describe(sizes)}"
  problems = []
  n_expert = axis_size(mesh, logical_to_spec(("expert",))[0])
  if cfg.n_moe_layers and cfg.n_routed_experts % n_expert:
    problems.append(f"the expert axes ({n_expert}) do not divide n_routed_experts={cfg.n_routed_experts}")
  n_heads = axis_size(mesh, logical_to_spec(("heads",))[0])
  if cfg.n_heads % n_heads:
    problems.append(f"the head axes ({n_heads}) do not divide n_heads={cfg.n_heads}")
  batch_axes = logical_to_spec(("batch",))[0]
  n_batch = axis_size(mesh, batch_axes)
  if batch_size % n_batch:
    problems.append(f"the batch axes {batch_axes} ({n_batch} shards) do not divide batch_size={batch_size}")
  if problems:
    raise ValueError(f"{where}: " + "; ".join(problems))
  try:
    param_shardings(abstract_params, mesh)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
