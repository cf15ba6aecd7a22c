"""Distillation into a smaller student (DeepSeek-R1 section 2.4).

Sequence level, as R1 does it: the teacher samples responses to the training prompts (`teacher_traces`, with
rejection sampling on the accuracy reward), they are written as JSONL (`template.write_problems`), and the
student is fine-tuned on them by plain SFT (`posttrain.sft`, `trainer.train_step`).

Logit level, when the teacher can run alongside the student: `distill_step` minimizes the forward KL
T^2 KL(softmax(z_teacher / T) || softmax(z_student / T)) per response token (Hinton et al.; the T^2 keeps the
gradient scale independent of T), optionally plus `ce_weight` times the cross entropy on the data's targets.
Teacher and student may differ in size and architecture but must share the tokenizer (vocab).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from deepseek_jax.config import Config, ModelConfig
from deepseek_jax.posttrain import logprobs as lp
from deepseek_jax.posttrain.grpo import loss_weights
from deepseek_jax.posttrain.rewards import accuracy_reward
from deepseek_jax.posttrain.rollout import GenerateFn, rollout
from deepseek_jax.posttrain.template import Problem
from deepseek_jax.posttrain.update import apply_gradients, summed_grads
from deepseek_jax.trainer import BATCH_KEYS, TrainState


def check_teacher(student: ModelConfig, teacher: ModelConfig) -> None:
  """One-line ValueError unless the two models share a vocabulary (the KL compares their distributions)."""
  if student.vocab_size != teacher.vocab_size:
    raise ValueError(f"teacher vocab_size={teacher.vocab_size} differs from the student's {student.vocab_size}: "
                     "logit distillation needs one tokenizer")


def teacher_traces(generate_fn: GenerateFn, teacher_params, problems: Sequence[Problem], key, *, tokenizer,
                   max_prompt_len: int, eos_id: int, samples_per_prompt: int = 1, keep_correct_only: bool = True,
                   prompts_per_batch: int = 64) -> list[Problem]:
  """The teacher's responses to `problems` as SFT records (`Problem.response` = the decoded response).

  Only finished responses (ending in eos) are kept, and with keep_correct_only only those the accuracy reward
  accepts (rejection sampling). Prompts go `prompts_per_batch` at a time, each batch with its own key.
  """
  out = []
  for n, start in enumerate(range(0, len(problems), prompts_per_batch)):
    chunk = list(problems[start:start + prompts_per_batch])
    rb = rollout(generate_fn, teacher_params, chunk, samples_per_prompt, jax.random.fold_in(key, n),
                 tokenizer=tokenizer, reward_fn=accuracy_reward, max_prompt_len=max_prompt_len, eos_id=eos_id)
    for b, text in enumerate(rb.completions):
      if rb.finished[b] and (rb.rewards[b] == 1.0 or not keep_correct_only):
        p = chunk[b // samples_per_prompt]
        out.append(Problem(p.prompt, p.answer, response=text))
  return out


def logit_kl(student_logits_BLV, teacher_logits_BLV, weight_BL, temperature: float):
  """T^2 sum_t w_t KL(p_teacher,T || p_student,T) at every position (float32)."""
  t_logp = jax.nn.log_softmax(teacher_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
  kl_BL = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return temperature ** 2 * jnp.sum(weight_BL * kl_BL)


def _loss_fn(params, bias, mb, teacher, *, graphdef, teacher_graphdef, cfg: Config, n_micro: int):
  dc = cfg.posttrain.distill
  t_params, t_bias = teacher
  t_logits, _ = lp.forward_logits(teacher_graphdef, t_params, t_bias, mb)
  s_logits, aux = lp.forward_logits(graphdef, params, bias, mb)
  kl = logit_kl(s_logits, jax.lax.stop_gradient(t_logits), mb["weight"], dc.temperature)
  ce = -jnp.sum(mb["weight"] * lp.token_logprobs_from_logits(s_logits, mb["targets"], mb["loss_mask"]))
  loss = kl + dc.ce_weight * ce + aux.aux_loss / n_micro
  metrics = {"loss": loss, "distill_kl": kl, "ce": ce, "aux_loss": aux.aux_loss / n_micro,
             "tokens": mb["loss_mask"].sum()}
  return loss, (metrics, aux.load)


def distill_step(state: TrainState, batch: dict, teacher, *, graphdef, teacher_graphdef, tx, cfg: Config):
  """One optimizer update of the student on a model batch (BATCH_KEYS; e.g. SFT batches) against the teacher's
  logits. `teacher` = (params, bias) of the frozen teacher, an argument (not part of the state, never donated).
  The KL and CE are means over all loss_mask tokens of the batch."""
  n_micro = cfg.train.grad_accum
  full = {k: batch[k] for k in BATCH_KEYS}
  full["weight"] = loss_weights(batch["loss_mask"], "token")
  loss_fn = functools.partial(_loss_fn, graphdef=graphdef, teacher_graphdef=teacher_graphdef, cfg=cfg,
                              n_micro=n_micro)
  grads, metrics, load_LE = summed_grads(
      lambda p, b, mb: loss_fn(p, b, mb, teacher), state.params, state.bias, full, n_micro)
  state, more = apply_gradients(state, grads, load_LE, tx=tx, cfg=cfg)
  return state, {**metrics, **more}
