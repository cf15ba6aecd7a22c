"""Multi-head Latent Attention (DeepSeek-V2/V3, report Eq. 1-11) and plain MHA (DeepSeekMoE-16B).

Training uses the "naive" MLA form: the latent c_KV is up-projected to per-head keys and values, which is the
cheaper form when every query attends to many keys (spec section 10).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import rope
from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.tpu_attention import splash_attention
from deepseek_jax.layers import RMSNorm, linear, param
from sharding.rules import axis_size, constrain, current_mesh, mesh_spec

_MASK_VALUE = -1e30  # finite, so fully masked rows (padding) give uniform weights instead of NaN


def attention_mask(segment_ids_BS: jnp.ndarray | None, seq_len: int) -> jnp.ndarray:
  """Causal mask, restricted to the same packed document when segment ids are given: bool [B|1, 1, S, T]."""
  causal_ST = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  if segment_ids_BS is None:
    return causal_ST[None, None]
  same_BST = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
  return (causal_ST[None] & same_BST)[:, None]


def dot_product_attention(q_BSHK, k_BTHK, v_BTHO, segment_ids_BS, scale: float, impl: str = "xla"):
  """Causal softmax(q k^T * scale) v within each packed segment (one segment when `segment_ids_BS` is None),
  softmax in float32. Returns [B, S, H, O]. `impl` is ModelConfig.attn_impl:

  - "xla": the reference; materializes the [B, H, S, T] logits.
  - "cudnn": cuDNN flash attention (GPU) through jax's private wrapper, which takes V unpadded when
    O != K (MLA; cuDNN >= 9.10, Hopper+). Where cuDNN refuses the shapes, a one-line error names the next option.
  - "cudnn_padded": the public `jax.nn.dot_product_attention(implementation="cudnn")`, V zero-padded to K.
  - "splash": the Pallas TPU splash-attention kernel (kernels/tpu_attention.py); "splash_interpret" runs the
    same kernel in Pallas interpret mode on any backend (slow; for tests).
  A choice that cannot run here raises; none falls back to another.
  """
  if impl == "xla":
    return _xla_attention(q_BSHK, k_BTHK, v_BTHO, attention_mask(segment_ids_BS, q_BSHK.shape[1]), scale)
  if impl in ("cudnn", "cudnn_padded"):
    return _cudnn_attention(q_BSHK, k_BTHK, v_BTHO, segment_ids_BS, scale, impl)
  if impl in ("splash", "splash_interpret"):
    return _splash_attention(q_BSHK, k_BTHK, v_BTHO, segment_ids_BS, scale, impl)
  raise ValueError(f"unknown attention implementation {impl!r}: choose xla, cudnn, cudnn_padded, splash or "
                   f"splash_interpret")


def _xla_attention(q_BSHK, k_BTHK, v_BTHO, mask_B1ST, scale):
  logits_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BTHK, preferred_element_type=jnp.float32) * scale
  logits_BHST = jnp.where(mask_B1ST, logits_BHST, _MASK_VALUE)
  probs_BHST = jax.nn.softmax(logits_BHST, axis=-1).astype(v_BTHO.dtype)
  return jnp.einsum("bhst,bthd->bshd", probs_BHST, v_BTHO)


def _cudnn_attention(q_BSHK, k_BTHK, v_BTHO, segment_ids_BS, scale, impl):
  """cuDNN flash attention. Packed batches pass their [B, 1, S, T] mask, which cuDNN takes as a bias."""
  _require_backend(impl, "gpu")
  mask_B1ST = None if segment_ids_BS is None else attention_mask(segment_ids_BS, q_BSHK.shape[1])
  o_dim, k_dim = v_BTHO.shape[-1], q_BSHK.shape[-1]
  try:
    if impl == "cudnn":
      from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # private: takes V unpadded
      return cudnn_fa.dot_product_attention(q_BSHK, k_BTHK, v_BTHO, mask=mask_B1ST, scale=scale,
                                            mask_type=cudnn_fa.MaskType.CAUSAL, qkv_layout="BTNH")
    v_pad = jnp.pad(v_BTHO, ((0, 0), (0, 0), (0, 0), (0, k_dim - o_dim))) if k_dim > o_dim else v_BTHO
    out = jax.nn.dot_product_attention(q_BSHK, k_BTHK, v_pad, mask=mask_B1ST, scale=scale, is_causal=True,
                                       implementation="cudnn")
    return out[..., :o_dim]
  except (ImportError, AttributeError, ValueError, NotImplementedError, TypeError, RuntimeError) as e:
    other = "cudnn_padded" if impl == "cudnn" else "xla"
    raise ValueError(f"model.attn_impl={impl!r} cannot run q {q_BSHK.shape} {q_BSHK.dtype}, v {v_BTHO.shape}: "
                     f"{_first_line(e)}; use attn_impl={other!r}") from None


def _splash_attention(q_BSHK, k_BSHK, v_BSHO, segment_ids_BS, scale, impl):
  """The splash kernel on each device's shard: one shard_map over batch and heads under a mesh (a Pallas
  call is opaque to the compiler's partitioner, which would otherwise gather whole arrays around it)."""
  interpret = impl == "splash_interpret"
  if not interpret:
    _require_backend(impl, "tpu", also="or 'splash_interpret' to run the kernel interpreted (slow, for tests)")
  kernel = functools.partial(splash_attention, scale=scale, interpret=interpret)
  mesh = current_mesh()
  if mesh is None:
    return kernel(q_BSHK, k_BSHK, v_BSHO, segment_ids_BS)
  qkv_spec = mesh_spec(("batch", "seq", "act_heads", None), mesh)
  B, _, H, _ = q_BSHK.shape
  n_batch, n_heads = axis_size(mesh, qkv_spec[0]), axis_size(mesh, qkv_spec[2])
  if B % n_batch or H % n_heads:
    raise ValueError(f"model.attn_impl={impl!r} shards batch {B} over {qkv_spec[0]} ({n_batch}) and heads {H} "
                     f"over {qkv_spec[2]} ({n_heads}): both must divide")
  if segment_ids_BS is None:   # shard_map maps arrays only
    body, args, in_specs = (lambda q, k, v: kernel(q, k, v, None)), (q_BSHK, k_BSHK, v_BSHO), (qkv_spec,) * 3
  else:
    body, args = kernel, (q_BSHK, k_BSHK, v_BSHO, segment_ids_BS)
    in_specs = (qkv_spec,) * 3 + (mesh_spec(("batch", "seq"), mesh),)
  # check_vma=False: the kernel's outputs carry no varying-axes type, and the body has no collective to check.
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(*args)


def _require_backend(impl: str, platform: str, also: str = "") -> None:
  backend = jax.default_backend()
  if backend != platform:
    raise ValueError(f"model.attn_impl={impl!r} needs a {platform.upper()} backend, but JAX runs on {backend}: "
                     f"use attn_impl='xla'{', ' + also if also else ''}")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class MLA(nnx.Module):
  """Low-rank queries and keys/values with a decoupled, shared RoPE key."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    H, D, std = cfg.n_heads, cfg.dim, cfg.init_std
    if cfg.q_lora_rank:
      self.wq_a = param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"), std)
      self.q_norm = RMSNorm(cfg.q_lora_rank, 1e-6)   # HF and the reference fix 1e-6 for the latent norms
      self.wq_b = param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("lora_in", "heads", "head_dim"), std)
    else:
      self.wq = param(rngs, (D, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"), std)
    # [c_KV ; k_pe]: the latent (C) and one RoPE key shared by all heads (R).
    self.wkv_a = param(rngs, (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), std)
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, 1e-6)
    # per head: [k_nope (K) ; v (O)]
    self.wkv_b = param(rngs, (cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                       ("lora_in", "heads", "head_dim"), std)
    self.wo = param(rngs, (H, cfg.v_head_dim, D), ("heads", "head_dim", "embed"), std)

  def __call__(self, x_BSD, cos_sin, segment_ids_BS):
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
    o_BSHO = dot_product_attention(q_BSHK, k_BSHK, v_BSHO, segment_ids_BS, cfg.softmax_scale, cfg.attn_impl)
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

  def __call__(self, x_BSD, cos_sin, segment_ids_BS):
    q_BSHK, k_BSHK, v_BSHO = (linear(self.cfg, x_BSD, w[...]) for w in (self.wq, self.wk, self.wv))
    q_BSHK = rope.apply_rotate_half(q_BSHK, *cos_sin)
    k_BSHK = rope.apply_rotate_half(k_BSHK, *cos_sin)
    o_BSHO = dot_product_attention(q_BSHK, k_BSHK, v_BSHO, segment_ids_BS, self.cfg.softmax_scale,
                                   self.cfg.attn_impl)
    return linear(self.cfg, o_BSHO, self.wo[...], n_in=2)
