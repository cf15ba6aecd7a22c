"""Causal self-attention on TPU through JAX's Pallas splash-attention kernel, for training.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is a flash-attention kernel: it walks
[block, block] tiles of the logits with an online softmax, skips the tiles above the diagonal and never holds
the [S, T] logits in memory, forward or backward. This file adapts it to the model's layout and needs:

- layout: the model's q/k/v are [B, S, H, K]; the kernel works on one sequence [H, S, K] (vmapped over B);
- packed batches: segment ids [B, S] go to the kernel (tokens attend only within their segment);
- MLA head dims (v_head_dim O != qk_head_dim K): V is zero-padded to K and the output sliced back to O. Exact:
  the padded columns of V only produce padded output columns;
- the softmax scale is folded into q (the kernel takes none);
- any S: the kernel's kv tile must be a multiple of 128 lanes, so S is zero-padded up to a multiple of the
  tile. Exact: padded keys come after every real query, so the causal mask hides them, and the padded queries'
  rows are sliced off.

`interpret=True` runs the same kernel through Pallas' interpreter (any backend, slow): the CPU tests use it.
Arrays here are one device's shard; under a mesh the caller wraps this in a shard_map (see attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

LANES = 128          # TPU lane width: the kernel's kv tile must be a multiple of it
DEFAULT_BLOCK = 512  # q and kv tile; shorter sequences use one tile of S rounded up to LANES


def splash_attention(q_BSHK, k_BSHK, v_BSHO, segment_ids_BS, *, scale: float, block: int = DEFAULT_BLOCK,
                     interpret: bool = False):
  """Causal softmax(q k^T * scale) v, restricted to equal segment ids when given. Returns [B, S, H, O].

  Same result as the XLA path for every row that has at least one visible key (always true for causal
  self-attention: a token sees itself).
  """
  B, S, H, K = q_BSHK.shape
  O = v_BSHO.shape[-1]
  if k_BSHK.shape != (B, S, H, K) or v_BSHO.shape[:3] != (B, S, H):
    raise ValueError(f"splash attention is self-attention with one layout: q {q_BSHK.shape}, k {k_BSHK.shape}, "
                     f"v {v_BSHO.shape} must agree on [B, S, H]")
  if block <= 0 or block % LANES:
    raise ValueError(f"splash attention block={block} must be a positive multiple of {LANES}")
  tile = min(block, _round_up(S, LANES))
  S_pad, D = _round_up(S, tile), max(K, O)

  def to_kernel_layout(x_BSHX, width):   # [B, S, H, X] -> [B, H, S_pad, width], zero-padded
    x_BSHX = jnp.pad(x_BSHX, ((0, 0), (0, S_pad - S), (0, 0), (0, width - x_BSHX.shape[-1])))
    return x_BSHX.transpose(0, 2, 1, 3)

  q_scaled_BSHK = (q_BSHK.astype(jnp.float32) * scale).astype(q_BSHK.dtype)
  q_BHSD, k_BHSD, v_BHSD = (to_kernel_layout(x, D) for x in (q_scaled_BSHK, k_BSHK, v_BSHO))
  seg_BS = None
  if segment_ids_BS is not None:
    # Padded positions get a segment of their own; causality already keeps real queries off them.
    seg_BS = jnp.pad(segment_ids_BS.astype(jnp.int32), ((0, 0), (0, S_pad - S)), constant_values=-1)

  kernel = _splash_kernel(H, S_pad, tile, interpret)

  def one_sequence(q_HSD, k_HSD, v_HSD, seg_S):
    ids = None if seg_S is None else splash.SegmentIds(q=seg_S, kv=seg_S)
    return kernel(q_HSD, k_HSD, v_HSD, segment_ids=ids)

  o_BHSD = jax.vmap(one_sequence)(q_BHSD, k_BHSD, v_BHSD, seg_BS)
  return o_BHSD[:, :, :S, :O].transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=64)
def _splash_kernel(n_heads: int, seq_len: int, tile: int, interpret: bool) -> splash.SplashAttentionKernel:
  """The causal kernel for one shape. Cached: building its block-sparsity tables is host work at trace time
  (seconds at S = 32k), and every layer asks for the same one. Built under compile-time evaluation, so its
  tables are concrete arrays (constants of every trace) and never a tracer that one trace would leak."""
  with jax.ensure_compile_time_eval():
    return _make_splash_kernel(n_heads, seq_len, tile, interpret)


def _make_splash_kernel(n_heads: int, seq_len: int, tile: int, interpret: bool) -> splash.SplashAttentionKernel:
  causal = splash_mask.CausalMask((seq_len, seq_len))
  sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                            block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                            block_q_dq=tile, block_kv_dq=tile)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([causal] * n_heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
