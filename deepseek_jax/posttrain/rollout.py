"""Rollouts: sample G completions per prompt with an injected generator, reward them, lay them out for GRPO.

The generator is a seam: any callable with the `GenerateFn` contract (the project's KV-cached sampler, or in tests
a plain sampler over `model.apply`). Everything else here is host-side NumPy and Python (templating, decoding,
rule-based rewards), then `grpo.group_advantages`.

Row layout of a rollout batch (P = max_prompt_len, N = generated tokens, L = P + N - 1 model positions):

    tokens   [0 0 0 | u s e r   p r o m p t | c o m p l e t i o n <eos> | 0 0 ]
    segment   0 0 0   1 ...                                          ... 1   0 0
    positions         0 1 2 ...                                                       (0 on padding)
    loss_mask: 1 where the *target* is a completion token up to and including the first eos.

inputs/targets are the row shifted by one, as in every model batch. Rows i*G .. i*G+G-1 share prompt i.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from deepseek_jax.posttrain.grpo import group_advantages
from deepseek_jax.posttrain.rewards import accuracy_reward
from deepseek_jax.posttrain.template import Problem, format_prompt

GenerateFn = Callable[[Any, np.ndarray, np.ndarray, Any], Any]
"""generate_fn(params, prompt_tokens_BP, prompt_lens_B, key) -> completion_tokens_BN (int).

prompt_tokens_BP: int32, each prompt right-aligned in P columns (left-padded with 0); prompt_lens_B: its real
tokens. Returns N sampled tokens per row, conditioned on the prompt at positions 0..len-1 and drawn at the
configured temperature; tokens after the first eos are ignored. Rows are independent samples given `key`."""


class RolloutBatch(NamedTuple):
  batch: dict[str, np.ndarray]    # int32 [B, L] inputs, targets, segment_ids, positions, loss_mask; float32 advantages
  rewards: np.ndarray             # float32 [B]
  completions: list[str]          # decoded completions, eos excluded
  answers: list[str]              # the reference answer of each row's prompt
  completion_lens: np.ndarray     # int32 [B] completion tokens in the loss (eos included)
  finished: np.ndarray            # bool [B] an eos was generated

  def metrics(self, group_size: int) -> dict[str, float]:
    """Reward mean and std over the batch, mean within-group std, answer accuracy (`rewards.accuracy_reward`,
    whatever the training reward), completion length in tokens, fraction of completions that ended in eos."""
    groups_NG = self.rewards.reshape(-1, group_size)
    accuracy = np.mean([accuracy_reward(c, a) for c, a in zip(self.completions, self.answers)])
    return {"reward_mean": float(self.rewards.mean()), "reward_std": float(self.rewards.std()),
            "reward_group_std": float(groups_NG.std(axis=1).mean()), "accuracy": float(accuracy),
            "completion_len": float(self.completion_lens.mean()), "finished": float(self.finished.mean())}


def encode_prompts(tokenizer, prompts: Sequence[Problem], max_prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Templated prompts, right-aligned in [B, max_prompt_len] int32 (left-padded with 0), and their lengths."""
  tokens_BP = np.zeros((len(prompts), max_prompt_len), np.int32)
  lens_B = np.zeros(len(prompts), np.int32)
  for b, p in enumerate(prompts):
    ids = tokenizer.encode(format_prompt(p.prompt))
    if not 0 < len(ids) <= max_prompt_len:
      raise ValueError(f"prompt {p.prompt[:30]!r} has {len(ids)} tokens with the template; "
                       f"posttrain.max_prompt_len is {max_prompt_len}")
    tokens_BP[b, max_prompt_len - len(ids):] = ids
    lens_B[b] = len(ids)
  return tokens_BP, lens_B


def completion_lengths(completions_BN: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokens up to and including the first eos (N when there is none), and whether an eos was found."""
  is_eos_BN = completions_BN == eos_id
  finished_B = is_eos_BN.any(axis=1)
  lens_B = np.where(finished_B, is_eos_BN.argmax(axis=1) + 1, completions_BN.shape[1])
  return lens_B.astype(np.int32), finished_B


def layout(prompts_BP: np.ndarray, prompt_lens_B: np.ndarray, completions_BN: np.ndarray,
           completion_lens_B: np.ndarray) -> dict[str, np.ndarray]:
  """The model batch of prompt + completion rows (module docstring), int32 [B, P + N - 1]."""
  B, P = prompts_BP.shape
  N = completions_BN.shape[1]
  col_R = np.arange(P + N)
  start_B1, end_B1 = (P - prompt_lens_B)[:, None], (P + completion_lens_B)[:, None]
  real_BR = (col_R >= start_B1) & (col_R < end_B1)                       # prompt + completion through eos
  row_BR = np.where(real_BR, np.concatenate([prompts_BP, completions_BN], axis=1), 0)
  positions_BR = np.where(real_BR, col_R - start_B1, 0)
  target_is_completion_BR = (col_R >= P) & (col_R < end_B1)
  batch = {"inputs": row_BR[:, :-1], "targets": row_BR[:, 1:], "segment_ids": real_BR[:, :-1],
           "positions": positions_BR[:, :-1], "loss_mask": target_is_completion_BR[:, 1:]}
  return {k: np.ascontiguousarray(v, np.int32) for k, v in batch.items()}


def rollout(generate_fn: GenerateFn, params, prompts: Sequence[Problem], group_size: int, key, *, tokenizer,
            reward_fn: Callable[[str, str], float], max_prompt_len: int, eos_id: int,
            adv_eps: float = 1e-4) -> RolloutBatch:
  """Samples `group_size` completions for each prompt with `generate_fn(params, ..., key)`, decodes them, rewards
  each with `reward_fn(completion_text, problem.answer)` and returns the rollout batch with group-normalized
  advantages on every completion token (old/ref log-probs are added by `grpo.score_rollout`)."""
  if not prompts:
    raise ValueError("rollout got no prompts")
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be >= 1")
  rows = [p for p in prompts for _ in range(group_size)]
  prompts_BP, prompt_lens_B = encode_prompts(tokenizer, rows, max_prompt_len)
  completions_BN = np.asarray(generate_fn(params, prompts_BP, prompt_lens_B, key))
  if completions_BN.ndim != 2 or completions_BN.shape[0] != len(rows) or completions_BN.shape[1] < 1:
    raise ValueError(f"generate_fn returned shape {completions_BN.shape}, expected ({len(rows)}, max_new_tokens)")
  lens_B, finished_B = completion_lengths(completions_BN, eos_id)
  texts = [tokenizer.decode(completions_BN[b, :lens_B[b] - finished_B[b]].tolist()) for b in range(len(rows))]
  rewards_B = np.zeros(len(rows), np.float32)
  for b, (text, problem) in enumerate(zip(texts, rows)):
    rewards_B[b] = r = float(reward_fn(text, problem.answer))
    if not math.isfinite(r):
      raise ValueError(f"reward {r} (not finite) for completion {b} of prompt {problem.prompt[:30]!r}")
  batch = layout(prompts_BP, prompt_lens_B, completions_BN, lens_B)
  adv_B = np.asarray(group_advantages(rewards_B, group_size, adv_eps))
  batch["advantages"] = (adv_B[:, None] * batch["loss_mask"]).astype(np.float32)
  return RolloutBatch(batch, rewards_B, texts, [p.answer for p in rows], lens_B, finished_B)


def prompts_for_step(problems: Sequence[Problem], step: int, n: int, seed: int) -> list[Problem]:
  """The `n` prompts of rollout step `step`: epochs of a seeded permutation, a pure function of the step (so a
  resumed run draws the same prompts without any iterator state)."""
  if not problems or n < 1:
    raise ValueError(f"need problems and n >= 1 prompts per step (got {len(problems)} problems, n={n})")
  out, perms = [], {}
  for i in range(step * n, step * n + n):
    epoch, j = divmod(i, len(problems))
    if epoch not in perms:
      perms[epoch] = np.random.default_rng([seed, epoch]).permutation(len(problems))
    out.append(problems[perms[epoch][j]])
  return out
