"""KV-cached forward passes for generation: naive MLA for the prefill, absorbed MLA for decoding (spec section 10).

The cache of an MLA layer holds, per token, only the normed latent c_KV [C] and the roped shared key k_rope [R]
(576 values for V3, shared by all heads). A decode step multiplies q_nope into the latent space through W_UK
(q_lat = W_UK^T q_nope), scores q_lat . c_KV + q_rope . k_rope, takes the probability-weighted sum of latents and
only then applies W_UV and wo. DeepSeekMoE-16B ("mha") caches roped K and V per head.

Layout: right padding. Sequence b's token at position p sits in cache slot p, so RoPE position = slot and a
query at position p attends to slots <= p. The prefill writes slots [0, P) of every sequence (slots past a
prompt's length hold junk); a step over S new tokens starting at `start_B` writes slots start_b .. start_b+S-1
first, so every slot a query can see is valid.

Every function takes the model's own modules (`Transformer`, `Block`, `MLA`, `MHA`, `MTPModule`) and reads their
parameters; MoE layers run `MoE.__call__`, so on a mesh they take the same expert-parallel path as training.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from deepseek_jax import rope
from deepseek_jax.attention import MHA, MLA, dot_product_attention
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import dtype_of
from deepseek_jax.model import Block, MTPModule, Transformer
from sharding.rules import constrain

_MASK_VALUE = -1e30   # as attention.py: finite, so a fully masked row cannot produce NaN


class LatentCache(NamedTuple):
  """One MLA layer, absorbed form: what every head needs of every past token."""
  c_kv_BTC: jax.Array     # RMSNorm(c_KV), the compressed latent
  k_rope_BTR: jax.Array   # RoPE(k_pe), the decoupled key shared by all heads


class KVCache(NamedTuple):
  """One MHA layer: roped keys and values per head."""
  k_BTHK: jax.Array
  v_BTHO: jax.Array


LayerCache = Union[LatentCache, KVCache]
_CACHE_NAMES = ("batch", "seq", None)   # logical axes of a [B, T, X] cache entry (heads stay unsplit: [B,T,H,X])


def init_cache(cfg: ModelConfig, batch: int, max_len: int, n_layers: int) -> tuple[LayerCache, ...]:
  """Zeros in the compute dtype, one entry per layer."""
  dt = dtype_of(cfg)
  if cfg.attn_type == "mla":
    one = lambda: LatentCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dt),
                              jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dt))
  else:
    one = lambda: KVCache(jnp.zeros((batch, max_len, cfg.n_heads, cfg.qk_head_dim), dt),
                          jnp.zeros((batch, max_len, cfg.n_heads, cfg.v_head_dim), dt))
  return tuple(one() for _ in range(n_layers))


def cache_bytes_per_token(cfg: ModelConfig, n_layers: int | None = None) -> int:
  """Bytes the cache holds per token: L * (C + R) * itemsize for MLA, L * H * (K + R + O) * itemsize for MHA."""
  n_layers = cfg.n_layers if n_layers is None else n_layers
  per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attn_type == "mla"
               else cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim))
  return n_layers * per_layer * dtype_of(cfg).itemsize


def _write(cache_BTX, new_BSX, start_B):
  """cache[b, start_b + s] = new[b, s]."""
  B, S = new_BSX.shape[:2]
  slots_BS = start_B[:, None] + jnp.arange(S, dtype=start_B.dtype)
  out = cache_BTX.at[jnp.arange(B)[:, None], slots_BS].set(new_BSX.astype(cache_BTX.dtype))
  return constrain(out, _CACHE_NAMES + (None,) * (out.ndim - 3))


def _step_mask(start_B, S: int, T: int):
  """bool [B, S, 1, T]: the query at position start_b + s sees slots <= start_b + s."""
  pos_BS = start_B[:, None] + jnp.arange(S, dtype=start_B.dtype)
  return (jnp.arange(T)[None, None, :] <= pos_BS[:, :, None])[:, :, None, :]


# MLA ------------------------------------------------------------------------------------------------------

def _mla_query(mla: MLA, x_BSD, cos_sin):
  """(q_nope [B,S,H,K], roped q_pe [B,S,H,R]), as MLA.__call__ computes them."""
  cfg, dt = mla.cfg, x_BSD.dtype
  if cfg.q_lora_rank:
    cq_BSQ = mla.q_norm(x_BSD @ mla.wq_a[...].astype(dt))
    q_BSHX = jnp.einsum("bsq,qhx->bshx", cq_BSQ, mla.wq_b[...].astype(dt))
  else:
    q_BSHX = jnp.einsum("bsd,dhx->bshx", x_BSD, mla.wq[...].astype(dt))
  q_BSHX = constrain(q_BSHX, ("batch", "seq", "act_heads", None))
  K = cfg.qk_nope_head_dim
  return q_BSHX[..., :K], rope.apply_interleaved(q_BSHX[..., K:], *cos_sin)


def _mla_latent(mla: MLA, x_BSD, cos_sin):
  """What the cache keeps: (RMSNorm(c_KV) [B,S,C], RoPE(k_pe) [B,S,R])."""
  C = mla.cfg.kv_lora_rank
  kv_BSX = x_BSD @ mla.wkv_a[...].astype(x_BSD.dtype)
  k_rope_BSR = rope.apply_interleaved(kv_BSX[:, :, None, C:], *cos_sin)[:, :, 0]
  return mla.kv_norm(kv_BSX[..., :C]), k_rope_BSR


def mla_prefill(mla: MLA, x_BSD, cos_sin):
  """Naive (uncompressed) MLA over the prompt, the training math; also returns the latents to cache."""
  cfg, dt = mla.cfg, x_BSD.dtype
  K = cfg.qk_nope_head_dim
  q_nope_BSHK, q_pe_BSHR = _mla_query(mla, x_BSD, cos_sin)
  c_BSC, k_rope_BSR = _mla_latent(mla, x_BSD, cos_sin)
  kv_BSHY = jnp.einsum("bsc,chy->bshy", c_BSC, mla.wkv_b[...].astype(dt))
  kv_BSHY = constrain(kv_BSHY, ("batch", "seq", "act_heads", None))
  q_BSHK = jnp.concatenate([q_nope_BSHK, q_pe_BSHR], axis=-1)
  k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], q_pe_BSHR.shape)
  k_BSHK = jnp.concatenate([kv_BSHY[..., :K], k_rope_BSHR], axis=-1)
  o_BSHO = dot_product_attention(q_BSHK, k_BSHK, kv_BSHY[..., K:], None, cfg.softmax_scale, cfg.attn_impl)
  return jnp.einsum("bsho,hod->bsd", o_BSHO, mla.wo[...].astype(dt)), (c_BSC, k_rope_BSR)


def mla_decode(mla: MLA, x_BSD, cos_sin, cache: LatentCache, start_B):
  """Absorbed MLA for S new tokens at positions start_b + s: attention over latents, W_UV after the sum."""
  cfg, dt = mla.cfg, x_BSD.dtype
  K = cfg.qk_nope_head_dim
  q_nope_BSHK, q_pe_BSHR = _mla_query(mla, x_BSD, cos_sin)
  c_BSC, k_rope_BSR = _mla_latent(mla, x_BSD, cos_sin)
  cache = LatentCache(_write(cache.c_kv_BTC, c_BSC, start_B), _write(cache.k_rope_BTR, k_rope_BSR, start_B))
  wkv_b_CHY = mla.wkv_b[...].astype(dt)
  w_uk_CHK, w_uv_CHO = wkv_b_CHY[..., :K], wkv_b_CHY[..., K:]
  q_lat_BSHC = jnp.einsum("bshk,chk->bshc", q_nope_BSHK, w_uk_CHK)
  logits_BSHT = (jnp.einsum("bshc,btc->bsht", q_lat_BSHC, cache.c_kv_BTC, preferred_element_type=jnp.float32)
                 + jnp.einsum("bshr,btr->bsht", q_pe_BSHR, cache.k_rope_BTR, preferred_element_type=jnp.float32))
  mask_BS1T = _step_mask(start_B, x_BSD.shape[1], cache.c_kv_BTC.shape[1])
  logits_BSHT = jnp.where(mask_BS1T, logits_BSHT * cfg.softmax_scale, _MASK_VALUE)
  probs_BSHT = jax.nn.softmax(logits_BSHT, axis=-1).astype(dt)
  o_lat_BSHC = jnp.einsum("bsht,btc->bshc", probs_BSHT, cache.c_kv_BTC)
  o_BSHO = jnp.einsum("bshc,cho->bsho", o_lat_BSHC, w_uv_CHO)
  return jnp.einsum("bsho,hod->bsd", o_BSHO, mla.wo[...].astype(dt)), cache


# MHA (DeepSeekMoE-16B) ---------------------------------------------------------------------------------------

def _mha_qkv(mha: MHA, x_BSD, cos_sin):
  dt = x_BSD.dtype
  q_BSHK, k_BSHK, v_BSHO = (jnp.einsum("bsd,dhk->bshk", x_BSD, w[...].astype(dt))
                            for w in (mha.wq, mha.wk, mha.wv))
  return rope.apply_rotate_half(q_BSHK, *cos_sin), rope.apply_rotate_half(k_BSHK, *cos_sin), v_BSHO


def mha_prefill(mha: MHA, x_BSD, cos_sin):
  q_BSHK, k_BSHK, v_BSHO = _mha_qkv(mha, x_BSD, cos_sin)
  o_BSHO = dot_product_attention(q_BSHK, k_BSHK, v_BSHO, None, mha.cfg.softmax_scale, mha.cfg.attn_impl)
  return jnp.einsum("bsho,hod->bsd", o_BSHO, mha.wo[...].astype(x_BSD.dtype)), (k_BSHK, v_BSHO)


def mha_decode(mha: MHA, x_BSD, cos_sin, cache: KVCache, start_B):
  dt = x_BSD.dtype
  q_BSHK, k_BSHK, v_BSHO = _mha_qkv(mha, x_BSD, cos_sin)
  cache = KVCache(_write(cache.k_BTHK, k_BSHK, start_B), _write(cache.v_BTHO, v_BSHO, start_B))
  logits_BSHT = jnp.einsum("bshk,bthk->bsht", q_BSHK, cache.k_BTHK, preferred_element_type=jnp.float32)
  mask_BS1T = _step_mask(start_B, x_BSD.shape[1], cache.k_BTHK.shape[1])
  logits_BSHT = jnp.where(mask_BS1T, logits_BSHT * mha.cfg.softmax_scale, _MASK_VALUE)
  probs_BSHT = jax.nn.softmax(logits_BSHT, axis=-1).astype(dt)
  o_BSHO = jnp.einsum("bsht,btho->bsho", probs_BSHT, cache.v_BTHO)
  return jnp.einsum("bsho,hod->bsd", o_BSHO, mha.wo[...].astype(dt)), cache


# Blocks and the model ---------------------------------------------------------------------------------------

def _block(block: Block, h_BSD, attend):
  """Block.__call__ with the attention replaced by `attend(attn, x) -> (out, cache)`."""
  a_BSD, cache = attend(block.attn, block.attn_norm(h_BSD))
  h_BSD = constrain(h_BSD + a_BSD, ("batch", "seq", "act_embed"))
  x_BSD = block.ffn_norm(h_BSD)
  if block.is_moe:
    y_BSD, _ = block.ffn(x_BSD, jnp.ones(x_BSD.shape[:2], bool))
  else:
    y_BSD = block.ffn(x_BSD)
  return constrain(h_BSD + y_BSD, ("batch", "seq", "act_embed")), cache


def _prefill_attend(cos_sin, cache: LayerCache):
  """Causal attention over the prompt (cfg.attn_impl); its keys go to slots [0, P) of `cache`."""
  def attend(attn, x_BSD):
    fn = mla_prefill if isinstance(attn, MLA) else mha_prefill
    out, new = fn(attn, x_BSD, cos_sin)
    start_B = jnp.zeros((x_BSD.shape[0],), jnp.int32)
    return out, type(cache)(*(_write(c, n, start_B) for c, n in zip(cache, new)))
  return attend


def _decode_attend(cos_sin, start_B, cache: LayerCache):
  def attend(attn, x_BSD):
    fn = mla_decode if isinstance(attn, MLA) else mha_decode
    return fn(attn, x_BSD, cos_sin, cache, start_B)
  return attend


def _positions(start_B, S: int):
  return start_B[:, None] + jnp.arange(S, dtype=jnp.int32)


def prefill(model: Transformer, tokens_BP, caches):
  """Runs the prompt (right-padded to P) from an empty cache. -> (final normed hidden [B,P,D], caches)."""
  B, P = tokens_BP.shape
  cos_sin = rope.cos_sin(model.cfg, _positions(jnp.zeros((B,), jnp.int32), P))
  h_BSD = constrain(model._embed(tokens_BP), ("batch", "seq", "act_embed"))
  new = []
  for block, cache in zip(model.blocks(), caches):
    h_BSD, cache = _block(block, h_BSD, _prefill_attend(cos_sin, cache))
    new.append(cache)
  return model.norm(h_BSD), tuple(new)


def step(model: Transformer, tokens_BS, start_B, caches):
  """S new tokens per sequence at positions start_b + s (absorbed attention). -> (normed hidden, caches)."""
  cos_sin = rope.cos_sin(model.cfg, _positions(start_B, tokens_BS.shape[1]))
  h_BSD = constrain(model._embed(tokens_BS), ("batch", "seq", "act_embed"))
  new = []
  for block, cache in zip(model.blocks(), caches):
    h_BSD, cache = _block(block, h_BSD, _decode_attend(cos_sin, start_B, cache))
    new.append(cache)
  return model.norm(h_BSD), tuple(new)


def logits(model: Transformer, h_BSD):
  """float32 [B, S, V] from final (normed) hidden states."""
  return model._logits(h_BSD)


# Multi-token prediction (the speculative draft) ---------------------------------------------------------

def _mtp_input(model: Transformer, module: MTPModule, h_BSD, next_tokens_BS):
  """h'_i = eh_proj [enorm(emb(t_{i+1})) ; hnorm(h_i)] (embedding half first, as model.py)."""
  x_BSD = jnp.concatenate([module.enorm(model._embed(next_tokens_BS)), module.hnorm(h_BSD)], axis=-1)
  return x_BSD @ module.eh_proj[...].astype(x_BSD.dtype)


def mtp_prefill(model: Transformer, h_BPD, next_tokens_BP, cache: LayerCache):
  """MTP module 1 over the prompt: position i combines the main hidden h_i with token i+1.
  -> (MTP hidden [B,P,D], normed: `logits` of it predict token i+2; cache)."""
  module = model.mtp[0]
  B, P = next_tokens_BP.shape
  cos_sin = rope.cos_sin(model.cfg, _positions(jnp.zeros((B,), jnp.int32), P))
  x_BSD = _mtp_input(model, module, h_BPD, next_tokens_BP)
  h_BSD, cache = _block(module.block, x_BSD, _prefill_attend(cos_sin, cache))
  return module.norm(h_BSD), cache


def mtp_step(model: Transformer, h_BSD, next_tokens_BS, start_B, cache: LayerCache):
  """MTP module 1 for S positions start_b + s, given the main hidden there and the token after each."""
  module = model.mtp[0]
  cos_sin = rope.cos_sin(model.cfg, _positions(start_B, next_tokens_BS.shape[1]))
  x_BSD = _mtp_input(model, module, h_BSD, next_tokens_BS)
  h_BSD, cache = _block(module.block, x_BSD, _decode_attend(cos_sin, start_B, cache))
  return model._logits(module.norm(h_BSD)), cache
