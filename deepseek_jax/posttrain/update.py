"""The optimizer update shared by the post-training steps (GRPO, logit distillation).

Their losses are sums of per-token terms with weights computed over the whole batch (see `grpo.loss_weights`),
so the loss of a batch is exactly the sum of the losses of its micro-batches: gradients and metrics are summed
over micro-batches, never averaged. The router-bias update and load metrics are those of `trainer.train_step`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from deepseek_jax import trainer
from deepseek_jax.config import Config
from deepseek_jax.optim import make_schedule


def summed_grads(loss_fn: Callable, params, bias, batch: dict, n_micro: int):
  """sum over `n_micro` micro-batches (lax.scan) of grad, metrics and expert load of
  `loss_fn(params, bias, micro_batch) -> (loss, (metrics, load))` (load: the model's Aux.load tree)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  split = jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

  def micro(carry, mb):
    (_, (metrics, load)), grads = grad_fn(params, bias, mb)
    return jax.tree.map(jnp.add, carry, (grads, metrics, load)), None

  _, (m0, load0) = jax.eval_shape(loss_fn, params, bias, jax.tree.map(lambda x: x[0], split))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (jax.eval_shape(lambda p: p, params), m0, load0))
  (grads, metrics, load), _ = jax.lax.scan(micro, init, split)
  return grads, metrics, load


def apply_gradients(state: trainer.TrainState, grads, load, *, tx, cfg: Config):
  """Optimizer step and router-bias update -> (new state, metrics: grad_norm, lr, load_max/min). Without MTP
  in the forward, `load` has no MTP subtree and the MTP biases stay as they are."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bias = trainer.update_biases(state.bias, load, cfg.train.bias_update_speed)
  metrics = {"grad_norm": optax.tree.norm(grads), "lr": make_schedule(cfg.optim)(state.step),
             **trainer.load_metrics(load)}
  return trainer.TrainState(state.step + 1, params, opt_state, bias), metrics
