"""Supervised fine-tuning data: prompt/response examples -> packed batches with the loss on responses only.

The batches have exactly the keys and meaning of `deepseek_jax.data` batches (inputs, targets, segment_ids,
positions, loss_mask; int32 [B, L]), so SFT runs through the unchanged `trainer.train_step`: the only difference
is that `loss_mask` is also 0 where the target token belongs to the prompt. MTP targets are masked the same
way (loss.mtp_targets shifts `loss_mask`). Examples are packed first-fit, several per row, kept apart by segment
ids; an example is never cut, so one longer than a row is an error.
"""

from __future__ import annotations

import functools
from typing import Sequence

import grain
import numpy as np

from deepseek_jax.config import PostTrainConfig
from deepseek_jax.data import DataError
from deepseek_jax.posttrain import arithmetic
from deepseek_jax.posttrain.template import Problem, encode_example, read_problems


def load_problems(pt: PostTrainConfig, split: str, seed: int = 0) -> list[Problem]:
  """The problems of `split` ("train" or "test"): the bundled arithmetic task, or `posttrain.data_path`.

  Bundled task: `train_problems` / `eval_problems` of them, with `sft_noise` applied to the train split's
  answers (the held-out answers stay exact).
  """
  if pt.data_path:
    problems = read_problems(pt.data_path, split)
    if not problems:
      raise DataError(f"posttrain.data_path {pt.data_path}: no {split} records")
    return problems
  n = pt.train_problems if split == "train" else pt.eval_problems
  problems = arithmetic.make_problems(n, split=split, digits=pt.task_digits, seed=seed)
  return arithmetic.add_noise(problems, pt.sft_noise, seed) if split == "train" and pt.sft_noise else problems


def encode_examples(tokenizer, problems: Sequence[Problem], eos_id: int, seq_len: int) -> list[dict]:
  """Template + tokenize every problem; refuses one that does not fit a row of seq_len + 1 tokens."""
  out = []
  for i, p in enumerate(problems):
    ex = encode_example(tokenizer, p, eos_id)
    if len(ex["tokens"]) > seq_len + 1:
      raise DataError(f"SFT example {i} ({p.prompt[:30]!r}) has {len(ex['tokens'])} tokens, more than "
                      f"data.seq_len + 1 = {seq_len + 1}: raise data.seq_len")
    out.append(ex)
  return out


def to_model_batch(batch_size: int, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows [b, L+1] -> shifted model inputs [B, L]. Position t predicts token t+1, which counts only when
  both are in the same example and token t+1 is part of the response. Short batches are padded with empty rows."""
  pad = ((0, batch_size - rows["tokens"].shape[0]), (0, 0))
  tokens, seg, pos, resp = (np.pad(rows[k], pad) for k in
                            ("tokens", "tokens_segment_ids", "tokens_positions", "response_mask"))
  seg_in, seg_tgt = seg[:, :-1], seg[:, 1:]
  loss_mask = (seg_in == seg_tgt) & (seg_in > 0) & (resp[:, 1:] > 0)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg_in, "positions": pos[:, :-1],
           "loss_mask": loss_mask}
  return {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in batch.items()}


def make_sft_dataset(examples: Sequence[dict], *, seq_len: int, batch_size: int, seed: int, train: bool = True,
                     process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Iterator of packed SFT batches of `batch_size` rows of `seq_len` (this process's share of the examples).

  train=True shuffles, repeats forever and drops a short last batch; train=False makes one ordered pass.
  Checkpoint with `it.get_state()` / `it.set_state(...)` as for `data.make_dataset`.
  """
  if batch_size < 1 or seq_len < 1:
    raise DataError(f"batch_size={batch_size} and data.seq_len={seq_len} must be positive")
  mine = list(examples)[process_index::process_count]
  if not mine:
    raise DataError(f"no SFT examples for process {process_index} of {process_count}")
  if too_long := [len(e["tokens"]) for e in mine if len(e["tokens"]) > seq_len + 1]:
    raise DataError(f"an SFT example has {too_long[0]} tokens, more than data.seq_len + 1 = {seq_len + 1}")
  ds = grain.MapDataset.source(mine)
  if train:
    ds = ds.shuffle(seed=seed).repeat()
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  row = seq_len + 1
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": row, "response_mask": row}, num_packing_bins=max(2 * batch_size, 32),
      seed=seed, shuffle_bins=train)
  ds = ds.batch(batch_size, drop_remainder=train).map(functools.partial(to_model_batch, batch_size))
  return iter(ds)
