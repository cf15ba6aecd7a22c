"""Meshes, parameter shardings from the rules, and the sharded model against the single-device model.

Each (config, mesh) case compiles forward + backward of the whole model once (the slow part on CPU).
"""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import model as M
from deepseek_jax.config import MeshConfig, load_config
from sharding.mesh import make_mesh, mesh_shape, validate_mesh_for_model
from sharding.rules import mesh_spec, param_shardings, param_specs, shard_state

TINY = pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml"
B, S = 8, 32
# Overrides on top of tiny.yaml. "many": 32 experts on at most 8 devices (4 per expert shard), top-4.
# The capacity variants use cf = E / k, so that ceil(cf * T * k / E) = T slots: nothing can be dropped.
CONFIGS = {
    "tiny": [],
    "tiny_capacity": ["model.capacity_factor=4.0"],
    "many": ["model.n_routed_experts=32", "model.n_activated_experts=4", "model.moe_inter_dim=32",
             "model.n_layers=2"],
}
CONFIGS["many_capacity"] = CONFIGS["many"] + ["model.capacity_factor=8.0"]
# Whole-model compiles dominate the CPU time of this file; LLVM's optimizations are not what is tested here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def model_cfg(name: str):
  return load_config(TINY, CONFIGS[name]).model


def mesh_of(data=1, fsdp=1, expert=1, tensor=1):
  n = data * fsdp * expert * tensor
  return make_mesh(MeshConfig(data=data, fsdp=fsdp, expert=expert, tensor=tensor), jax.devices()[:n])


def loss_and_grads(graphdef, params, bias, tokens_BS):
  """Next-token + MTP cross-entropy + balance loss: (loss, outputs, param grads)."""
  inputs_BS = tokens_BS[:, :-2]

  def loss_fn(params):
    logits_BSV, aux = M.apply(graphdef, params, bias, inputs_BS)
    def xent(logits, targets):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    loss = xent(logits_BSV, tokens_BS[:, 1:-1]) + 0.3 * xent(aux.mtp_logits[0], tokens_BS[:, 2:])
    out = {"logits": logits_BSV, "mtp_logits": aux.mtp_logits, "load": aux.load,
           "aux_loss": aux.aux_loss, "dropped": aux.dropped}
    return loss + aux.aux_loss, out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, out, grads


@functools.cache
def setup(name: str):
  """(graphdef, params, bias, tokens, single-device result); capacity configs share their dropless ref."""
  cfg = model_cfg(name)
  graphdef, params, bias = M.split_model(M.init_model(cfg, seed=0))
  tokens = jax.random.randint(jax.random.key(1), (B, S + 2), 0, cfg.vocab_size)
  base = name.removesuffix("_capacity")
  if base != name:
    ref = setup(base)[4]
  else:
    ref = jax.jit(functools.partial(loss_and_grads, graphdef), compiler_options=FAST_COMPILE)(params, bias, tokens)
  return graphdef, params, bias, tokens, ref


# Meshes --------------------------------------------------------------------------------------------------

def test_make_mesh_resolves_sizes():
  mesh = make_mesh(MeshConfig(data=-1, expert=4))
  assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert mesh_shape(MeshConfig(data=1, fsdp=2, expert=-1, tensor=2), 8) == (1, 2, 2, 2)
  assert make_mesh(MeshConfig(data=2), jax.devices()[:2]).devices.size == 2


@pytest.mark.parametrize("cfg, message", [
    (MeshConfig(data=2, expert=3), "mesh data=2 x fsdp=1 x expert=3 x tensor=1 = 6 devices, but 8 are available"),
    (MeshConfig(data=-1, expert=3), "the fixed axes use 3 devices, which does not divide the 8 available"),
    (MeshConfig(data=-1, expert=-1), "at most one axis = -1"),
    (MeshConfig(data=8, tensor=0), "sizes must be positive"),
])
def test_make_mesh_rejects_bad_sizes(cfg, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(cfg)


@pytest.mark.parametrize("mesh_kw, batch, overrides, message", [
    (dict(data=2, expert=3), 8, [], r"the expert axes \(3\) do not divide n_routed_experts=8"),
    (dict(tensor=8), 8, [], r"the head axes \(8\) do not divide n_heads=4"),
    (dict(data=4, expert=2), 4, [], r"\(8 shards\) do not divide batch_size=4"),
    (dict(tensor=2), 8, ["model.inter_dim=99"], r"param \['dense_layers'\]\['ffn'\]\['w1'\] \(1, 128, 99\): dim 2 "
                                                 r"\(mlp\) of size 99 is not divisible by mesh axes \('tensor',\)"),
])
def test_validate_mesh_for_model_rejects(mesh_kw, batch, overrides, message):
  cfg = load_config(TINY, overrides).model
  with pytest.raises(ValueError, match=message):
    validate_mesh_for_model(mesh_of(**mesh_kw), cfg, batch, M.abstract_model(cfg)[1])


def test_validate_mesh_for_model_accepts():
  for shape, name in (((1, 2, 2, 2), "tiny"), ((1, 1, 8, 1), "many")):
    cfg = model_cfg(name)
    validate_mesh_for_model(mesh_of(*shape), cfg, B, M.abstract_model(cfg)[1])


# Parameter shardings -------------------------------------------------------------------------------------

def test_params_are_sharded_as_the_rules_say():
  mesh = mesh_of(data=1, fsdp=2, expert=2, tensor=2)
  _, params, bias = M.split_model(M.init_model(model_cfg("tiny")))
  placed = shard_state(params, mesh)
  flat_specs = jax.tree.leaves(param_specs(params))
  flat_axes = jax.tree.leaves(M.param_axes(params), is_leaf=lambda x: isinstance(x, tuple))
  for value, spec, axes in zip(jax.tree.leaves(placed), flat_specs, flat_axes, strict=True):
    assert value.sharding.is_equivalent_to(NamedSharding(mesh, mesh_spec(axes, mesh)), value.ndim), axes
    assert isinstance(spec, P)
  E, D, F = 8, 128, 96
  moe = placed["moe_layers"]["ffn"]
  w1, w2 = moe["w1"].get_value(), moe["w2"].get_value()
  L = 3   # scanned MoE layers: a leading layer axis, not split
  assert w1.sharding.spec == P(None, "expert", "fsdp", "tensor")
  assert {s.data.shape for s in w1.addressable_shards} == {(L, E // 2, D // 2, F // 2)}
  assert {s.data.shape for s in w2.addressable_shards} == {(L, E // 2, F // 2, D // 2)}
  embed = placed["embed"].get_value()     # ZeRO-3: the width of non-expert weights over fsdp and expert
  assert embed.sharding.spec == P("tensor", ("fsdp", "expert"))
  assert {s.data.shape for s in embed.addressable_shards} == {(256 // 2, D // 4)}
  wq_b = placed["dense_layers"]["attn"]["wq_b"].get_value()   # (layers, q_lora, heads, head_dim)
  assert {s.data.shape for s in wq_b.addressable_shards} == {(1, 64 // 4, 2, 48)}
  assert placed["norm"]["weight"].get_value().sharding.is_fully_replicated
  assert shard_state(bias, mesh)["moe_layers"]["ffn"]["bias"].get_value().sharding.is_fully_replicated


def test_nothing_big_is_replicated():
  """On 8 devices without tensor parallelism every weight of 2+ dims is split 8 ways: non-expert weights
  over fsdp x expert (ZeRO-3), the q/kv LoRA inputs of wq_b/wkv_b too, experts over expert x fsdp."""
  mesh = mesh_of(data=1, fsdp=2, expert=4, tensor=1)
  _, params, _ = M.abstract_model(model_cfg("tiny"))
  shardings = param_shardings(params, mesh)
  for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    sh = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    shard = dict(sh[0])[path].get_value().shard_shape(var.shape)
    if len([a for a in var.get_metadata()["axes"] if a != "layers"]) >= 2:   # weights, not norms or biases
      assert np.prod(shard) * 8 == np.prod(var.shape), (jax.tree_util.keystr(path), var.shape, shard)


def test_param_shardings_rejects_indivisible_dims():
  state = nnx.State({"w": nnx.Param(jnp.zeros((6, 4)), axes=("embed", None))})
  with pytest.raises(ValueError, match=r"dim 0 \(embed\) of size 6 is not divisible by mesh axes \('fsdp', 'expert'\) of total size 4"):
    param_shardings(state, mesh_of(fsdp=4))


def test_param_shardings_of_abstract_and_optimizer_states():
  mesh = mesh_of(fsdp=2)
  state = nnx.State({"w": nnx.Param(jnp.zeros((6, 4)), axes=("embed", None))})
  assert param_shardings(jax.eval_shape(lambda: state), mesh)["w"].get_value().spec == P(("fsdp", "expert"), None)
  # optax keeps the Param wrappers (and their axes) in its moments; its step count is a bare array.
  opt_state = optax.adamw(1e-3).init(state)
  placed = shard_state(opt_state, mesh)
  assert placed[0].mu["w"].get_value().sharding.spec == P(("fsdp", "expert"), None)
  assert placed[0].count.sharding.is_fully_replicated


# The sharded model equals the single-device model ----------------------------------------------------------

MESHES = {  # (data, fsdp, expert, tensor); more capacity cases (with drops): test_expert_parallel.py
    "tiny": [(8, 1, 1, 1), (2, 1, 4, 1), (1, 1, 8, 1), (2, 2, 2, 1), (1, 2, 2, 2)],
    "tiny_capacity": [(2, 1, 4, 1)],
    "many": [(1, 2, 2, 2)],
    "many_capacity": [(1, 1, 8, 1)],
}
CASES = [(name, shape) for name, shapes in MESHES.items() for shape in shapes]


@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_sharded_model_matches_single_device(name, shape):
  graphdef, params, bias, tokens, ref = setup(name)
  mesh = mesh_of(*shape)
  validate_mesh_for_model(mesh, model_cfg(name), B, M.abstract_model(model_cfg(name))[1])
  with jax.set_mesh(mesh):
    placed_params, placed_bias = shard_state(params, mesh), shard_state(bias, mesh)
    tokens = jax.device_put(tokens, NamedSharding(mesh, mesh_spec(("batch", None), mesh)))
    compiled = jax.jit(functools.partial(loss_and_grads, graphdef), compiler_options=FAST_COMPILE).lower(
        placed_params, placed_bias, tokens).compile()
    got = compiled(placed_params, placed_bias, tokens)
  if shape[2] > 1:   # the routed experts really went through the expert all_to_all
    assert "all-to-all" in compiled.as_text()
  assert int(got[1]["dropped"]) == 0
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)
  # Gradients come back sharded like the parameters they belong to (or at least placed on the mesh).
  w1_grad = got[2]["moe_layers"]["ffn"]["w1"].get_value()
  assert w1_grad.sharding.mesh.shape == mesh.shape
  for load in jax.tree.leaves(got[1]["load"]):
    np.testing.assert_array_equal(np.asarray(load).sum(-1), B * S * model_cfg(name).n_activated_experts)
