"""The expert-parallel routed experts against the single-device path, on simulated meshes.

Both go through moe.routed_experts, the one dispatch: under jax.set_mesh it must take the shard_map (checked
in the lowered module), without a mesh the per-device math of experts.py on all tokens. The dropless path
must equal the no-mesh result on all tokens, for every grouped-matmul implementation that runs on CPU
("xla" = ragged_dot under autodiff, "ref" = the Pallas kernel's custom VJP on ragged_dot); the capacity path
drops per source device, so its reference is the no-mesh path applied to each device's chunk of tokens, and
a hand-made case pins the drop policy itself.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import experts
from deepseek_jax.config import MeshConfig, ModelConfig
from deepseek_jax.moe import routed_experts
from sharding.expert_parallel import dispatched
from sharding.mesh import make_mesh

CFG = ModelConfig(dim=32, moe_inter_dim=16, n_routed_experts=16, n_activated_experts=4, n_expert_groups=1,
                  n_limited_groups=1, dtype="float32")
T = 64
FAST_COMPILE = {"xla_backend_optimization_level": 0}   # compile time dominates; LLVM's passes are not tested


def mesh_of(data=1, fsdp=1, expert=1, tensor=1):
  n = data * fsdp * expert * tensor
  return make_mesh(MeshConfig(data=data, fsdp=fsdp, expert=expert, tensor=tensor), jax.devices()[:n])


def make_inputs(cfg=CFG, seed=0):
  """x, idx (k distinct experts per token, skewed towards low ids so that capacity drops), w, w1, w3, w2."""
  E, D, F, k = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (T, D))
  idx = jnp.argsort(jax.random.uniform(ks[1], (T, E)) - jnp.linspace(0, 0.5, E), axis=-1)[:, :k]
  w = jax.random.uniform(ks[2], (T, k))
  w1, w3 = (0.1 * jax.random.normal(kk, (E, D, F)) for kk in ks[3:5])
  w2 = 0.1 * jax.random.normal(ks[5], (E, F, D))
  return x, idx.astype(jnp.int32), w, w1, w3, w2


def chunked_local(x, idx, w, w1, w3, w2, cfg, n_chunks):
  """The no-mesh path on each device's tokens: what the capacity path must compute."""
  outs = [routed_experts(*chunk, w1, w3, w2, cfg)
          for chunk in zip(*(jnp.split(a, n_chunks) for a in (x, idx, w)))]
  return jnp.concatenate([y for y, _ in outs]), sum(d for _, d in outs)


def value_and_grads(experts_fn, x, idx, w, w1, w3, w2):
  """A non-linear scalar of the output, its gradients wrt x, w and the weights, and the drop count."""
  def loss(x, w, w1, w3, w2):
    y, dropped = experts_fn(x, idx, w, w1, w3, w2)
    return jnp.sum(y * jnp.cos(y)), (y, dropped)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, w1, w3, w2)


CASES = [  # (capacity_factor, gmm_impl, (data, fsdp, expert, tensor))
    (0.0, "xla", (8, 1, 1, 1)), (0.0, "xla", (1, 1, 8, 1)), (0.0, "xla", (1, 2, 2, 2)),
    (0.0, "ref", (1, 1, 1, 1)), (0.0, "ref", (2, 1, 4, 1)), (0.0, "ref", (1, 2, 2, 2)),
    (1.0, "xla", (2, 1, 4, 1)), (1.0, "xla", (2, 2, 2, 1)), (1.0, "xla", (1, 2, 2, 2)),
]


@pytest.mark.parametrize("cf, impl, shape", CASES, ids=[f"cf{c}-{i}-{'x'.join(map(str, s))}" for c, i, s in CASES])
def test_matches_single_device(cf, impl, shape):
  cfg = dataclasses.replace(CFG, capacity_factor=cf, gmm_impl=impl)
  args = make_inputs(cfg)
  n_token_shards = shape[0] * shape[1] * shape[2]
  ref_fn = functools.partial(chunked_local, cfg=cfg, n_chunks=n_token_shards if cf else 1)
  want = jax.jit(functools.partial(value_and_grads, ref_fn), compiler_options=FAST_COMPILE)(*args)
  mesh = mesh_of(*shape)
  with jax.set_mesh(mesh):
    got = jax.jit(functools.partial(value_and_grads, functools.partial(routed_experts, cfg=cfg)),
                  compiler_options=FAST_COMPILE)(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  dropped = int(got[0][1][1])
  assert (dropped > 0) if cf else (dropped == 0)   # the capacity cases really drop


def test_drop_policy_by_hand():
  """2 token shards of 4 tokens, k=1, 2 experts, cf=0.5 -> C = ceil(0.5*4*1/2) = 1 slot per expert per shard.
  Each expert keeps its first assignment in local token order, on each shard separately."""
  cfg = dataclasses.replace(CFG, n_routed_experts=2, n_activated_experts=1, capacity_factor=0.5)
  x, _, _, w1, w3, w2 = make_inputs(dataclasses.replace(cfg, capacity_factor=0.0))
  x = x[:8]
  idx = jnp.array([[0], [0], [1], [0], [1], [1], [1], [1]], jnp.int32)
  w = jnp.full((8, 1), 0.5)
  kept = [0, 2, 4]   # shard 0: expert 0 -> token 0, expert 1 -> token 2; shard 1: expert 1 -> token 4
  want = np.zeros(x.shape, np.float32)
  for t in kept:
    e = int(idx[t, 0])
    want[t] = 0.5 * (experts.swiglu(x[t] @ w1[e], x[t] @ w3[e]) @ w2[e])
  with jax.set_mesh(mesh_of(expert=2)):
    y, dropped = jax.jit(functools.partial(routed_experts, cfg=cfg))(x, idx, w, w1, w3, w2)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  assert int(dropped) == 5


@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_dispatched_buffer_is_sharded_and_routed(cf):
  """Every assignment arrives exactly once, on the expert shard that owns its expert; the buffer is split
  over the token axes (one [P, cap, D] block per device)."""
  cfg = dataclasses.replace(CFG, capacity_factor=cf)
  x, idx, *_ = make_inputs(cfg)
  mesh = mesh_of(data=2, expert=4)
  with jax.set_mesh(mesh):
    recv, ids = jax.jit(functools.partial(dispatched, cfg=cfg, mesh=mesh))(x, idx)
  n_dev, P_, E_l = 8, 4, cfg.n_routed_experts // 4
  assert recv.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp", "expert"), None, None)), 3)
  assert {s.data.shape[0] for s in recv.addressable_shards} == {P_}
  recv, ids = np.asarray(recv).reshape(n_dev, P_, -1, cfg.dim), np.asarray(ids).reshape(n_dev, P_, -1)
  counts = np.zeros(cfg.n_routed_experts, int)
  for dev in range(n_dev):            # device dev = (data, expert) = divmod(dev, 4)
    shard = dev % P_
    for src in range(P_):             # the block that expert shard `shard` got from source `src`
      src_tokens = np.arange(T).reshape(n_dev, -1)[dev - shard + src]
      for row, local in zip(recv[dev, src], ids[dev, src]):
        if local == E_l:              # empty row
          assert not row.any()
          continue
        e = shard * E_l + local
        token = src_tokens[np.flatnonzero((np.asarray(x)[src_tokens] == row).all(-1))]
        assert len(token) == 1 and e in np.asarray(idx)[token[0]]
        counts[e] += 1
  want = np.bincount(np.asarray(idx).ravel(), minlength=cfg.n_routed_experts)
  if cf:
    assert (counts <= want).all() and counts.sum() < want.sum()
  else:
    np.testing.assert_array_equal(counts, want)


@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_the_mesh_decides_the_path(cf):
  """Under a mesh the routed experts run in the shard_map; without one, the per-device path with no
  collectives. Counted in the lowered module, forward and backward. (On a 1x1x1x1 mesh JAX elides the
  all_to_alls of a size-1 axis, but the body's FSDP all_gather and drop-count psum remain.)"""
  cfg = dataclasses.replace(CFG, capacity_factor=cf)
  args = make_inputs(cfg)
  fn = jax.jit(functools.partial(value_and_grads, functools.partial(routed_experts, cfg=cfg)))

  def count(shape):
    if shape is None:
      text = fn.lower(*args).as_text()
    else:
      with jax.set_mesh(mesh_of(*shape)):
        text = fn.lower(*args).as_text()
    return [text.count(f"stablehlo.{op}") for op in ("all_to_all", "all_gather", "all_reduce")]

  assert count(None) == [0, 0, 0]
  a2a, gather, reduce = count((1, 1, 1, 1))
  assert a2a == 0 and gather > 0 and reduce > 0
  # forward: rows (+ ids when dropless) out, rows back; backward: the two row exchanges transposed.
  assert count((2, 1, 4, 1))[0] == 4 + (cf == 0)


@pytest.mark.parametrize("n_experts, n_tokens, message", [
    (12, T, "8 expert shards do not divide the 12 routed experts"),
    (16, 60, "60 tokens cannot be split into 8 shards"),
])
def test_rejects_indivisible_meshes(n_experts, n_tokens, message):
  cfg = dataclasses.replace(CFG, n_routed_experts=n_experts)
  E, D, F, k = n_experts, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (f32(n_tokens, D), jax.ShapeDtypeStruct((n_tokens, k), jnp.int32), f32(n_tokens, k),
          f32(E, D, F), f32(E, D, F), f32(E, F, D))
  with jax.set_mesh(mesh_of(expert=8)), pytest.raises(ValueError, match=message):
    jax.eval_shape(functools.partial(routed_experts, cfg=cfg), *args)
