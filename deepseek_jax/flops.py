"""Model FLOPs per token (spec section 11): matmuls 2 FLOPs per multiply-add, causal attention halved,
training = 3x forward, recomputation not counted."""

from __future__ import annotations

from deepseek_jax.config import ModelConfig


def attn_matmul_params(cfg: ModelConfig) -> int:
  d, H = cfg.dim, cfg.n_heads
  if cfg.attn_type == "mha":
    return 4 * d * H * cfg.qk_rope_head_dim
  q = (d * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim) if cfg.q_lora_rank else d * H * cfg.qk_head_dim
  kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  return q + kv + H * cfg.v_head_dim * d


def moe_matmul_params(cfg: ModelConfig) -> int:
  """Active per token: k routed + shared experts, plus the router."""
  return 3 * cfg.dim * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts) \
      + cfg.dim * cfg.n_routed_experts


def active_matmul_params(cfg: ModelConfig, mtp: bool = True) -> int:
  n_moe = cfg.n_moe_layers
  n_dense = cfg.n_layers - n_moe
  total = cfg.n_layers * attn_matmul_params(cfg) + n_dense * 3 * cfg.dim * cfg.inter_dim \
      + n_moe * moe_matmul_params(cfg) + cfg.dim * cfg.vocab_size
  if mtp:
    ffn = moe_matmul_params(cfg) if cfg.n_routed_experts else 3 * cfg.dim * cfg.inter_dim
    total += cfg.n_mtp_layers * (attn_matmul_params(cfg) + ffn + 2 * cfg.dim * cfg.dim
                                 + cfg.dim * cfg.vocab_size)
  return total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """QK^T and PV, causal (mean context S/2), per layer."""
  H = cfg.n_heads
  if cfg.attn_type == "mha":
    return H * 2 * cfg.qk_rope_head_dim * seq_len
  return H * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = True) -> float:
  blocks = cfg.n_layers + (cfg.n_mtp_layers if mtp else 0)
  fwd = 2 * active_matmul_params(cfg, mtp) + blocks * attention_flops_per_token(cfg, seq_len)
  return 3.0 * fwd


def moe_layer_flops(cfg: ModelConfig, n_tokens: int, train: bool = True) -> float:
  """One MoE layer (router, k routed and the shared experts) on n_tokens; train = forward + backward."""
  fwd = 2.0 * n_tokens * moe_matmul_params(cfg)
  return 3.0 * fwd if train else fwd


def attention_core_flops(cfg: ModelConfig, batch: int, seq_len: int, train: bool = True) -> float:
  """softmax(QK^T)V of one layer on [batch, seq_len], causal (half the square); train = forward + backward."""
  fwd = batch * seq_len * attention_flops_per_token(cfg, seq_len)
  return 3.0 * fwd if train else fwd
