"""One GRPO iteration on the host, and held-out accuracy: the glue a training loop calls.

    prompts_for_step -> rollout (generate_fn, rewards, advantages) -> score_fn (old / ref log-probs)
                     -> inner_steps x step_fn (grpo_step)

`score_fn` and `step_fn` are the jitted `grpo.score_rollout` and `grpo.grpo_step` with their static arguments
bound; `place` puts a host batch on the devices (e.g. with the training batch sharding). Nothing here is traced.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from deepseek_jax.config import Config
from deepseek_jax.posttrain import rollout as rollout_lib
from deepseek_jax.posttrain.rewards import RewardFn, accuracy_reward
from deepseek_jax.posttrain.template import Problem
from deepseek_jax.trainer import TrainState


def grpo_iteration(state: TrainState, iteration: int, key, *, cfg: Config, problems: Sequence[Problem],
                   generate_fn: rollout_lib.GenerateFn, reward_fn: RewardFn, tokenizer, ref: tuple[Any, Any] | None,
                   score_fn: Callable, step_fn: Callable, place: Callable = lambda b: b):
  """Rollout batch `iteration` (prompts and sampling key are functions of it) and its inner updates.

  `ref` = (params, bias) of the frozen reference, or None when posttrain.grpo.kl_beta is 0. Returns
  (new state, metrics of the last inner update merged with the rollout metrics, the RolloutBatch).
  """
  pt = cfg.posttrain
  group = pt.grpo.group_size
  prompts = rollout_lib.prompts_for_step(problems, iteration, cfg.train.batch_size // group, cfg.train.seed)
  rb = rollout_lib.rollout(generate_fn, (state.params, state.bias), prompts, group,
                           jax.random.fold_in(key, iteration), tokenizer=tokenizer, reward_fn=reward_fn,
                           max_prompt_len=pt.max_prompt_len, eos_id=pt.eos_id, adv_eps=pt.grpo.adv_eps)
  ref_params, ref_bias = ref if ref is not None else (None, None)
  batch = score_fn(place(rb.batch), state.params, state.bias, ref_params, ref_bias)
  for _ in range(pt.grpo.inner_steps):
    state, metrics = step_fn(state, batch)
  return state, {**jax.device_get(metrics), **rb.metrics(group)}, rb


def heldout_accuracy(generate_fn: rollout_lib.GenerateFn, variables, problems: Sequence[Problem], key, *,
                     cfg: Config, tokenizer, batch_prompts: int) -> float:
  """Fraction of `problems` whose sampled answer (one sample each, at posttrain.temperature) is right, in
  batches of `batch_prompts` (fixed, so the generator compiles once: the last batch is padded, not scored)."""
  pt = cfg.posttrain
  correct = 0.0
  for n, start in enumerate(range(0, len(problems), batch_prompts)):
    chunk = list(problems[start:start + batch_prompts])
    padded = chunk + [chunk[-1]] * (batch_prompts - len(chunk))
    rb = rollout_lib.rollout(generate_fn, variables, padded, 1, jax.random.fold_in(key, n), tokenizer=tokenizer,
                             reward_fn=accuracy_reward, max_prompt_len=pt.max_prompt_len, eos_id=pt.eos_id)
    correct += float(rb.rewards[:len(chunk)].sum())
  return correct / len(problems)
