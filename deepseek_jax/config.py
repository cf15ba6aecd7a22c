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
class GmmTiles:
  """Tile shapes of the Mosaic-GPU grouped-matmul kernels (kernels/grouped_matmul.py). Defaults measured on
  H100 at the bench shapes (bench/README.md)."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 2           # forward / input-gradient kernel
  wgrad_grid_block_n: int = 1     # weight-gradient kernel
  fuse_w13: bool = True           # one [E, D, 2F] gate|up matmul instead of two [E, D, F] ones


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
  fp8: str = "none"               # FP8 Linear GEMMs (deepseek_jax/fp8.py): "none", "blockwise" (DeepSeek-V3: 1x128
                                  # activation / 128x128 weight tiles), "rowwise" or "tensorwise" (for comparison)
  fp8_gemm: str = "f8"            # "f8": e4m3 operands into XLA's GEMM (cuBLASLt, sm >= 8.9); "mgpu": Pallas Hopper
                                  # kernel, fp32 promotion in registers; "qdq": quantize-dequantize around an
                                  # ordinary GEMM (FP8 numerics at bf16 speed, runs anywhere)
  # --- implementation ---
  moe_impl: str = "grouped"       # "grouped" (sort + grouped matmul) or "dense" (every expert on every token)
  capacity_factor: float = 0.0    # 0 = dropless; >0 = per-expert capacity ceil(cf * tokens * k / E)
  gmm_impl: str = "auto"          # dropless grouped matmul: "auto" (mgpu on Hopper, else xla), "xla", "mgpu", "ref"
  gmm_tiles: GmmTiles = dataclasses.field(default_factory=GmmTiles)
  attn_impl: str = "xla"          # "xla", "cudnn" / "cudnn_padded" (GPU), "splash" (TPU), "splash_interpret" (tests)
  remat: str = "none"             # "none", "full", "save_dots" (see model.REMAT_POLICIES)
  scan_layers: bool = True        # lax.scan over each layer stack (compile time flat in depth); False unrolls the
                                  # same stacked parameters (faster on one GPU without remat: scan keeps more buffers)

  def __post_init__(self):
    _check_choice("model.attn_type", self.attn_type, ("mla", "mha"))
    _check_choice("model.score_func", self.score_func, ("sigmoid", "softmax"))
    _check_choice("model.dtype", self.dtype, ("bfloat16", "float32"))
    _check_choice("model.moe_impl", self.moe_impl, ("grouped", "dense"))
    _check_choice("model.gmm_impl", self.gmm_impl, ("auto", "xla", "mgpu", "ref"))
    _check_choice("model.attn_impl", self.attn_impl,
                  ("xla", "cudnn", "cudnn_padded", "splash", "splash_interpret"))
    _check_choice("model.remat", self.remat, ("none", "full", "save_dots"))
    _check_choice("model.fp8", self.fp8, ("none", "blockwise", "rowwise", "tensorwise"))
    _check_choice("model.fp8_gemm", self.fp8_gemm, ("f8", "mgpu", "qdq"))
    for name in ("vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "v_head_dim", "max_seq_len"):
      _check_positive(f"model.{name}", getattr(self, name))
    if self.moe_layer_freq != 1:
      raise ConfigError(f"model.moe_layer_freq={self.moe_layer_freq}: layers are scanned as a dense prefix and an "
                        f"MoE stack, so it must be 1 (as in every DeepSeek release)")
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


# Post-training (DeepSeek-R1): SFT, GRPO, distillation. See deepseek_jax/posttrain/. --------------------------

POSTTRAIN_MODES = ("pretrain", "sft", "grpo", "distill")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
  """Group Relative Policy Optimization (DeepSeekMath Eq. 3; R1 section 2.2.1)."""
  group_size: int = 8             # G  completions sampled per prompt; train.batch_size = prompts * G
  inner_steps: int = 1            # mu  optimizer updates per rollout batch (1 = on-policy, ratio 1)
  clip_eps: float = 0.2           # epsilon of the clipped ratio min(r A, clip(r, 1-eps, 1+eps) A)
  kl_beta: float = 0.04           # beta of the k3 KL penalty to the frozen reference; 0 = no reference
  adv_eps: float = 1e-4           # A = (r - mean) / (std + adv_eps) within a group
  loss_norm: str = "sequence"     # "sequence": mean over tokens, then over sequences (DeepSeekMath / R1);
                                  # "token": one mean over all completion tokens of the batch (DAPO / Dr. GRPO)

  def __post_init__(self):
    _check_choice("posttrain.grpo.loss_norm", self.loss_norm, ("sequence", "token"))
    if self.group_size < 2:
      raise ConfigError(f"posttrain.grpo.group_size={self.group_size} must be >= 2 (advantages compare samples)")
    _check_positive("posttrain.grpo.inner_steps", self.inner_steps)
    if not 0.0 < self.clip_eps < 1.0:
      raise ConfigError(f"posttrain.grpo.clip_eps={self.clip_eps} must be in (0, 1)")
    if self.kl_beta < 0:
      raise ConfigError(f"posttrain.grpo.kl_beta={self.kl_beta} must be >= 0")
    if not self.adv_eps > 0:
      raise ConfigError(f"posttrain.grpo.adv_eps={self.adv_eps} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
  """Distillation into a smaller student (R1 section 2.4): SFT on teacher traces, or logit-level KL."""
  loss: str = "sequence"          # "sequence": SFT on teacher-generated responses (as R1 does);
                                  # "logit": forward KL(teacher_T || student_T) on the teacher's logits
  teacher_config: str = ""        # YAML config of the teacher run (its model section is used)
  teacher_ckpt: str = ""          # teacher checkpoint directory (train.ckpt_dir of the teacher run)
  traces_path: str = ""           # JSONL of teacher responses {prompt, response}; written if missing
  samples_per_prompt: int = 1     # teacher responses sampled per prompt when writing traces
  keep_correct_only: bool = True  # rejection sampling: keep traces whose answer the accuracy reward accepts
  temperature: float = 1.0        # T of the logit KL (softened distributions, loss scaled by T^2)
  ce_weight: float = 0.0          # logit mode: + ce_weight * cross entropy on the data's own targets

  def __post_init__(self):
    _check_choice("posttrain.distill.loss", self.loss, ("sequence", "logit"))
    _check_positive("posttrain.distill.samples_per_prompt", self.samples_per_prompt)
    if not self.temperature > 0:
      raise ConfigError(f"posttrain.distill.temperature={self.temperature} must be > 0")
    if self.ce_weight < 0:
      raise ConfigError(f"posttrain.distill.ce_weight={self.ce_weight} must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PostTrainConfig:
  """What train.py optimizes (mode) and the prompt/response data, template and sampling shared by the modes."""
  mode: str = "pretrain"          # "pretrain" (next-token LM on data.*), "sft", "grpo" or "distill"
  init_ckpt: str = ""             # train.ckpt_dir of an earlier run (e.g. the SFT run): its latest params start
                                  # the policy (fresh optimizer, step 0) and are GRPO's frozen reference
  data_path: str = ""             # "" = bundled arithmetic task; else JSONL of {prompt, response} or
                                  # {prompt, think, answer} records (see posttrain/sft.py)
  task_digits: int = 2            # bundled task: operands have 1..task_digits digits
  sft_noise: float = 0.0          # bundled task: fraction of SFT responses whose answer is made wrong
  train_problems: int = 4000      # bundled task: training problems (SFT examples, GRPO prompts)
  eval_problems: int = 200        # held-out problems for accuracy
  eos_id: int = 10                # token ending every response ("\n" for the byte tokenizer)
  max_prompt_len: int = 32        # P  prompts are left-padded to P tokens for sampling
  max_new_tokens: int = 32        # N  sampled tokens per completion
  temperature: float = 1.0        # sampling temperature; GRPO log-probs use the same one
  rewards: tuple[str, ...] = ("accuracy", "format")   # names in posttrain/rewards.py REWARDS
  reward_weights: tuple[float, ...] = ()              # one per reward; () = all 1.0
  grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
  distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

  def __post_init__(self):
    _check_choice("posttrain.mode", self.mode, POSTTRAIN_MODES)
    for name in ("task_digits", "train_problems", "eval_problems", "max_prompt_len", "max_new_tokens"):
      _check_positive(f"posttrain.{name}", getattr(self, name))
    if not 0.0 <= self.sft_noise <= 1.0:
      raise ConfigError(f"posttrain.sft_noise={self.sft_noise} must be in [0, 1]")
    if self.eos_id < 0:
      raise ConfigError(f"posttrain.eos_id={self.eos_id} must be >= 0")
    if not self.temperature > 0:
      raise ConfigError(f"posttrain.temperature={self.temperature} must be > 0")
    from deepseek_jax.posttrain.rewards import REWARDS   # lazy: rewards.py is plain Python, no config import
    if not self.rewards:
      raise ConfigError("posttrain.rewards is empty: name at least one reward")
    for name in self.rewards:
      _check_choice("posttrain.rewards entry", name, tuple(REWARDS))
    if self.reward_weights and len(self.reward_weights) != len(self.rewards):
      raise ConfigError(f"posttrain.reward_weights has {len(self.reward_weights)} entries for "
                        f"{len(self.rewards)} rewards")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  posttrain: PostTrainConfig = dataclasses.field(default_factory=PostTrainConfig)

  def __post_init__(self):
    if self.train.batch_size % self.train.grad_accum:
      raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by "
                        f"train.grad_accum={self.train.grad_accum}")
    if self.data.seq_len > self.model.max_seq_len:
      raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
    _check_posttrain(self)


def _check_posttrain(cfg: Config):
  """Checks between posttrain.* and the other sections."""
  pt = cfg.posttrain
  if pt.mode in ("pretrain", "sft"):
    return
  if pt.eos_id >= cfg.model.vocab_size:
    raise ConfigError(f"posttrain.eos_id={pt.eos_id} is not below model.vocab_size={cfg.model.vocab_size}")
  rollout_len = pt.max_prompt_len + pt.max_new_tokens - 1   # model inputs of one prompt + completion row
  if rollout_len > cfg.model.max_seq_len:
    raise ConfigError(f"posttrain.max_prompt_len + max_new_tokens - 1 = {rollout_len} exceeds "
                      f"model.max_seq_len={cfg.model.max_seq_len}")
  if pt.mode == "grpo" and cfg.train.batch_size % pt.grpo.group_size:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} (completions per rollout batch) is not "
                      f"divisible by posttrain.grpo.group_size={pt.grpo.group_size}")
  if pt.mode == "distill" and pt.distill.loss == "logit" and not pt.distill.teacher_config:
    raise ConfigError("posttrain.distill.loss='logit' needs posttrain.distill.teacher_config")
  if pt.mode == "distill" and not (pt.distill.teacher_config or pt.distill.traces_path):
    raise ConfigError("posttrain.mode='distill' needs posttrain.distill.teacher_config or traces_path")


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
  if typing.get_origin(typ) is tuple:           # tuple[X, ...] from a YAML list
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{name}={value!r} should be a list")
    return tuple(_coerce(f"{name}[{i}]", v, typing.get_args(typ)[0]) for i, v in enumerate(value))
  if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
    raise ConfigError(f"{name}={value!r} should be of type {typ.__name__}")
  return value


def from_dict(cls, d: dict[str, Any], prefix: str = ""):
  """Builds dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
  if not isinstance(d, dict):
    raise ConfigError(f"section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {type(d).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if key not in fields:
      raise ConfigError(f"unknown config key {name!r} (known: {', '.join(sorted(fields))})")
    typ = hints[key]
    if dataclasses.is_dataclass(typ):   # an empty YAML section (None) is the defaults; false, 0, [] are errors
      kwargs[key] = from_dict(typ, {} if value is None else value, prefix=f"{name}.")
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
