"""Frozen, validated configuration: one dataclass per concern, loaded from YAML.

Field names follow DeepSeek's reference `ModelArgs` (dim, n_heads, q_lora_rank, ...). Einsum letters used
throughout the model are given next to each field (see the glossary in `model.py`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
  """A config value is unknown, of the wrong type or inconsistent."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture. Defaults are DeepSeek-V3-671B."""
  vocab_size: int = 129280        # V
  dim: int = 7168                 # D  residual width
  inter_dim: int = 18432          # dense SwiGLU hidden width
  moe_inter_dim: int = 2048       # F  routed-expert hidden width
  n_layers: int = 61              # main-model decoder blocks (MTP blocks not counted)
  n_dense_layers: int = 3         # first k blocks use the dense FFN
  moe_layer_freq: int = 1         # block i is MoE iff i >= n_dense_layers and i % freq == 0
  n_heads: int = 128              # H
  # --- attention ---
  attn_type: str = "mla"          # "mla" (V2/V3) or "mha" (DeepSeekMoE-16B, rotate-half RoPE on all dims)
  q_lora_rank: int = 1536         # Q  0 = no query compression (V2-Lite)
  kv_lora_rank: int = 512         # C  latent
  qk_nope_head_dim: int = 128     # K
  qk_rope_head_dim: int = 64      # R  decoupled RoPE dims (for "mha": the full head dim is rotated)
  v_head_dim: int = 128           # O
  # --- MoE ---
  n_routed_experts: int = 256     # E
  n_shared_experts: int = 1
  n_activated_experts: int = 8    # k  top-k
  n_expert_groups: int = 8        # G
  n_limited_groups: int = 4       # groups kept per token
  score_func: str = "sigmoid"     # "sigmoid" (V3) or "softmax" (V1/V2)
  router_bias: bool = True        # aux-loss-free selection bias (V3); also picks group score = sum of top-2
  norm_topk_prob: bool = True     # renormalize the k gate weights to sum 1
  route_scale: float = 2.5        # routed_scaling_factor, applied after normalization
  # --- positions ---
  max_seq_len: int = 163840
  rope_theta: float = 10000.0
  rope_factor: float = 40.0       # YaRN s; 1.0 = plain RoPE
  original_seq_len: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  rms_norm_eps: float = 1e-6
  # --- MTP and balancing ---
  n_mtp_layers: int = 1           # D in the paper; 0 disables MTP
  seq_aux_alpha: float = 0.0001   # sequence-wise balance loss weight; 0 disables
  # --- numerics and init ---
  init_std: float = 0.006
  dtype: str = "bfloat16"         # compute dtype; params stay float32
  # --- implementation ---
  moe_impl: str = "grouped"       # "grouped" (sort + grouped matmul) or "dense" (every expert on every token)
  capacity_factor: float = 0.0    # 0 = dropless; >0 = per-expert capacity ceil(cf * tokens * k / E)
  attn_impl: str = "xla"          # "xla" or "cudnn" (GPU only)
  remat: str = "none"             # "none", "full", "save_dots" (see model.REMAT_POLICIES)

  def __post_init__(self):
    _check_choice("model.attn_type", self.attn_type, ("mla", "mha"))
    _check_choice("model.score_func", self.score_func, ("sigmoid", "softmax"))
    _check_choice("model.dtype", self.dtype, ("bfloat16", "float32"))
    _check_choice("model.moe_impl", self.moe_impl, ("grouped", "dense"))
    _check_choice("model.attn_impl", self.attn_impl, ("xla", "cudnn"))
    _check_choice("model.remat", self.remat, ("none", "full", "save_dots"))
    for name in ("vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "v_head_dim", "max_seq_len"):
      _check_positive(f"model.{name}", getattr(self, name))
    if not 0 <= self.n_dense_layers <= self.n_layers:
      raise ConfigError(f"model.n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")
    if self.n_moe_layers:
      for name in ("moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_expert_groups"):
        _check_positive(f"model.{name}", getattr(self, name))
      if self.n_routed_experts % self.n_expert_groups:
        raise ConfigError(f"model.n_routed_experts={self.n_routed_experts} is not divisible by "
                          f"n_expert_groups={self.n_expert_groups}")
      if not 1 <= self.n_limited_groups <= self.n_expert_groups:
        raise ConfigError(f"model.n_limited_groups={self.n_limited_groups} must be in [1, n_expert_groups]")
      if self.n_activated_experts > self.n_limited_groups * self.experts_per_group:
        raise ConfigError(f"model.n_activated_experts={self.n_activated_experts} exceeds the experts left in "
                          f"{self.n_limited_groups} groups of {self.experts_per_group}")
      if self.router_bias and self.experts_per_group < 2 and self.n_expert_groups > 1:
        raise ConfigError("model.router_bias group scoring (sum of top-2) needs >= 2 experts per group")
    if self.attn_type == "mla" and (self.kv_lora_rank <= 0 or self.qk_nope_head_dim <= 0):
      raise ConfigError("model.attn_type='mla' needs kv_lora_rank > 0 and qk_nope_head_dim > 0")
    if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
      raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be positive and even")
    if self.attn_type == "mha" and (self.qk_nope_head_dim != 0 or self.v_head_dim != self.qk_rope_head_dim):
      raise ConfigError("model.attn_type='mha' rotates the whole head: set qk_nope_head_dim=0 and "
                        "v_head_dim=qk_rope_head_dim")
    if self.rope_factor < 1.0:
      raise ConfigError(f"model.rope_factor={self.rope_factor} must be >= 1 (1 = no YaRN)")
    if self.capacity_factor < 0:
      raise ConfigError(f"model.capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)")
    if self.n_mtp_layers < 0:
      raise ConfigError("model.n_mtp_layers must be >= 0")

  # Derived values -------------------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def experts_per_group(self) -> int:
    return self.n_routed_experts // max(self.n_expert_groups, 1)

  def is_moe_layer(self, i: int) -> bool:
    return self.n_routed_experts > 0 and i >= self.n_dense_layers and i % self.moe_layer_freq == 0

  @property
  def n_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.n_layers))

  @property
  def softmax_scale(self) -> float:
    """1/sqrt(d_qk), times mscale(s, mscale_all_dim)^2 when YaRN is on (spec section 3)."""
    scale = self.qk_head_dim ** -0.5
    if self.rope_factor > 1.0 and self.mscale_all_dim:
      m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
      scale *= m * m
    return scale


def yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Device mesh. The product of the sizes must equal the device count; -1 on one axis = the rest."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  path: str = ""                  # "" = bundled corpus; else a .txt / .jsonl / .array_record file or directory
  tokenizer: str = "byte"         # "byte" or a local tokenizer.json path
  jsonl_field: str = "text"
  seq_len: int = 256              # tokens per packed row (targets are shifted by one inside)
  val_fraction: float = 0.02      # held-out documents for eval
  seed: int = 0
  shuffle: bool = True
  num_workers: int = 0            # grain multiprocessing workers (0 = in-process)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  lr: float = 2.2e-4              # peak learning rate
  schedule: str = "deepseek"      # "deepseek" (warmup, constant, cosine, final constant) or "cosine"
  warmup_steps: int = 2000
  constant_steps: int = 0         # deepseek: steps at peak after warmup
  decay_steps: int = 0            # deepseek: cosine steps; cosine: total steps incl. warmup
  final_lr_ratio: float = 0.1     # lr at the end of the cosine, as a fraction of peak
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  mu_dtype: str = "float32"      # AdamW first moment; "bfloat16" as in DeepSeek-V3 (report 3.3) halves its memory
  # Router gate weights (MoE `gate`) learn at lr * router_lr_scale. 1.0 = one lr for all (V3 states no
  # separate treatment). <1 keeps the gate from outrunning the aux-loss-free bias on short warmups
  # (bench/results/2026-11-24-balance.md).
  router_lr_scale: float = 1.0

  def __post_init__(self):
    _check_choice("optim.schedule", self.schedule, ("deepseek", "cosine"))
    _check_choice("optim.mu_dtype", self.mu_dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 8             # global sequences per optimizer step
  grad_accum: int = 1             # micro-batches per step (batch_size must divide)
  seed: int = 0
  mtp_loss_weight: float = 0.3    # lambda
  bias_update_speed: float = 0.001  # gamma of the aux-loss-free balancing; 0 freezes the bias
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 10
  init_from: str = ""             # Hugging Face checkpoint dir to start from (fine-tuning); "" = random init
  ckpt_dir: str = ""              # "" = no checkpoints
  ckpt_every: int = 100
  ckpt_keep: int = 3
  log_file: str = ""              # JSONL metrics; "" = <ckpt_dir>/metrics.jsonl or none
  peak_tflops: float = 989.0      # per-device bf16 peak for MFU


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  def __post_init__(self):
    if self.train.batch_size % self.train.grad_accum:
      raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by "
                        f"train.grad_accum={self.train.grad_accum}")
    if self.data.seq_len > self.model.max_seq_len:
      raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


# Loading -------------------------------------------------------------------------------------------------

def _check_choice(name: str, value: Any, choices: tuple[str, ...]):
  if value not in choices:
    raise ConfigError(f"{name}={value!r} is not one of {choices}")


def _check_positive(name: str, value: int):
  if value <= 0:
    raise ConfigError(f"{name}={value} must be positive")


def _coerce(name: str, value: Any, typ: Any) -> Any:
  """Checks (and for int -> float, converts) a YAML value against the field's annotation."""
  if typ is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if typ is float and isinstance(value, str):
    try:
      return float(value)  # YAML 1.1 reads "1e-4" as a string
    except ValueError:
      pass
  if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
    raise ConfigError(f"{name}={value!r} should be of type {typ.__name__}")
  return value


def from_dict(cls, d: dict[str, Any], prefix: str = ""):
  """Builds dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
  if not isinstance(d, dict):
    raise ConfigError(f"section {prefix or '<root>'!r} must be a mapping, got {type(d).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if key not in fields:
      raise ConfigError(f"unknown config key {name!r} (known: {', '.join(sorted(fields))})")
    typ = hints[key]
    if dataclasses.is_dataclass(typ):
      kwargs[key] = from_dict(typ, value or {}, prefix=f"{name}.")
    else:
      kwargs[key] = _coerce(name, value, typ)
  return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
  if "=" not in item:
    raise ConfigError(f"override {item!r} must look like section.key=value")
  key, raw = item.split("=", 1)
  return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | pathlib.Path, overrides: typing.Sequence[str] = ()) -> Config:
  """Reads a YAML config and applies `section.key=value` overrides."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  raw = yaml.safe_load(path.read_text()) or {}
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: top level must be a mapping of sections")
  for item in overrides:
    keys, value = _parse_override(item)
    node = raw
    for k in keys[:-1]:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {k!r} is not a section")
    node[keys[-1]] = value
  try:
    return from_dict(Config, raw)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
