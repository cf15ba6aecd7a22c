"""Per-token log-probabilities of given sequences under the model: the policy, old-policy and reference terms of
GRPO, and the teacher/student distributions of distillation.

All work on model batches (inputs, targets, positions, segment_ids, loss_mask; [B, L]) and return float32 [B, L]
arrays that are 0 where loss_mask is 0, so masked positions can never leak into a sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax import model as model_lib


def forward_logits(graphdef, params, bias, batch, temperature: float = 1.0):
  """-> (logits_BLV / temperature in float32, aux). No MTP: post-training optimizes the main head only."""
  logits_BLV, aux = model_lib.apply(graphdef, params, bias, batch["inputs"], batch["positions"],
                                    batch["segment_ids"], mtp=False)
  return logits_BLV.astype(jnp.float32) / temperature, aux


def token_logprobs_from_logits(logits_BLV, targets_BL, mask_BL):
  """log softmax(logits)[target] at every position, zeroed where mask is 0."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return jnp.where(mask_BL > 0, logp_BL, 0.0)


def token_entropy_from_logits(logits_BLV, mask_BL):
  """Entropy of the next-token distribution at every position, zeroed where mask is 0."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  ent_BL = -jnp.sum(jnp.exp(logp_BLV) * logp_BLV, axis=-1)
  return jnp.where(mask_BL > 0, ent_BL, 0.0)


def sequence_logprobs(graphdef, params, bias, batch, temperature: float = 1.0):
  """Per-token log p(targets | prefix) of `batch` under the model at `temperature`: float32 [B, L], 0 off-mask.

  Use the sampling temperature, so the old-policy, reference and current log-probs describe the distribution
  the completions were actually drawn from.
  """
  logits_BLV, _ = forward_logits(graphdef, params, bias, batch, temperature)
  return token_logprobs_from_logits(logits_BLV, batch["targets"], batch["loss_mask"])
