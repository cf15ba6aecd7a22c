"""Rotary position embeddings with YaRN (spec section 3).

MLA uses the original DeepSeek *interleaved* layout: pair i is (x[2i], x[2i+1]) rotated by angle p*f_i, so
original checkpoints load unchanged. DeepSeekMoE-16B ("mha") uses LLaMA's rotate-half layout on the whole head.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from deepseek_jax.config import ModelConfig, yarn_mscale


def _yarn_correction_dim(n_rot: float, dim: int, base: float, orig_len: int) -> float:
  return dim * math.log(orig_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> jnp.ndarray:
  """f_i for i in [0, R/2): plain theta^(-2i/R), blended towards theta_i/s by the YaRN ramp."""
  dim = cfg.qk_rope_head_dim
  freqs = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if cfg.rope_factor <= 1.0:
    return freqs
  low = max(math.floor(_yarn_correction_dim(cfg.beta_fast, dim, cfg.rope_theta, cfg.original_seq_len)), 0)
  high = min(math.ceil(_yarn_correction_dim(cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len)), dim - 1)
  if low == high:
    high += 0.001
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
  # ramp 0 -> keep theta_i (extrapolate, high frequency); ramp 1 -> theta_i / s (interpolate).
  return freqs / cfg.rope_factor * ramp + freqs * (1.0 - ramp)


def attention_factor(cfg: ModelConfig) -> float:
  """Multiplier on cos/sin (HF's YaRN 'attention_factor'); 1.0 for every released config."""
  if cfg.rope_factor <= 1.0:
    return 1.0
  if cfg.mscale and cfg.mscale_all_dim:
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
  return yarn_mscale(cfg.rope_factor, 1.0)


def cos_sin(cfg: ModelConfig, positions_BS: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-pair cos and sin, float32 [B, S, R/2]."""
  angles = positions_BS.astype(jnp.float32)[..., None] * inv_frequencies(cfg)
  factor = attention_factor(cfg)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_interleaved(x_BSHR: jnp.ndarray, cos_BSP: jnp.ndarray, sin_BSP: jnp.ndarray) -> jnp.ndarray:
  """Complex-pair rotation: (x0 + i x1) * e^{i phi}, written back in interleaved order."""
  x = x_BSHR.astype(jnp.float32)
  x0, x1 = x[..., 0::2], x[..., 1::2]                       # [B, S, H, R/2] each
  cos, sin = cos_BSP[:, :, None, :], sin_BSP[:, :, None, :]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # [B, S, H, R/2, 2]
  return out.reshape(x.shape).astype(x_BSHR.dtype)


def apply_rotate_half(x_BSHR: jnp.ndarray, cos_BSP: jnp.ndarray, sin_BSP: jnp.ndarray) -> jnp.ndarray:
  """LLaMA layout: pair i is (x[i], x[i + R/2])."""
  x = x_BSHR.astype(jnp.float32)
  half = x.shape[-1] // 2
  x0, x1 = x[..., :half], x[..., half:]
  cos, sin = cos_BSP[:, :, None, :], sin_BSP[:, :, None, :]
  out = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.astype(x_BSHR.dtype)
