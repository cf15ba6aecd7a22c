"""Pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` is a pure function: the graphdef, optimizer and config are
bound with functools.partial, then run.Run jits it once (with shardings and donation) and calls it under
the run's mesh.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepseek_jax import model as model_lib
from deepseek_jax.config import Config
from deepseek_jax.loss import Batch, lm_losses
from deepseek_jax.moe import update_router_bias
from deepseek_jax.optim import make_schedule


BATCH_KEYS = Batch._fields


class TrainState(NamedTuple):
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: Any            # nested dict of float32 arrays (nnx.Param values)
  opt_state: Any         # optax state
  bias: Any              # nested dict of router biases (RouterBias values); updated without gradients


def loss_fn(params, bias, batch: Batch, *, graphdef, cfg: Config):
  logits, aux = model_lib.apply(graphdef, params, bias, batch.inputs, batch.positions, batch.segment_ids,
                                mtp=cfg.model.n_mtp_layers > 0)
  main, mtp_raw, mtp = lm_losses(logits, aux.mtp_logits, batch, cfg.train.mtp_loss_weight)
  total = main + mtp + aux.aux_loss
  metrics = {"loss": main, "mtp_loss": mtp_raw, "aux_loss": aux.aux_loss, "dropped": aux.dropped,
             "tokens": batch.loss_mask.sum()}
  return total, (metrics, aux.load)


def _split_micro(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...] with strided rows (micro-batch i = rows i, i+n, ...): every micro-batch is spread
  over all batch shards, as the whole batch is, instead of sitting on a few devices."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch: Batch, *, graphdef, tx, cfg: Config):
  """One optimizer step over `cfg.train.grad_accum` micro-batches (lax.scan), then the bias update."""
  loss = functools.partial(loss_fn, graphdef=graphdef, cfg=cfg)
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  n_micro = cfg.train.grad_accum
  micro_batches = _split_micro(batch, n_micro)

  def micro(acc, mb):
    (_, stats), grads = grad_fn(state.params, state.bias, mb)
    return jax.tree.map(jnp.add, acc, (grads, stats)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  _, stats_shape = jax.eval_shape(loss, state.params, state.bias, first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (state.params, stats_shape))
  (grads, (metrics, load)), _ = jax.lax.scan(micro, zeros, micro_batches)
  grads = jax.tree.map(lambda g: g / n_micro, grads)
  metrics = {k: (v / n_micro if k in ("loss", "mtp_loss", "aux_loss") else v) for k, v in metrics.items()}

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bias = update_biases(state.bias, load, cfg.train.bias_update_speed)
  metrics.update(load_metrics(load))
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["lr"] = make_schedule(cfg.optim)(state.step)
  return TrainState(state.step + 1, params, opt_state, bias), metrics


def update_biases(bias, load, gamma: float):
  """The aux-loss-free update of every router bias whose layer reported a load (`load` mirrors the bias tree;
  a subtree it lacks, e.g. the MTP blocks of a forward without MTP, keeps its biases)."""
  if not gamma:
    return bias
  if not isinstance(bias, dict):
    return update_router_bias(bias, load, gamma)
  return {k: update_biases(v, load[k], gamma) if k in load else v for k, v in bias.items()}


def load_metrics(load) -> dict:
  """Per MoE layer (model order, then MTP): max and min expert load relative to the mean (1.0 = balanced), and
  load_entropy: the entropy of p_e = load_e / sum(load) over log E (1.0 = uniform; all tokens on the same k
  experts gives log k / log E)."""
  leaves = jax.tree.leaves(load)
  if not leaves:
    return {}
  load_LE = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in leaves])
  rel_LE = load_LE / jnp.maximum(load_LE.mean(-1, keepdims=True), 1e-9)
  p_LE = load_LE / jnp.maximum(load_LE.sum(-1, keepdims=True), 1e-9)
  entropy_L = -jax.scipy.special.xlogy(p_LE, p_LE).sum(-1)
  return {"load_max": rel_LE.max(-1), "load_min": rel_LE.min(-1),
          "load_entropy": entropy_L / jnp.log(float(max(load_LE.shape[1], 2)))}


def eval_step(state: TrainState, batch: Batch, *, graphdef, cfg: Config):
  """Summed validation loss and token count (for perplexity over many batches)."""
  _, (metrics, _) = loss_fn(state.params, state.bias, batch, graphdef=graphdef, cfg=cfg)
  return {"loss_sum": metrics["loss"] * metrics["tokens"], "tokens": metrics["tokens"]}
