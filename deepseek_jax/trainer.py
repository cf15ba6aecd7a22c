"""Pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` is a pure function: the graphdef, optimizer and config are
bound with functools.partial, then it is jitted once (with shardings and donation) by the caller.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import Config
from deepseek_jax.loss import lm_losses
from deepseek_jax.moe import update_router_bias
from deepseek_jax.optim import make_optimizer, make_schedule

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class TrainState(NamedTuple):
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: Any            # nested dict of float32 arrays (nnx.Param values)
  opt_state: Any         # optax state
  bias: Any              # nested dict of router biases (RouterBias values); updated without gradients


def init_state(cfg: Config, seed: int | None = None) -> tuple[Any, TrainState, optax.GradientTransformation]:
  """-> (graphdef, state, tx). Parameters are created on the default device(s) (see train.py for meshes)."""
  graphdef, params, bias = model_lib.split_model(model_lib.init_model(cfg.model, cfg.train.seed if seed is None
                                                                      else seed))
  tx = make_optimizer(cfg.optim)
  params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), bias), tx


def loss_fn(params, bias, batch, *, graphdef, cfg: Config):
  logits, aux = model_lib.apply(graphdef, params, bias, batch["inputs"], batch["positions"],
                                batch["segment_ids"], mtp=cfg.model.n_mtp_layers > 0)
  main, mtp_raw, mtp = lm_losses(logits, aux["mtp_logits"], batch, cfg.train.mtp_loss_weight)
  total = main + mtp + aux["aux_loss"]
  metrics = {"loss": main, "mtp_loss": mtp_raw, "aux_loss": aux["aux_loss"], "dropped": aux["dropped"],
             "tokens": batch["loss_mask"].sum()}
  return total, (metrics, aux["load"])


def _split_micro(batch, n: int):
  return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch: dict, *, graphdef, tx, cfg: Config):
  """One optimizer step over `cfg.train.grad_accum` micro-batches (lax.scan), then the bias update."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, cfg=cfg), has_aux=True)
  n_micro = cfg.train.grad_accum

  def micro(carry, mb):
    g_acc, m_acc, load_acc = carry
    (_, (metrics, load)), grads = grad_fn(state.params, state.bias, mb)
    return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, m_acc, metrics), load_acc + load), None

  zeros_g = jax.tree.map(jnp.zeros_like, state.params)
  first_mb = jax.tree.map(lambda x: x[0], _split_micro(batch, n_micro))
  _, (m0, load0) = jax.eval_shape(functools.partial(loss_fn, graphdef=graphdef, cfg=cfg),
                                  state.params, state.bias, first_mb)
  init = (zeros_g, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0), jnp.zeros(load0.shape, load0.dtype))
  (grads, metrics, load_LE), _ = jax.lax.scan(micro, init, _split_micro(batch, n_micro))
  grads = jax.tree.map(lambda g: g / n_micro, grads)
  metrics = {k: (v / n_micro if k in ("loss", "mtp_loss", "aux_loss") else v) for k, v in metrics.items()}

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bias = _update_biases(state.bias, load_LE, cfg.train.bias_update_speed)
  metrics.update(_load_metrics(load_LE))
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["lr"] = make_schedule(cfg.optim)(state.step)
  return TrainState(state.step + 1, params, opt_state, bias), metrics


def moe_bias_paths(bias_tree) -> list[tuple]:
  """Paths of the router-bias leaves in model order (main layers, then MTP), matching aux['load'] rows."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(bias_tree)[0]]
  return sorted(paths, key=lambda p: (str(p[0].key) != "layers", int(p[1].key)))


def _update_biases(bias_tree, load_LE, gamma: float):
  if not gamma or load_LE.shape[0] == 0:
    return bias_tree
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(bias_tree)
  order = {p: i for i, p in enumerate(moe_bias_paths(bias_tree))}
  new = [update_router_bias(b, load_LE[order[p]], gamma) for p, b in leaves_with_path]
  return jax.tree_util.tree_unflatten(treedef, new)


def _load_metrics(load_LE):
  """Per MoE layer: max and min expert load relative to the mean (1.0 = perfectly balanced), and load_entropy:
  the entropy of the load distribution p_e = load_e / sum(load) divided by log E (1.0 = uniform; every token
  on the same k experts gives log k / log E)."""
  if load_LE.shape[0] == 0:
    return {}
  rel_LE = load_LE / jnp.maximum(load_LE.mean(-1, keepdims=True), 1e-9)
  p_LE = load_LE / jnp.maximum(load_LE.sum(-1, keepdims=True), 1e-9)
  entropy_L = -jax.scipy.special.xlogy(p_LE, p_LE).sum(-1)
  return {"load_max": rel_LE.max(-1), "load_min": rel_LE.min(-1),
          "load_entropy": entropy_L / jnp.log(float(max(load_LE.shape[1], 2)))}


def eval_step(state: TrainState, batch: dict, *, graphdef, cfg: Config):
  """Summed validation loss and token count (for perplexity over many batches)."""
  _, (metrics, _) = loss_fn(state.params, state.bias, batch, graphdef=graphdef, cfg=cfg)
  return {"loss_sum": metrics["loss"] * metrics["tokens"], "tokens": metrics["tokens"]}
