"""Losses: next-token cross entropy, Multi-Token Prediction (report Eq. 24-25) and their masks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Batch(NamedTuple):
  """One packed batch of int32 [B, S] arrays (data.py makes them; documents packed with segment ids)."""
  inputs: jax.Array       # token ids
  targets: jax.Array      # the next token of each input
  segment_ids: jax.Array  # document of each position within its row; 0 = padding
  positions: jax.Array    # position within its document
  loss_mask: jax.Array    # 1 where the target is a real next token of the same document

  @classmethod
  def from_dict(cls, d) -> "Batch":
    return cls(*(d[f] for f in cls._fields))


def cross_entropy_sum(logits_BSV, targets_BS, mask_BS):
  """Sum over masked positions of -log p(target), in float32."""
  logz_BS = jax.nn.logsumexp(logits_BSV.astype(jnp.float32), axis=-1)
  target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  return jnp.sum((logz_BS - target_logit_BS.astype(jnp.float32)) * mask_BS)


def mtp_targets(targets_BS, loss_mask_BS, segment_ids_BS, depth: int):
  """Targets and mask for MTP depth k: position i predicts targets[i + k] = token i+k+1.

  Valid only when position i+k exists, its target is valid, and i and i+k are in the same document.
  """
  S = targets_BS.shape[1]
  shifted_t = jnp.roll(targets_BS, -depth, axis=1)
  shifted_m = jnp.roll(loss_mask_BS, -depth, axis=1)
  in_range_S = jnp.arange(S) < S - depth
  same_doc = jnp.roll(segment_ids_BS, -depth, axis=1) == segment_ids_BS
  return shifted_t, shifted_m * in_range_S * same_doc


def lm_losses(logits_BSV, mtp_logits, batch: Batch, mtp_weight: float):
  """Main loss (mean over valid targets) and L_MTP = (lambda / D) sum_k L_k, each L_k divided by the
  main token count as in the report (the k-th depth has k fewer targets per document)."""
  mask_BS = batch.loss_mask.astype(jnp.float32)
  n_tokens = jnp.maximum(mask_BS.sum(), 1.0)
  main = cross_entropy_sum(logits_BSV, batch.targets, mask_BS) / n_tokens
  per_depth = []
  for k, logits_k in enumerate(mtp_logits, start=1):
    t_k, m_k = mtp_targets(batch.targets, mask_BS, batch.segment_ids, k)
    per_depth.append(cross_entropy_sum(logits_k, t_k, m_k) / n_tokens)
  mtp = sum(per_depth) / len(per_depth) if per_depth else jnp.zeros((), jnp.float32)
  return main, mtp, mtp_weight * mtp
