"""Train a DeepSeek-V3-style model: python train.py --config configs/tiny.yaml [--set section.key=value ...]

Grain data -> jitted pure train_step on a named mesh -> Orbax checkpoints (model, optimizer, router bias, step,
data position). The loop dispatches step n+1 before it reads step n's metrics, so the host never stalls the
device.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from deepseek_jax import data as data_lib
from deepseek_jax import flops, trainer
from deepseek_jax import model as model_lib
from deepseek_jax.checkpoint import Checkpointer, CheckpointError
from deepseek_jax.config import Config, ConfigError, load_config, to_dict
from deepseek_jax.data import DataError
from sharding import mesh as mesh_lib
from sharding import rules


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="YAML config (see configs/)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set train.steps=100 (repeatable)")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.ckpt_dir")
  return p.parse_args(argv)


class Run:
  """Holds the mesh, the jitted steps and the placement of state and batches for one config."""

  def __init__(self, cfg: Config, devices=None):
    self.cfg = cfg
    self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    mesh_lib.validate_mesh_for_model(self.mesh, cfg.model, cfg.train.batch_size // cfg.train.grad_accum)
    self.graphdef, abstract_params, abstract_bias = model_lib.abstract_model(cfg.model)
    self.param_sh = nnx.to_pure_dict(rules.param_shardings(abstract_params, self.mesh))
    self.bias_sh = nnx.to_pure_dict(rules.param_shardings(abstract_bias, self.mesh))
    batch_spec = rules.mesh_spec(("batch", None), self.mesh)
    self.batch_sh = NamedSharding(self.mesh, batch_spec)
    self.tx = trainer.make_optimizer(cfg.optim)
    self._abstract = jax.eval_shape(self._init_fn)   # the TrainState's shapes, traced once
    with jax.set_mesh(self.mesh):
      self.state_sh = self._state_shardings()
    step = functools.partial(trainer.train_step, graphdef=self.graphdef, tx=self.tx, cfg=cfg)
    self.train_step = jax.jit(step, in_shardings=(self.state_sh, self.batch_sh),
                              out_shardings=(self.state_sh, None), donate_argnums=0)
    ev = functools.partial(trainer.eval_step, graphdef=self.graphdef, cfg=cfg)
    self.eval_step = jax.jit(ev, in_shardings=(self.state_sh, self.batch_sh))

  def _state_shardings(self):
    """Optimizer moments follow their parameters; scalars (step, counts, lr) are replicated."""
    replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt_sh = _match_param_shardings(self._abstract.opt_state, self._abstract.params, self.param_sh, replicated)
    return trainer.TrainState(replicated, self.param_sh, opt_sh, self.bias_sh)

  def _init_fn(self):
    graphdef, params, bias = model_lib.split_model(model_lib.init_model(self.cfg.model, self.cfg.train.seed))
    params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
    return trainer.TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), bias)

  def init_state(self):
    if self.cfg.train.init_from:
      return self._state_from_hf(self.cfg.train.init_from)
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init_fn, out_shardings=self.state_sh)()

  def _state_from_hf(self, path: str):
    """Parameters and router biases from a Hugging Face checkpoint; fresh optimizer state."""
    from deepseek_jax.convert import load_hf_checkpoint
    hf_cfg, tree = load_hf_checkpoint(path, base=self.cfg.model, load_mtp=self.cfg.model.n_mtp_layers > 0)
    if diff := [f"{f.name}={getattr(hf_cfg, f.name)!r} (config: {getattr(self.cfg.model, f.name)!r})"
                for f in dataclasses.fields(hf_cfg) if getattr(hf_cfg, f.name) != getattr(self.cfg.model, f.name)]:
      raise ConfigError(f"train.init_from={path}: checkpoint architecture differs: {'; '.join(diff[:4])}")
    _, params, bias = model_lib.split_model(model_lib.from_pure_dict(self.cfg.model, tree))
    params = jax.device_put(nnx.to_pure_dict(params), self.param_sh)
    bias = jax.device_put(nnx.to_pure_dict(bias), self.bias_sh)
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_sh.step)
    return trainer.TrainState(step, params, opt_state, bias)

  def abstract_state(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self._abstract,
                        self.state_sh)

  def device_batch(self, local: dict) -> dict:
    local = {k: local[k] for k in trainer.BATCH_KEYS}
    return {k: jax.make_array_from_process_local_data(self.batch_sh, v) for k, v in local.items()}


def _match_param_shardings(opt_abs, params_abs, param_sh, replicated):
  """Optax states hold copies of the params tree (mu, nu): give those subtrees the params' shardings."""
  params_struct = jax.tree.structure(params_abs)

  def visit(node):
    if jax.tree.structure(node) == params_struct:
      return param_sh
    if isinstance(node, tuple) and hasattr(node, "_fields"):     # NamedTuple optax state
      return type(node)(*(visit(x) for x in node))
    if isinstance(node, (tuple, list)):
      return type(node)(visit(x) for x in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return jax.tree.map(lambda _: replicated, node)

  return visit(opt_abs)


def evaluate(run: Run, state, cfg: Config) -> dict:
  it = data_lib.make_dataset(cfg.data, batch_size=_local_batch(cfg), split="val")
  loss_sum, tokens = 0.0, 0.0
  for i, batch in enumerate(it):
    if i >= cfg.train.eval_batches:
      break
    out = run.eval_step(state, run.device_batch(batch))
    loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
  loss = loss_sum / max(tokens, 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


def _local_batch(cfg: Config) -> int:
  if cfg.train.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by {jax.process_count()} processes")
  return cfg.train.batch_size // jax.process_count()


def _check_vocab(cfg: Config):
  vocab = data_lib.vocab_size(cfg.data)
  if vocab > cfg.model.vocab_size:
    raise ConfigError(f"tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}")


class MetricsLog:
  """Per-step metrics as JSON lines (one object per log step); rank 0 only."""

  def __init__(self, path: str):
    self.f = None
    if path and jax.process_index() == 0:
      pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
      self.f = open(path, "a")

  def write(self, record: dict):
    if self.f:
      self.f.write(json.dumps(record) + "\n")
      self.f.flush()


def _host_metrics(m: dict) -> dict:
  out = {}
  for k, v in jax.device_get(m).items():
    v = np.asarray(v)
    out[k] = v.round(3).tolist() if v.ndim else float(v)
  return out


def train(cfg: Config, resume: bool = False, devices=None):
  """Runs the loop. Returns (final state, list of logged metric dicts: train logs and evals)."""
  _check_vocab(cfg)
  run = Run(cfg, devices)
  train_it = data_lib.make_dataset(cfg.data, batch_size=_local_batch(cfg), split="train")
  ckpt = Checkpointer(cfg.train.ckpt_dir, keep=cfg.train.ckpt_keep, every=cfg.train.ckpt_every) \
      if cfg.train.ckpt_dir else None
  state = None
  if resume:
    if ckpt is None:
      raise ConfigError("--resume needs train.ckpt_dir")
    if ckpt.latest_step() is not None:
      state = ckpt.restore(None, run.abstract_state(), train_it)
      print(f"resumed from {cfg.train.ckpt_dir} at step {int(state.step)}")
  if state is None:
    state = run.init_state()
  log_path = cfg.train.log_file or (str(pathlib.Path(cfg.train.ckpt_dir) / "metrics.jsonl") if ckpt else "")
  log = MetricsLog(log_path)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  flops_per_step = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
  peak = cfg.train.peak_tflops * 1e12 * jax.device_count()
  n_params = model_lib.count_params(state.params)
  print(f"model: {n_params / 1e6:.2f}M params, {flops_per_step / tokens_per_step / 1e9:.3f} GFLOPs/token (train); "
        f"mesh {dict(run.mesh.shape)}; data {data_lib.corpus_stats(cfg.data)}")

  start = int(state.step)
  history, pending = [], None
  bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, disable=jax.process_index() != 0,
             dynamic_ncols=True)
  t_last, step_last = time.perf_counter(), start
  for step in bar:
    state, metrics = run.train_step(state, run.device_batch(next(train_it)))
    if ckpt:
      ckpt.save(step + 1, state, train_it, meta={"config": to_dict(cfg)})
    if pending is not None:                 # read step n-1 while step n runs
      history.append(_log(pending, t_last, step_last, tokens_per_step, flops_per_step, peak, bar, log))
      t_last, step_last = time.perf_counter(), pending[0]
      pending = None
    if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
      pending = (step + 1, metrics)
    if cfg.train.eval_every and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.steps):
      ev = evaluate(run, state, cfg)
      ev = {"step": step + 1, **ev}
      log.write(ev)
      bar.write(f"step {step + 1}: val_loss {ev['val_loss']:.4f} val_ppl {ev['val_ppl']:.2f}")
      history.append(ev)
  if pending is not None:
    history.append(_log(pending, t_last, step_last, tokens_per_step, flops_per_step, peak, bar, log))
  if ckpt:
    ckpt.save(int(state.step), state, train_it, meta={"config": to_dict(cfg)}, force=True)
    ckpt.close()
  return state, history


def _log(pending, t_last, step_last, tokens_per_step, flops_per_step, peak, bar, log) -> dict:
  step, metrics = pending
  m = _host_metrics(metrics)
  dt = max(time.perf_counter() - t_last, 1e-9)
  n = max(step - step_last, 1)
  m.update(step=step, tokens_per_s=tokens_per_step * n / dt, mfu=flops_per_step * n / dt / peak)
  log.write(m)
  bar.set_postfix(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_loss']:.3f}", lr=f"{m['lr']:.2e}",
                  tok_s=f"{m['tokens_per_s']:.0f}", mfu=f"{m['mfu']:.1%}")
  return m


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    cfg = load_config(args.config, args.set)
    train(cfg, resume=args.resume)
  except (ConfigError, DataError, CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
