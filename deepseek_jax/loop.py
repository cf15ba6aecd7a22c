"""The training loop: Grain batches -> Run.train_step (under the mesh) -> metrics, evals, Orbax checkpoints.

The loop dispatches step n+1 before it reads step n's metrics, so the host never stalls the device. Only
process 0 shows the progress bar and writes the metrics file; every process saves its own shards and its
own data-iterator position.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

from deepseek_jax import data as data_lib
from deepseek_jax import flops
from deepseek_jax import model as model_lib
from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.config import Config, ConfigError, to_dict
from deepseek_jax.run import Run


def evaluate(run: Run, state, cfg: Config) -> dict:
  """Validation loss and perplexity over `cfg.train.eval_batches` batches of the val split."""
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
  """Per-step metrics as JSON lines (one object per log step) and the progress bar's postfix; process 0 only.

  `record(step, metrics)` turns device metrics into floats and adds throughput over the steps since the last
  record: tokens_per_s and mfu (model FLOPs from flops.py over cfg.train.peak_tflops per device)."""

  def __init__(self, path: str, cfg: Config, start_step: int, bar):
    self.f = None
    if path and jax.process_index() == 0:
      pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
      self.f = open(path, "a")
    self.bar = bar
    self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    self.flops_per_step = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * self.tokens_per_step
    self.peak = cfg.train.peak_tflops * 1e12 * jax.device_count()
    self.t_last, self.step_last = time.perf_counter(), start_step

  def write(self, record: dict):
    if self.f:
      self.f.write(json.dumps(record) + "\n")
      self.f.flush()

  def record(self, step: int, metrics: dict) -> dict:
    m = _host_metrics(metrics)                     # blocks until the step's metrics are ready
    now = time.perf_counter()
    dt, n = max(now - self.t_last, 1e-9), max(step - self.step_last, 1)
    self.t_last, self.step_last = now, step
    m.update(step=step, tokens_per_s=self.tokens_per_step * n / dt, mfu=self.flops_per_step * n / dt / self.peak)
    self.write(m)
    self.bar.set_postfix(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_loss']:.3f}", lr=f"{m['lr']:.2e}",
                         tok_s=f"{m['tokens_per_s']:.0f}", mfu=f"{m['mfu']:.1%}")
    return m

  def close(self):
    if self.f:
      self.f.close()


def _host_metrics(m: dict) -> dict:
  out = {}
  for k, v in jax.device_get(m).items():
    v = np.asarray(v)
    out[k] = v.round(3).tolist() if v.ndim else float(v)
  return out


def _restore_or_init(run: Run, ckpt: Checkpointer | None, resume: bool, train_it):
  if resume:
    if ckpt is None:
      raise ConfigError("--resume needs train.ckpt_dir")
    if ckpt.latest_step() is not None:
      state = ckpt.restore(None, run.abstract_state(), train_it)
      if jax.process_index() == 0:
        print(f"resumed from {ckpt.directory} at step {int(state.step)}")
      return state
  return run.init_state()


def train(cfg: Config, resume: bool = False, devices=None):
  """Runs the loop. Returns (final state, list of logged metric dicts: train logs and evals)."""
  _check_vocab(cfg)
  run = Run(cfg, devices)
  cfg = run.cfg                 # machine-dependent choices resolved (recorded in checkpoints)
  train_it = data_lib.make_dataset(cfg.data, batch_size=_local_batch(cfg), split="train")
  ckpt = Checkpointer(cfg.train.ckpt_dir, keep=cfg.train.ckpt_keep, every=cfg.train.ckpt_every) \
      if cfg.train.ckpt_dir else None
  state = _restore_or_init(run, ckpt, resume, train_it)
  meta = {"config": to_dict(cfg), "process_count": jax.process_count()}
  start = int(state.step)
  bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, disable=jax.process_index() != 0,
             dynamic_ncols=True)
  log_path = cfg.train.log_file or (str(pathlib.Path(cfg.train.ckpt_dir) / "metrics.jsonl") if ckpt else "")
  log = MetricsLog(log_path, cfg, start, bar)
  if jax.process_index() == 0:
    print(f"model: {model_lib.count_params(state.params) / 1e6:.2f}M params, "
          f"{log.flops_per_step / log.tokens_per_step / 1e9:.3f} GFLOPs/token (train); mesh {dict(run.mesh.shape)}; "
          f"data {data_lib.corpus_stats(cfg.data)}")

  history, pending = [], None
  for step in bar:
    state, metrics = run.train_step(state, run.device_batch(next(train_it)))
    if ckpt:
      ckpt.save(step + 1, state, train_it, meta=meta)
    if pending is not None:                 # read step n-1 while step n runs
      history.append(log.record(*pending))
      pending = None
    if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
      pending = (step + 1, metrics)
    if cfg.train.eval_every and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.steps):
      ev = {"step": step + 1, **evaluate(run, state, cfg)}
      log.write(ev)
      if jax.process_index() == 0:          # tqdm.write prints even where the bar is disabled
        bar.write(f"step {step + 1}: val_loss {ev['val_loss']:.4f} val_ppl {ev['val_ppl']:.2f}")
      history.append(ev)
  if pending is not None:
    history.append(log.record(*pending))
  if ckpt:
    ckpt.save(int(state.step), state, train_it, meta=meta, force=True)
    ckpt.close()
  log.close()
  return state, history
