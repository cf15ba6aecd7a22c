"""Expert load balance on a DeepSeek-shaped MoE (issue #9), the router's optimizer treatment, the load metrics.

The short training run uses the shape that collapsed on the bench config: many fine-grained experts, group-limited
routing, sigmoid scores, route scale 2.5, init std 0.006 and the aux-loss-free bias at DeepSeek-V3's rate 0.001.
With the router gate at the full learning rate its AdamW steps move every expert's score faster than the bias
can follow and all tokens end up on the same k experts; optim.router_lr_scale=0.1 keeps the load balanced.
"""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import data as data_lib
from deepseek_jax import optim, trainer
from deepseek_jax.config import ConfigError, OptimConfig, load_config
from deepseek_jax.run import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEEPSEEK_SHAPED = [
    "model.dim=64", "model.inter_dim=128", "model.moe_inter_dim=32", "model.n_layers=2", "model.n_dense_layers=1",
    "model.n_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=16", "model.v_head_dim=16", "model.n_routed_experts=32", "model.n_activated_experts=4",
    "model.n_expert_groups=4", "model.n_limited_groups=2", "model.route_scale=2.5", "model.score_func=sigmoid",
    "model.router_bias=true", "model.n_mtp_layers=0", "model.seq_aux_alpha=0.0001", "model.init_std=0.006",
    "model.moe_impl=dense", "model.max_seq_len=64", "data.seq_len=64", "train.batch_size=8",
    "train.bias_update_speed=0.001", "optim.lr=3e-3", "optim.warmup_steps=20", "optim.constant_steps=1000",
    "optim.decay_steps=0",
]
STEPS, SETTLED = 120, 80      # the load is checked from step SETTLED on


def _cfg(*extra):
  return load_config(ROOT / "configs/tiny.yaml", DEEPSEEK_SHAPED + list(extra))


def _load_max_per_step(cfg, steps: int) -> np.ndarray:
  """[steps, n_moe_layers] max expert load / mean load of each training step."""
  run = Run(cfg, jax.devices()[:1])
  state = run.init_state()
  batches = data_lib.make_dataset(cfg.data, batch_size=cfg.train.batch_size, split="train", process_index=0,
                                  process_count=1)
  out = []
  for _ in range(steps):
    state, metrics = run.train_step(state, run.device_batch(next(batches)))
    out.append(metrics["load_max"])
  return np.asarray(jax.device_get(out))


@pytest.mark.parametrize("router_lr_scale, balanced", [(0.1, True), (1.0, False)])
def test_load_stays_bounded_on_deepseek_shaped_moe(router_lr_scale, balanced):
  load_max = _load_max_per_step(_cfg(f"optim.router_lr_scale={router_lr_scale}"), STEPS)[SETTLED:]
  if balanced:
    assert load_max.max() <= 3.5 and load_max.mean() <= 2.5, load_max.round(2).tolist()
  else:   # the collapse this guards against: the busiest expert near E/k = 8x the mean
    assert load_max.mean() >= 5.0, load_max.round(2).tolist()


def _model_params():
  state = Run(_cfg("model.n_mtp_layers=1"), jax.devices()[:1]).init_state()
  return state.params


def test_router_mask_selects_every_moe_gate_and_nothing_else():
  params = _model_params()
  mask = optim.router_mask(params)
  chosen = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert chosen == {"['moe_layers']['ffn']['gate']", "['mtp'][0]['block']['ffn']['gate']"}


def test_router_lr_scale_scales_only_the_gate_update():
  params = _model_params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
  cfg = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
  full = optim.make_optimizer(cfg)
  part = optim.make_optimizer(dataclasses.replace(cfg, router_lr_scale=0.25))
  u_full, _ = full.update(grads, full.init(params), params)
  u_part, _ = part.update(grads, part.init(params), params)
  mask = optim.router_mask(params)
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(u_full), jax.tree.leaves(u_part)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a) * (0.25 if m else 1.0), rtol=1e-6)
  # The state's structure does not depend on the value (a resume may change it).
  assert jax.tree.structure(full.init(params)) == jax.tree.structure(part.init(params))
  assert float(optim.current_lr(part.update(grads, part.init(params), params)[1])) == pytest.approx(1e-2)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_router_lr_scale_out_of_range_is_a_one_line_error(value):
  with pytest.raises(ConfigError, match="router_lr_scale") as err:
    optim.make_optimizer(OptimConfig(router_lr_scale=value))
  assert "\n" not in str(err.value)


def test_load_metrics():
  load_LE = jnp.array([[5.0, 5.0, 5.0, 5.0], [20.0, 0.0, 0.0, 0.0], [10.0, 10.0, 0.0, 0.0]])
  m = jax.device_get(trainer.load_metrics(load_LE))
  np.testing.assert_allclose(m["load_max"], [1.0, 4.0, 2.0])
  np.testing.assert_allclose(m["load_min"], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(m["load_entropy"], [1.0, 0.0, 0.5], atol=1e-6)   # H / log E; log 2 / log 4 = 0.5
