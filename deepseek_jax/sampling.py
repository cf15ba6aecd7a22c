"""Next-token sampling: greedy, temperature, top-k, top-p, and the speculative accept/reject rule.

Order as in Hugging Face: divide by the temperature, keep the top-k logits, then the smallest set of tokens
whose probability reaches top-p. Everything is float32 over the whole vocabulary and works on a batch [B, V].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.config import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  temperature: float = 0.0   # 0 = greedy (argmax); top_k / top_p are then irrelevant
  top_k: int = 0             # keep the k most likely tokens; 0 = no limit
  top_p: float = 1.0         # keep the smallest set of tokens with total probability >= top_p; 1 = no limit

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = no limit)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits_BV, cfg: SamplingConfig):
  """Temperature-scaled float32 logits with every token outside top-k / top-p set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k and cfg.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if cfg.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV        # mass of the strictly more likely tokens
    keep_BV = before_BV < cfg.top_p                            # always keeps the most likely token
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def probs(logits_BV, cfg: SamplingConfig):
  """The distribution `sample` draws from, float32 [B, V]; one-hot on the argmax when greedy."""
  if cfg.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filter_logits(logits_BV, cfg), axis=-1)


def sample(key, logits_BV, cfg: SamplingConfig):
  """int32 [B]."""
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BV, cfg), axis=-1).astype(jnp.int32)


def speculative_accept(key, p_BV, q_BV, draft_B):
  """Speculative sampling (Leviathan et al. 2023): keep the draft d ~ q with probability min(1, p(d) / q(d)),
  else draw from normalize(max(p - q, 0)). The result is distributed exactly as p.
  -> (accepted bool [B], token int32 [B]: the draft if accepted, else the resampled token)."""
  k_accept, k_resample = jax.random.split(key)
  p_d = jnp.take_along_axis(p_BV, draft_B[:, None], axis=-1)[:, 0]
  q_d = jnp.take_along_axis(q_BV, draft_B[:, None], axis=-1)[:, 0]
  accepted_B = jax.random.uniform(k_accept, p_d.shape) * q_d < p_d
  residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
  residual_BV = jnp.where(residual_BV.sum(-1, keepdims=True) > 0, residual_BV, p_BV)   # p == q: never used
  resampled_B = jax.random.categorical(k_resample, jnp.log(residual_BV), axis=-1).astype(jnp.int32)
  return accepted_B, jnp.where(accepted_B, draft_B, resampled_B)
