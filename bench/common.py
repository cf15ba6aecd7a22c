"""What the bench scripts share: config arguments, packed batches, timing, JSON output and tables."""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from deepseek_jax.config import Config, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_CONFIG = ROOT / "configs" / "bench.yaml"
SMOKE_CONFIG = ROOT / "configs" / "tiny.yaml"
# The tiny model as the bench config has it: no MTP, no balance loss, frozen router bias (Hugging Face's train
# step has none of them), a short warmup; one dense and one MoE layer, small enough for a CPU smoke run.
SMOKE_OVERRIDES = ["model.n_layers=2", "model.n_mtp_layers=0", "model.seq_aux_alpha=0.0", "train.bias_update_speed=0.0",
                   "optim.warmup_steps=2", "optim.decay_steps=0", "optim.constant_steps=100",
                   "train.batch_size=2", "data.seq_len=64"]


def config_args(p: argparse.ArgumentParser, out: str) -> None:
  p.add_argument("--config", default=str(BENCH_CONFIG), help="YAML config (default: configs/bench.yaml)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--smoke", action="store_true", help="CPU smoke run: configs/tiny.yaml, tiny shapes, few steps")
  p.add_argument("--out", default=str(ROOT / "runs" / "bench" / out), help="JSON results file")


def config_path(args) -> str:
  return str(SMOKE_CONFIG if args.smoke and args.config == str(BENCH_CONFIG) else args.config)


def bench_config(args, extra=()) -> Config:
  """The config file with the smoke overrides (if --smoke), then --set, then `extra` applied."""
  return load_config(config_path(args), (SMOKE_OVERRIDES if args.smoke else []) + list(args.set) + list(extra))


# Batches -------------------------------------------------------------------------------------------------

def packed_batches(cfg: Config, n: int, source: str) -> tuple[list[dict], str]:
  """n global batches (dicts of int32 [B, S], the fields of loss.Batch) and a description of their source.

  "real": the first n batches train.py would draw (deepseek_jax.data, Grain). "synthetic": random documents
  packed in numpy (for machines without Grain). "auto": real if Grain is installed, else synthetic.
  """
  if source == "auto":
    source = "real" if _has_grain() else "synthetic"
  B, S = cfg.train.batch_size, cfg.data.seq_len
  if source == "synthetic":
    vocab = 256 if cfg.data.tokenizer == "byte" else cfg.model.vocab_size
    return synthetic_batches(n, B, S, vocab, cfg.data.seed), f"synthetic (random documents, {vocab} token ids)"
  from deepseek_jax import data
  it = data.make_dataset(cfg.data, batch_size=B, split="train", process_index=0, process_count=1)
  return [next(it) for _ in range(n)], f"real (deepseek_jax.data: {cfg.data.path or 'bundled corpus'})"


def _has_grain() -> bool:
  import importlib.util
  return importlib.util.find_spec("grain") is not None


def synthetic_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
  """Rows of seq_len + 1 random tokens holding documents of random lengths (mean seq_len / 4), packed as
  deepseek_jax.data packs them: segment ids from 1, positions restarting per document, loss mask where the
  next token belongs to the same document."""
  rng = np.random.default_rng(seed)
  L = seq_len + 1
  out = []
  for _ in range(n):
    lengths = rng.geometric(min(1.0, 4.0 / seq_len), size=(batch, L))      # more than enough per row
    seg_BL = np.stack([np.repeat(np.arange(1, L + 1), row)[:L] for row in lengths]).astype(np.int32)
    starts_BL = np.concatenate([np.ones((batch, 1), bool), seg_BL[:, 1:] != seg_BL[:, :-1]], axis=1)
    idx_BL = np.broadcast_to(np.arange(L), (batch, L))
    pos_BL = idx_BL - np.maximum.accumulate(np.where(starts_BL, idx_BL, 0), axis=1)
    tok_BL = rng.integers(0, vocab, (batch, L), dtype=np.int32)
    out.append({"inputs": tok_BL[:, :-1], "targets": tok_BL[:, 1:], "segment_ids": seg_BL[:, :-1],
                "positions": pos_BL[:, :-1].astype(np.int32),
                "loss_mask": (seg_BL[:, :-1] == seg_BL[:, 1:]).astype(np.int32)})
  return out


# Timing and output ---------------------------------------------------------------------------------------

def seconds_per_call(fn, args, warmup: int, iters: int) -> float:
  """Mean wall time of `iters` back-to-back calls (dispatched without waiting, blocked at the end), after
  `warmup` calls. `fn` is a jitted (or compiled) JAX function."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)          # calls on one device run in order: the last is ready after all the others
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def write_json(path: str, results: dict) -> None:
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(json.dumps(results, indent=1, default=str))
  print(f"results: {p}")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """rows -> aligned text; columns are (key, header, format) with format like '.2f', ',.0f', '.1%' or 's'."""
  def cell(row, key, fmt):
    v = row.get(key)
    return "-" if v is None else format(v, fmt) if fmt != "s" else str(v)
  cells = [[cell(r, k, f) for k, _, f in columns] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
  just = [(str.ljust if f == "s" else str.rjust) for _, _, f in columns]   # text left, numbers right
  lines = ["  ".join(j(h, w) for (_, h, _), w, j in zip(columns, widths, just))]
  lines += ["  ".join(j(c, w) for c, w, j in zip(row, widths, just)) for row in cells]
  return "\n".join(line.rstrip() for line in lines)


def mesh_name(mesh) -> str:
  return "x".join(str(n) for n in mesh.axis_sizes)


def device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return {"device": d.device_kind, "platform": d.platform, "n_devices": jax.device_count(), "jax": jax.__version__}
