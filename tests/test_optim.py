"""Schedules, the weight-decay mask, clipping and the logged learning rate of `deepseek_jax.optim`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import optim
from deepseek_jax.config import OptimConfig

LR = 2e-3


def _values(schedule, steps):
  return np.array([float(schedule(jnp.int32(s))) for s in steps])


def test_deepseek_schedule_phases():
  cfg = OptimConfig(lr=LR, warmup_steps=100, constant_steps=50, decay_steps=200, final_lr_ratio=0.1)
  schedule = optim.make_schedule(cfg)
  steps = [0, 50, 100, 120, 150, 250, 350, 351, 10_000]
  # mid cosine: 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55 of peak
  want = LR * np.array([0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1, 0.1])
  np.testing.assert_allclose(_values(schedule, steps), want, rtol=1e-5, atol=1e-12)
  after_peak = _values(schedule, range(100, 400, 7))
  assert np.all(np.diff(after_peak) <= 1e-12), "lr must never rise after warmup"


def test_deepseek_schedule_without_warmup_or_decay():
  no_warmup = optim.make_schedule(OptimConfig(lr=LR, warmup_steps=0, constant_steps=0, decay_steps=10))
  np.testing.assert_allclose(_values(no_warmup, [0, 5, 10, 20]), LR * np.array([1.0, 0.55, 0.1, 0.1]), rtol=1e-5)
  no_decay = optim.make_schedule(OptimConfig(lr=LR, warmup_steps=10, constant_steps=5, decay_steps=0))
  np.testing.assert_allclose(_values(no_decay, [0, 5, 10, 15, 10**6]), LR * np.array([0, 0.5, 1, 1, 1]), rtol=1e-6)


def test_cosine_schedule_counts_warmup_in_decay_steps():
  cfg = OptimConfig(lr=LR, schedule="cosine", warmup_steps=10, decay_steps=110, final_lr_ratio=0.1)
  got = _values(optim.make_schedule(cfg), [0, 5, 10, 60, 110, 5000])
  np.testing.assert_allclose(got, LR * np.array([0.0, 0.5, 1.0, 0.55, 0.1, 0.1]), rtol=1e-5, atol=1e-12)


def test_schedule_under_jit():
  schedule = optim.make_schedule(OptimConfig(lr=LR, warmup_steps=4, decay_steps=8))
  got = jax.jit(jax.vmap(schedule))(jnp.arange(16, dtype=jnp.int32))
  np.testing.assert_allclose(np.asarray(got), _values(schedule, range(16)), rtol=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(decay_steps=-5), "decay_steps=-5"),
    (dict(constant_steps=-2), "constant_steps=-2"),
    (dict(lr=0.0), "optim.lr"),
    (dict(final_lr_ratio=1.5), "final_lr_ratio"),
    (dict(b2=1.0), "optim.b1"),
    (dict(schedule="cosine", warmup_steps=100, decay_steps=100), "decay_steps"),
    (dict(schedule="cosine", warmup_steps=10, decay_steps=100, constant_steps=5), "constant_steps"),
])
def test_invalid_configs_raise_one_line(changes, message):
  cfg = dataclasses.replace(OptimConfig(), **changes)
  with pytest.raises(ValueError, match=message) as err:
    optim.make_optimizer(cfg)
  assert "\n" not in str(err.value)


def _params():
  return {"embed": jnp.ones((6, 4)),
          "layers": {"0": {"wq": jnp.ones((4, 4)), "attn_norm": jnp.ones((4,)), "bias": jnp.ones((4,))},
                     "1": {"wq": jnp.ones((4, 4)), "attn_norm": jnp.ones((4,)), "bias": jnp.ones((4,))}},
          "experts": {"w1": jnp.ones((3, 4, 8))},
          "stacked": {"ffn_norm": jnp.ones((2, 4)), "gate_bias": jnp.ones((2, 3))}}


def test_decay_mask_selects_matrices_only():
  mask = optim.decay_mask(_params())
  assert mask["embed"] and mask["experts"]["w1"] and mask["layers"]["1"]["wq"]
  assert not any([mask["layers"]["0"]["attn_norm"], mask["layers"]["0"]["bias"]])
  # A norm scale or bias stacked over layers is 2-D, but its name still excludes it.
  assert not mask["stacked"]["ffn_norm"] and not mask["stacked"]["gate_bias"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  assert optim.decay_mask(abstract) == mask


def test_weight_decay_only_shrinks_masked_params():
  cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=1.0)
  tx, params = optim.make_optimizer(cfg), _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  shrunk = 1.0 - cfg.lr * cfg.weight_decay  # adam's own update is 0/(0+eps) = 0 for zero gradients
  for path in (("embed",), ("layers", "0", "wq"), ("experts", "w1")):
    np.testing.assert_allclose(_get(new, path), shrunk, rtol=1e-6)
  for path in (("layers", "0", "attn_norm"), ("layers", "1", "bias"), ("stacked", "ffn_norm")):
    np.testing.assert_array_equal(_get(new, path), 1.0)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def _first_moment_norm(opt_state):
  adam_state = opt_state[1].inner_state[0]
  return float(optax.tree.norm(adam_state.mu))


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_clipping_bounds_a_huge_gradient(clip_norm):
  cfg = OptimConfig(lr=0.01, warmup_steps=0, weight_decay=0.0, clip_norm=clip_norm, b1=0.9)
  tx, params = optim.make_optimizer(cfg), {"w": jnp.zeros((8, 8)), "b": jnp.zeros((8,))}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e6), params)
  updates, state = tx.update(grads, tx.init(params), params)
  raw_norm = float(optax.tree.norm(grads))
  # mu = (1 - b1) * g after one step, so its norm shows the gradient that reached adam.
  want = (1 - cfg.b1) * (clip_norm if clip_norm > 0 else raw_norm)
  np.testing.assert_allclose(_first_moment_norm(state), want, rtol=1e-5)
  # Adam normalizes per coordinate: every update entry is at most lr in size, however large the gradient.
  assert float(jnp.max(jnp.abs(updates["w"]))) <= cfg.lr * (1 + 1e-5)


def test_clip_off_keeps_the_state_structure():
  params = _params()
  on = optim.make_optimizer(OptimConfig(clip_norm=1.0)).init(params)
  off = optim.make_optimizer(OptimConfig(clip_norm=0.0)).init(params)
  assert jax.tree.structure(on) == jax.tree.structure(off)


def test_current_lr_follows_the_schedule_under_jit():
  cfg = OptimConfig(lr=LR, warmup_steps=4, constant_steps=2, decay_steps=6)
  tx, schedule, params = optim.make_optimizer(cfg), optim.make_schedule(cfg), {"w": jnp.ones((2, 2))}

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    return optax.apply_updates(params, updates), state, optim.current_lr(state)

  state = tx.init(params)
  np.testing.assert_allclose(float(optim.current_lr(state)), 0.0)
  for i in range(14):
    params, state, lr = step(params, state)
    np.testing.assert_allclose(float(lr), float(schedule(i)), rtol=1e-6, atol=1e-12)


def test_bf16_first_moment():
  import dataclasses
  import jax.numpy as jnp
  from deepseek_jax.config import OptimConfig
  from deepseek_jax.optim import make_optimizer
  cfg = dataclasses.replace(OptimConfig(), mu_dtype="bfloat16", warmup_steps=1, decay_steps=0)
  params = {"w": jnp.ones((4, 4))}
  state = make_optimizer(cfg).init(params)
  mus = [leaf for leaf in jax.tree.leaves(state) if getattr(leaf, "shape", None) == (4, 4)]
  assert {str(m.dtype) for m in mus} == {"bfloat16", "float32"}   # mu in bf16, nu stays fp32
