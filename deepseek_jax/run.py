"""One run's wiring: the mesh, the state and batch shardings, and the jitted steps, all under the mesh.

Every step is traced and called inside `jax.set_mesh(run.mesh)`: the model's sharding constraints and the
expert-parallel shard_map read the ambient mesh, so a step traced outside it would silently run the
single-device MoE (XLA would then partition the global sort and grouped matmul by itself). `Run` is the only
place that jits a step; train.py, the eval loop, bench/ and tests all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import fp8
from deepseek_jax import model as model_lib
from deepseek_jax import trainer
from deepseek_jax.config import Config, ConfigError
from deepseek_jax.kernels.grouped_matmul import resolve_impl
from deepseek_jax.loss import Batch
from deepseek_jax.optim import make_optimizer
from sharding import mesh as mesh_lib
from sharding import rules


def resolve_config(cfg: Config) -> Config:
  """The config with every machine-dependent choice made concrete (recorded as run, in checkpoints)."""
  m = cfg.model
  try:
    impl = resolve_impl(m.gmm_impl, jnp.dtype(m.dtype), m.dim, m.moe_inter_dim)
    fp8.check_devices(m.fp8, m.fp8_gemm, jax.devices())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return dataclasses.replace(cfg, model=dataclasses.replace(m, gmm_impl=impl))


class Run:
  """Holds the mesh, the jitted steps and the placement of state and batches for one config."""

  def __init__(self, cfg: Config, devices: Sequence[jax.Device] | int | None = None):
    """`devices`: the devices to run on (default: all). An int n plans for n devices that need not exist
    (deepseek_jax/plan.py): the mesh is an AbstractMesh, so the shardings and abstract state are exact, but
    no step can be lowered or run."""
    self.cfg = cfg = resolve_config(cfg)
    if isinstance(devices, int):
      self.mesh = AbstractMesh(mesh_lib.mesh_shape(cfg.mesh, devices), rules.MESH_AXES,
                               axis_types=(AxisType.Auto,) * len(rules.MESH_AXES))
    else:
      self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    self.graphdef, abstract_params, abstract_bias = model_lib.abstract_model(cfg.model)
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
    mesh_lib.validate_mesh_for_model(self.mesh, cfg.model, micro_batch, abstract_params)
    self.tx = make_optimizer(cfg.optim)
    params_abs, bias_abs = nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(abstract_bias)
    param_sh = nnx.to_pure_dict(rules.param_shardings(abstract_params, self.mesh))
    bias_sh = nnx.to_pure_dict(rules.param_shardings(abstract_bias, self.mesh))
    replicated = NamedSharding(self.mesh, P())
    opt_abs = jax.eval_shape(self.tx.init, params_abs)
    opt_sh = _opt_shardings(self.tx, opt_abs, param_sh, replicated)
    self.state_sh = trainer.TrainState(replicated, param_sh, opt_sh, bias_sh)
    self._abstract = trainer.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params_abs, opt_abs, bias_abs)
    self.batch_sh = NamedSharding(self.mesh, rules.mesh_spec(("batch", None), self.mesh))
    batch_sh = Batch(*(self.batch_sh,) * len(Batch._fields))
    step = functools.partial(trainer.train_step, graphdef=self.graphdef, tx=self.tx, cfg=cfg)
    self._train_step = jax.jit(step, in_shardings=(self.state_sh, batch_sh), out_shardings=(self.state_sh, None),
                               donate_argnums=0)
    ev = functools.partial(trainer.eval_step, graphdef=self.graphdef, cfg=cfg)
    self._eval_step = jax.jit(ev, in_shardings=(self.state_sh, batch_sh))

  # Steps: traced and run under the mesh ---------------------------------------------------------------------
  def train_step(self, state: trainer.TrainState, batch: Batch):
    with jax.set_mesh(self.mesh):
      return self._train_step(state, batch)

  def eval_step(self, state: trainer.TrainState, batch: Batch):
    with jax.set_mesh(self.mesh):
      return self._eval_step(state, batch)

  def lower_train_step(self):
    """The training step lowered for abstract state and batch, exactly as `train_step` traces it."""
    with jax.set_mesh(self.mesh):
      return self._train_step.lower(self.abstract_state(), self.abstract_batch())

  # State and batches ---------------------------------------------------------------------------------------
  def init_state(self) -> trainer.TrainState:
    if self.cfg.train.init_from:
      return self._state_from_hf(self.cfg.train.init_from)
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init_fn, out_shardings=self.state_sh)()

  def _init_fn(self) -> trainer.TrainState:
    _, params, bias = model_lib.split_model(model_lib.init_model(self.cfg.model, self.cfg.train.seed))
    params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
    return trainer.TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), bias)

  def _state_from_hf(self, path: str) -> trainer.TrainState:
    """Parameters and router biases streamed from a Hugging Face checkpoint into their shardings (each host
    reads only what its devices hold); fresh optimizer state."""
    from deepseek_jax.hf_load import load_hf_params
    params, bias = load_hf_params(path, self.cfg.model, self.state_sh.params, self.state_sh.bias)
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_sh.step)
    return trainer.TrainState(step, params, opt_state, bias)

  def abstract_state(self) -> trainer.TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self._abstract,
                        self.state_sh)

  def abstract_batch(self) -> Batch:
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    return Batch(*(jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sh) for _ in Batch._fields))

  def device_batch(self, local: dict) -> Batch:
    """This process's rows (a dict from data.make_dataset) -> a global Batch sharded over the batch axes."""
    return Batch(*(jax.make_array_from_process_local_data(self.batch_sh, local[f]) for f in Batch._fields))


def _opt_shardings(tx, opt_abs, param_sh, replicated):
  """Optimizer moments follow their parameters; scalars (step counts) are replicated."""
  return optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, opt_abs, param_sh,
                                          transform_non_params=lambda _: replicated)
