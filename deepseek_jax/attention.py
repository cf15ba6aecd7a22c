"""Multi-head Latent Attention (DeepSeek-V2/V3, report Eq. 1-11) and plain MHA (DeepSeekMoE-16B).

Training uses the "naive" MLA form: the latent c_KV is up-projected to per-head keys and values, which is the
cheaper form when every query attends to many keys (spec section 10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import rope
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import RMSNorm, linear, param
from sharding.rules import constrain

_MASK_VALUE = -1e30  # finite, so fully masked rows (padding) give uniform weights instead of NaN


def attention_mask(segment_ids_BS: jnp.ndarray | None, seq_len: int) -> jnp.ndarray:
  """Causal mask, restricted to the same packed document when segment ids are given: bool [B|1, 1, S, T]."""
  causal_ST = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  if segment_ids_BS is None:
    return causal_ST[None, None]
  same_BST = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
  return (causal_ST[None] & same_BST)[:, None]


def dot_product_attention(q_BSHK, k_BTHK, v_BTHO, mask_B1ST, scale: float, impl: str = "xla"):
  """softmax(q k^T * scale + mask) v, softmax in float32. Returns [B, S, H, O]."""
  if impl == "cudnn":
    return _cudnn_attention(q_BSHK, k_BTHK, v_BTHO, mask_B1ST, scale)
  logits_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BTHK, preferred_element_type=jnp.float32) * scale
  logits_BHST = jnp.where(mask_B1ST, logits_BHST, _MASK_VALUE)
  probs_BHST = jax.nn.softmax(logits_BHST, axis=-1).astype(v_BTHO.dtype)
  return jnp.einsum("bhst,bthd->bshd", probs_BHST, v_BTHO)


def _cudnn_attention(q_BSHK, k_BTHK, v_BTHO, mask_B1ST, scale):
  """cuDNN flash attention (GPU). The public API needs v_dim == qk_dim: zero-padding V is exact.

  For plain causal masks with v_dim != qk_dim (MLA), jax's private cuDNN wrapper takes V unpadded (cuDNN >= 9.10,
  Hopper+; ~20% faster fwd+bwd than padding on H100). It is a private API: any trace-time refusal falls back
  to the padded public path; DEEPSEEK_JAX_CUDNN_MLA=0 forces the fallback.
  """
  import os
  o_dim, k_dim = v_BTHO.shape[-1], q_BSHK.shape[-1]
  mask = None if mask_B1ST.shape[0] == 1 else mask_B1ST  # plain causal -> is_causal, no dense mask
  if mask is None and k_dim != o_dim and os.environ.get("DEEPSEEK_JAX_CUDNN_MLA", "1") != "0":
    try:
      from jax._src.cudnn import fused_attention_stablehlo as _fa
      return _fa.dot_product_attention(q_BSHK, k_BTHK, v_BTHO, scale=scale, mask_type=_fa.MaskType.CAUSAL,
                                       qkv_layout="BTNH")
    except (ImportError, AttributeError, ValueError, NotImplementedError, TypeError, RuntimeError):
      pass
  v_pad = jnp.pad(v_BTHO, ((0, 0), (0, 0), (0, 0), (0, k_dim - o_dim))) if k_dim > o_dim else v_BTHO
  out = jax.nn.dot_product_attention(q_BSHK, k_BTHK, v_pad, mask=mask, scale=scale, is_causal=True,
                                     implementation="cudnn")
  return out[..., :o_dim]


class MLA(nnx.Module):
  """Low-rank queries and keys/values with a decoupled, shared RoPE key."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    H, D, std = cfg.n_heads, cfg.dim, cfg.init_std
    if cfg.q_lora_rank:
      self.wq_a = param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"), std)
      self.q_norm = RMSNorm(cfg.q_lora_rank, 1e-6)   # HF and the reference fix 1e-6 for the latent norms
      self.wq_b = param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), std)
    else:
      self.wq = param(rngs, (D, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"), std)
    # [c_KV ; k_pe]: the latent (C) and one RoPE key shared by all heads (R).
    self.wkv_a = param(rngs, (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), std)
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, 1e-6)
    # per head: [k_nope (K) ; v (O)]
    self.wkv_b = param(rngs, (cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                       ("kv_lora", "heads", "head_dim"), std)
    self.wo = param(rngs, (H, cfg.v_head_dim, D), ("heads", "head_dim", "embed"), std)

  def __call__(self, x_BSD, cos_sin, mask_B1ST):
    cfg = self.cfg
    K = cfg.qk_nope_head_dim
    if cfg.q_lora_rank:
      cq_BSQ = self.q_norm(linear(cfg, x_BSD, self.wq_a[...]))
      q_BSHX = linear(cfg, cq_BSQ, self.wq_b[...])
    else:
      q_BSHX = linear(cfg, x_BSD, self.wq[...])
    q_BSHX = constrain(q_BSHX, ("batch", "seq", "act_heads", None))
    q_nope_BSHK, q_pe_BSHR = q_BSHX[..., :K], q_BSHX[..., K:]

    kv_BSX = linear(cfg, x_BSD, self.wkv_a[...])
    c_BSC, k_pe_BSR = kv_BSX[..., :cfg.kv_lora_rank], kv_BSX[..., cfg.kv_lora_rank:]
    kv_BSHY = linear(cfg, self.kv_norm(c_BSC), self.wkv_b[...])
    kv_BSHY = constrain(kv_BSHY, ("batch", "seq", "act_heads", None))
    k_nope_BSHK, v_BSHO = kv_BSHY[..., :K], kv_BSHY[..., K:]

    q_pe_BSHR = rope.apply_interleaved(q_pe_BSHR, *cos_sin)
    k_pe_BS1R = rope.apply_interleaved(k_pe_BSR[:, :, None, :], *cos_sin)
    q_BSHK = jnp.concatenate([q_nope_BSHK, q_pe_BSHR], axis=-1)
    k_BSHK = jnp.concatenate([k_nope_BSHK, jnp.broadcast_to(k_pe_BS1R, q_pe_BSHR.shape)], axis=-1)
    o_BSHO = dot_product_attention(q_BSHK, k_BSHK, v_BSHO, mask_B1ST, cfg.softmax_scale, cfg.attn_impl)
    return linear(cfg, o_BSHO, self.wo[...], n_in=2)


class MHA(nnx.Module):
  """DeepSeekMoE-16B attention: ordinary multi-head attention with rotate-half RoPE on the whole head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    H, D, hd, std = cfg.n_heads, cfg.dim, cfg.qk_rope_head_dim, cfg.init_std
    self.wq = param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), std)
    self.wk = param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), std)
    self.wv = param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), std)
    self.wo = param(rngs, (H, hd, D), ("heads", "head_dim", "embed"), std)

  def __call__(self, x_BSD, cos_sin, mask_B1ST):
    q_BSHK, k_BSHK, v_BSHO = (linear(self.cfg, x_BSD, w[...]) for w in (self.wq, self.wk, self.wv))
    q_BSHK = rope.apply_rotate_half(q_BSHK, *cos_sin)
    k_BSHK = rope.apply_rotate_half(k_BSHK, *cos_sin)
    o_BSHO = dot_product_attention(q_BSHK, k_BSHK, v_BSHO, mask_B1ST, self.cfg.softmax_scale,
                                   self.cfg.attn_impl)
    return linear(self.cfg, o_BSHO, self.wo[...], n_in=2)
