"""Hugging Face <-> deepseek_jax: configs, tensor names and layouts, safetensors export, and a CLI.

Spec sections 1 (config fields), 3 (YaRN), 6 (MTP tensors), 7 (FP8 scales) and 8 (HF names and layouts).
HF Linear weights are [out, in]; our kernels are [in, out]. RoPE rows load unchanged: our MLA rotates the
original interleaved pairs, as HF V2 and HF V3 with `rope_interleave=True` do. Import (fp32 / bf16 / FP8
block-scaled, streamed into shardings) is in hf_load.py; `load_hf_checkpoint` here is its whole-model form.

  python -m deepseek_jax.convert import --hf HF_DIR --out CKPT_DIR    # -> CKPT_DIR/{config.yaml, params/}
  python -m deepseek_jax.convert export --ckpt CKPT_DIR --out HF_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import struct
import sys
from typing import Any

import ml_dtypes
import numpy as np

from deepseek_jax.config import ConfigError, ModelConfig

Path = tuple  # keys into the params pure dict, e.g. ("layers", 3, "attn", "wq_b")


class ConversionError(ValueError):
  """A checkpoint or config cannot be converted; the message is one line naming the tensor, key or file."""


# Fields with no HF counterpart: taken from `base` (default ModelConfig()) on import.
_YARN_FIELDS = ("original_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")

# transformers 5.23 class defaults for the keys read below, used when a config.json omits one.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, num_nextn_predict_layers=1),
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
        num_hidden_layers=32, num_attention_heads=32, n_shared_experts=2, n_routed_experts=64,
        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=None, topk_group=None, num_experts_per_tok=None, first_k_dense_replace=0,
        norm_topk_prob=False, max_position_embeddings=2048, rms_norm_eps=1e-6, topk_method="greedy"),
}


# Configs -------------------------------------------------------------------------------------------------

def _check_supported(hf: dict[str, Any], kind: str) -> None:
  """One-line errors for HF options our model does not implement."""
  only = {"attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "hidden_act": "silu"}
  for key, ok in only.items():
    if hf.get(key, ok) not in (ok, None):
      raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported (only {ok!r})")
  heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
  if kv_heads not in (None, heads):
    raise ConversionError(f"config.json: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} "
                          "(MLA has one key per head)")
  if kind == "deepseek_v3" and hf.get("rope_interleave", True) is not True:
    raise ConversionError("config.json: rope_interleave=false is not supported (the rope rows would need a "
                          "permutation; spec section 3)")
  quant = hf.get("quantization_config")
  if quant and (quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3"):
    raise ConversionError(f"config.json: quantization_config {quant} is not supported (only fp8 e4m3 blocks)")


def _rope_fields(hf: dict[str, Any], base: ModelConfig) -> dict[str, Any]:
  """rope_parameters (transformers 5.x) or rope_scaling + rope_theta (Hub / 4.x) -> our YaRN fields."""
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if any(isinstance(v, dict) for v in rope.values()):
    raise ConversionError("config.json: per-layer-type rope_parameters are not supported")
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return dict(rope_theta=theta, rope_factor=1.0, **{f: getattr(base, f) for f in _YARN_FIELDS})
  if rope_type != "yarn":
    raise ConversionError(f"config.json: rope type {rope_type!r} is not supported (only 'default' or 'yarn')")
  if rope.get("truncate", True) is not True or rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConversionError("config.json: yarn with truncate=false or partial_rotary_factor != 1 is not supported")
  max_pos = hf["max_position_embeddings"]
  orig = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
  return dict(rope_theta=theta, rope_factor=float(rope.get("factor") or max_pos / orig), original_seq_len=int(orig),
              beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
              mscale=float(rope.get("mscale") or 0.0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))


def _routing_fields(hf: dict[str, Any], kind: str) -> dict[str, Any]:
  if kind == "deepseek_v3":   # HF's V3 hard-codes sigmoid + noaux_tc (spec section 8, gotcha 6)
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
      raise ConversionError("config.json: deepseek_v3 supports only scoring_func='sigmoid', topk_method='noaux_tc'")
    n_groups, limited = hf["n_group"] or 1, hf["topk_group"] or 1
    return dict(score_func="sigmoid", router_bias=True, norm_topk_prob=bool(hf["norm_topk_prob"]),
                n_expert_groups=n_groups, n_limited_groups=limited)
  method = hf["topk_method"]
  if hf.get("scoring_func", "softmax") != "softmax" or method not in ("greedy", "group_limited_greedy"):
    raise ConversionError(f"config.json: deepseek_v2 supports scoring_func='softmax' with topk_method 'greedy' "
                          f"or 'group_limited_greedy', got {hf.get('scoring_func')!r} / {method!r}")
  if hf["norm_topk_prob"]:  # HF 5.x ignores it, the Hub remote code renormalizes: ambiguous, so refuse
    raise ConversionError("config.json: norm_topk_prob=true is not supported for deepseek_v2")
  greedy = method == "greedy"
  return dict(score_func="softmax", router_bias=False, norm_topk_prob=False,
              n_expert_groups=1 if greedy else hf["n_group"], n_limited_groups=1 if greedy else hf["topk_group"])


def config_from_hf(hf: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
  """A HF config.json dict (model_type deepseek_v3 or deepseek_v2) -> ModelConfig.

  Fields HF does not describe (dtype, init_std, moe_impl, ...) come from `base` (default `ModelConfig()`).
  """
  base = base or ModelConfig()
  kind = hf.get("model_type")
  if kind not in _HF_DEFAULTS:
    raise ConversionError(f"config.json: model_type={kind!r} is not supported (expected one of {list(_HF_DEFAULTS)})")
  hf = {**_HF_DEFAULTS[kind], **hf}
  _check_supported(hf, kind)
  for key in ("num_experts_per_tok", "n_routed_experts", "kv_lora_rank", "hidden_size", "num_hidden_layers"):
    if hf[key] is None:
      raise ConversionError(f"config.json: {key} is missing or null")
  n_mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) if kind == "deepseek_v3" else 0
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
      moe_inter_dim=hf["moe_intermediate_size"], n_layers=hf["num_hidden_layers"],
      n_dense_layers=hf["first_k_dense_replace"], moe_layer_freq=hf.get("moe_layer_freq", 1),
      n_heads=hf["num_attention_heads"], attn_type="mla", q_lora_rank=hf["q_lora_rank"] or 0,
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], n_routed_experts=hf["n_routed_experts"],
      n_shared_experts=hf["n_shared_experts"] or 0, n_activated_experts=hf["num_experts_per_tok"],
      route_scale=float(hf["routed_scaling_factor"]), max_seq_len=hf["max_position_embeddings"],
      rms_norm_eps=float(hf["rms_norm_eps"]), n_mtp_layers=n_mtp or 0,
      **_routing_fields(hf, kind), **_rope_fields(hf, base))
  try:   # what HF does not describe (dtype, init_std, kernels, ...) comes from `base`
    cfg = dataclasses.replace(base, **fields)
  except (ConfigError, TypeError) as e:
    raise ConversionError(f"config.json: {e}") from None
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("attention_factor") is not None:
    from deepseek_jax.rope import attention_factor
    if not math.isclose(rope["attention_factor"], attention_factor(cfg), rel_tol=1e-6):
      raise ConversionError(f"config.json: yarn attention_factor={rope['attention_factor']} differs from the "
                            f"value implied by mscale/mscale_all_dim ({attention_factor(cfg)}); not supported")
  return cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> a transformers 5.x config.json dict (deepseek_v3 for sigmoid + bias, deepseek_v2 for softmax)."""
  if cfg.attn_type != "mla":
    raise ConversionError("only MLA models (V2/V3) have a native HF class; attn_type='mha' cannot be exported")
  if cfg.moe_layer_freq != 1:
    raise ConversionError(f"moe_layer_freq={cfg.moe_layer_freq}: HF's native classes ignore it (must be 1)")
  v3 = cfg.score_func == "sigmoid"
  if cfg.router_bias != v3 or (not v3 and cfg.norm_topk_prob):
    raise ConversionError(f"score_func={cfg.score_func!r} with router_bias={cfg.router_bias}, norm_topk_prob="
                          f"{cfg.norm_topk_prob} matches neither HF deepseek_v3 (sigmoid, bias) nor deepseek_v2")
  limited = cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups
  if cfg.rope_factor > 1.0:
    rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow}
    rope.update({k: getattr(cfg, k) for k in ("mscale", "mscale_all_dim") if getattr(cfg, k)})
  else:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  hf = dict(
      architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
      model_type="deepseek_v3" if v3 else "deepseek_v2", vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
      intermediate_size=cfg.inter_dim, moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers,
      first_k_dense_replace=cfg.n_dense_layers, moe_layer_freq=1, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
      qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
      n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
      num_experts_per_tok=cfg.n_activated_experts, routed_scaling_factor=cfg.route_scale,
      n_group=cfg.n_expert_groups if v3 or limited else 1, topk_group=cfg.n_limited_groups if v3 or limited else 1,
      norm_topk_prob=cfg.norm_topk_prob, scoring_func=cfg.score_func,
      topk_method="noaux_tc" if v3 else ("group_limited_greedy" if limited else "greedy"),
      max_position_embeddings=cfg.max_seq_len, rope_parameters=rope, rms_norm_eps=cfg.rms_norm_eps,
      hidden_act="silu", attention_bias=False, tie_word_embeddings=False)
  if v3:
    hf.update(rope_interleave=True, num_nextn_predict_layers=cfg.n_mtp_layers)
  elif cfg.n_mtp_layers:
    raise ConversionError("n_mtp_layers > 0 needs the deepseek_v3 format (sigmoid router with bias)")
  return hf


# Safetensors format ------------------------------------------------------------------------------------
# Read (hf_load.py) and written (here) directly: safetensors' numpy framework cannot produce BF16 or F8_E4M3.

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _write_safetensors(path: pathlib.Path, tensors: list[tuple[str, np.ndarray]]) -> None:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, arr in tensors:
    header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)   # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)   # no extra copy


# Name mapping --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Group:
  """Our leaves `paths` (of shapes `ours`) <-> HF tensors `names` (of shapes `shapes`), related by `kind`:

    copy     the same array
    linear   HF [out, in] is our kernel [in..., out...] transposed, each side flattened row-major
    experts  per-expert HF [out, in] tensors <-> ours [E, in, out]
    gate_up  fused HF [E, 2F, D] (gate rows first) <-> our w1, w3 [E, D, F] (transformers 5.x in memory)
    down     fused HF [E, D, F] <-> ours [E, F, D]
    zeros    no HF tensor (V2 has no router bias): zeros on load, nothing on save
  """
  kind: str
  paths: tuple[Path, ...]
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  ours: tuple[tuple[int, ...], ...]


def _copy(path: Path, name: str, shape: tuple[int, ...]) -> Group:
  return Group("copy", (path,), (name,), (shape,), (shape,))


def _linear(path: Path, name: str, out: int, inp: int, our_shape: tuple[int, ...]) -> Group:
  return Group("linear", (path,), (name,), ((out, inp),), (our_shape,))


def _mlp(path: Path, pfx: str, hidden: int, dim: int) -> list[Group]:
  return [_linear(path + ("w1",), pfx + "gate_proj.weight", hidden, dim, (dim, hidden)),
          _linear(path + ("w3",), pfx + "up_proj.weight", hidden, dim, (dim, hidden)),
          _linear(path + ("w2",), pfx + "down_proj.weight", dim, hidden, (hidden, dim))]


def _experts(cfg: ModelConfig, path: Path, pfx: str, fused: bool) -> list[Group]:
  E, D, F = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
  if fused:
    return [Group("gate_up", (path + ("w1",), path + ("w3",)), (pfx + "gate_up_proj",), ((E, 2 * F, D),),
                  ((E, D, F),) * 2),
            Group("down", (path + ("w2",),), (pfx + "down_proj",), ((E, D, F),), ((E, F, D),))]
  def per_expert(w: str, proj: str, out: int, inp: int) -> Group:
    names = tuple(f"{pfx}{j}.{proj}.weight" for j in range(E))
    return Group("experts", (path + (w,),), names, ((out, inp),) * E, ((E, inp, out),))
  return [per_expert("w1", "gate_proj", F, D), per_expert("w3", "up_proj", F, D),
          per_expert("w2", "down_proj", D, F)]


def _block(cfg: ModelConfig, path: Path, pfx: str, moe: bool, fused: bool) -> list[Group]:
  D, H, Q, C = cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank
  K, R, O, X = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.qk_head_dim
  at, a = path + ("attn",), pfx + "self_attn."
  g = [_copy(path + ("attn_norm", "weight"), pfx + "input_layernorm.weight", (D,)),
       _copy(path + ("ffn_norm", "weight"), pfx + "post_attention_layernorm.weight", (D,))]
  if Q:
    g += [_linear(at + ("wq_a",), a + "q_a_proj.weight", Q, D, (D, Q)),
          _copy(at + ("q_norm", "weight"), a + "q_a_layernorm.weight", (Q,)),
          _linear(at + ("wq_b",), a + "q_b_proj.weight", H * X, Q, (Q, H, X))]
  else:
    g.append(_linear(at + ("wq",), a + "q_proj.weight", H * X, D, (D, H, X)))
  g += [_linear(at + ("wkv_a",), a + "kv_a_proj_with_mqa.weight", C + R, D, (D, C + R)),
        _copy(at + ("kv_norm", "weight"), a + "kv_a_layernorm.weight", (C,)),
        _linear(at + ("wkv_b",), a + "kv_b_proj.weight", H * (K + O), C, (C, H, K + O)),
        _linear(at + ("wo",), a + "o_proj.weight", D, H * O, (H, O, D))]
  ft, m = path + ("ffn",), pfx + "mlp."
  if not moe:
    return g + _mlp(ft, m, cfg.inter_dim, D)
  E = cfg.n_routed_experts
  g.append(_linear(ft + ("gate",), m + "gate.weight", E, D, (D, E)))
  if cfg.router_bias:
    g.append(_copy(ft + ("bias",), m + "gate.e_score_correction_bias", (E,)))
  else:
    g.append(Group("zeros", (ft + ("bias",),), (), (), ((E,),)))
  if cfg.n_shared_experts:
    g += _mlp(ft + ("shared_experts",), m + "shared_experts.", cfg.n_shared_experts * cfg.moe_inter_dim, D)
  return g + _experts(cfg, ft, m + "experts.", fused)


def groups(cfg: ModelConfig, fused: bool) -> list[Group]:
  """Every parameter of `cfg`'s model with the HF tensors it is made of (`fused`: fused expert tensors)."""
  if cfg.attn_type != "mla":
    raise ConversionError("only MLA models (V2/V3) map to HF tensors; attn_type='mha' is not supported")
  V, D, L = cfg.vocab_size, cfg.dim, cfg.n_layers
  g = [_copy(("embed",), "model.embed_tokens.weight", (V, D)), _copy(("norm", "weight"), "model.norm.weight", (D,)),
       _linear(("head",), "lm_head.weight", V, D, (D, V))]
  for i in range(L):
    g += _block(cfg, ("layers", i), f"model.layers.{i}.", cfg.is_moe_layer(i), fused)
  for k in range(cfg.n_mtp_layers):   # spec section 6: MTP module k is HF layer L + k
    path, pfx = ("mtp", k), f"model.layers.{L + k}."
    g += [_copy(path + ("enorm", "weight"), pfx + "enorm.weight", (D,)),
          _copy(path + ("hnorm", "weight"), pfx + "hnorm.weight", (D,)),
          _linear(path + ("eh_proj",), pfx + "eh_proj.weight", D, 2 * D, (2 * D, D)),
          _copy(path + ("norm", "weight"), pfx + "shared_head.norm.weight", (D,))]
    g += _block(cfg, path + ("block",), pfx, cfg.n_routed_experts > 0, fused)
  return g


def _to_hf(grp: Group, ours: list[np.ndarray]) -> list[np.ndarray]:
  """Our arrays of `grp` -> its HF tensors, in the order of `grp.names`."""
  if grp.kind == "linear":
    out, inp = grp.shapes[0]
    return [ours[0].reshape(inp, out).T]
  if grp.kind == "experts":
    return list(ours[0].transpose(0, 2, 1))
  if grp.kind == "gate_up":
    return [np.concatenate(ours, axis=2).transpose(0, 2, 1)]
  if grp.kind == "down":
    return [ours[0].transpose(0, 2, 1)]
  return ours if grp.kind == "copy" else []


def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
  """Nested dict -> {path: leaf}."""
  if isinstance(tree, dict):
    return {p: x for k, v in tree.items() for p, x in flatten(v, prefix + (k,)).items()}
  return {prefix: tree}


def unflatten(leaves: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, x in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = x
  return tree


def _leaf_shapes(tree: Any) -> dict[Path, tuple[int, ...]]:
  return {p: tuple(x.shape) for p, x in flatten(tree).items()}


def _check_tree(cfg: ModelConfig, tree: dict, what: str) -> None:
  """`tree` must have exactly the leaves and shapes of `to_pure_dict(init_model(cfg))` (nothing allocated)."""
  from flax import nnx
  from deepseek_jax import model
  want = _leaf_shapes(model.to_pure_dict(nnx.eval_shape(lambda: model.init_model(cfg))))
  got = _leaf_shapes(tree)
  for path in sorted(set(want) | set(got), key=str):
    if want.get(path) != got.get(path):
      name = ".".join(map(str, path))
      raise ConversionError(f"{what}: params[{name}] expected shape {want.get(path)}, got {got.get(path)}")


# Checkpoints ---------------------------------------------------------------------------------------------

def load_hf_checkpoint(path: str | pathlib.Path, *, base: ModelConfig | None = None,
                       load_mtp: bool = True) -> tuple[ModelConfig, dict]:
  """A HF checkpoint directory -> (ModelConfig, params pure dict of float32 numpy arrays); see hf_load.

  The whole model is built in host memory: for sharded training use `hf_load.load_hf_params`, which streams
  each host's shards onto its devices.
  """
  from deepseek_jax import hf_load
  return hf_load.load_hf_checkpoint(path, base=base, load_mtp=load_mtp)


def save_hf_checkpoint(cfg: ModelConfig, params: dict, path: str | pathlib.Path, *, fused_experts: bool = False,
                       max_shard_bytes: int = 4 << 30, dtype: str = "float32") -> None:
  """Writes config.json + safetensors shards (with model.safetensors.index.json when there are several).

  `params` is a pure dict as from `load_hf_checkpoint` / `to_pure_dict`. Routed experts are written per expert
  (the checkpoint layout) unless `fused_experts`. Router biases stay float32; everything else is cast to
  `dtype` ("float32", "bfloat16" or "float16"). MTP modules are written as layers n_layers + k without the
  duplicate head/embedding copies. float32 export followed by `load_hf_checkpoint` is bitwise lossless.
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ConversionError(f"dtype={dtype!r} is not one of float32, bfloat16, float16")
  out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  hf = {**config_to_hf(cfg), "dtype": dtype}
  _check_tree(cfg, params, "save_hf_checkpoint")
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  if stale := sorted(directory.glob("*.safetensors")):
    raise ConversionError(f"{directory}: already holds {stale[0].name}; refusing to mix checkpoints")
  shards: list[list[Group]] = [[]]
  size = 0
  for grp in groups(cfg, fused_experts):
    nbytes = sum(math.prod(s) for s in grp.shapes) * out_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(grp)
    size += nbytes
  n, weight_map, total = len(shards), {}, 0
  for i, shard in enumerate(shards):
    fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    tensors = []
    for grp in shard:
      ours = [np.asarray(_at(params, p), dtype=np.float32) for p in grp.paths]
      for name, x in zip(grp.names, _to_hf(grp, ours)):
        keep32 = name.endswith("e_score_correction_bias")
        tensors.append((name, np.ascontiguousarray(x, np.float32 if keep32 else out_dtype)))
        weight_map[name] = fname
        total += tensors[-1][1].nbytes
    _write_safetensors(directory / fname, tensors)
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))


def _at(tree: dict, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


# CLI -----------------------------------------------------------------------------------------------------

def _import(hf_dir: str, out: str, load_mtp: bool) -> None:
  import jax
  import orbax.checkpoint as ocp
  import yaml
  out_dir = pathlib.Path(out).absolute()
  if (out_dir / "params").exists():
    raise ConversionError(f"{out_dir / 'params'}: already exists")
  cfg, params = load_hf_checkpoint(hf_dir, load_mtp=load_mtp)
  out_dir.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir / "params", params)
  (out_dir / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"wrote {out_dir}/config.yaml and {out_dir}/params ({n_params:,} params)")


def _export(ckpt: str, out: str, fused: bool, dtype: str, max_shard_gb: float) -> None:
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  from deepseek_jax import config as config_lib
  from deepseek_jax import model
  ckpt_dir = pathlib.Path(ckpt).absolute()
  if not (ckpt_dir / "params").is_dir():
    raise ConversionError(f"{ckpt_dir / 'params'}: not found (expected the output of `convert import`)")
  cfg = config_lib.load_config(ckpt_dir / "config.yaml").model
  abstract = model.to_pure_dict(nnx.eval_shape(lambda: model.init_model(cfg)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(ckpt_dir / "params", abstract)
  save_hf_checkpoint(cfg, params, out, fused_experts=fused, dtype=dtype, max_shard_bytes=int(max_shard_gb * 2**30))
  print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m deepseek_jax.convert",
      description="Convert DeepSeek-V2/V3 checkpoints between Hugging Face safetensors and deepseek_jax "
                  "(CKPT_DIR/config.yaml + CKPT_DIR/params, an Orbax checkpoint of the params pure dict).")
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF checkpoint directory -> deepseek_jax checkpoint directory")
  imp.add_argument("--hf", required=True, help="directory with config.json and *.safetensors (fp32/bf16/fp8)")
  imp.add_argument("--out", required=True, help="output directory (gets config.yaml and params/)")
  imp.add_argument("--no-mtp", action="store_true", help="skip the MTP layers even if the checkpoint has them")
  exp = sub.add_parser("export", help="deepseek_jax checkpoint directory -> HF checkpoint directory")
  exp.add_argument("--ckpt", required=True, help="directory written by `import` (config.yaml + params/)")
  exp.add_argument("--out", required=True, help="output directory for config.json and *.safetensors")
  exp.add_argument("--fused-experts", action="store_true",
                   help="write routed experts as fused gate_up_proj/down_proj (transformers 5.x in-memory layout)")
  exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  exp.add_argument("--max-shard-gb", type=float, default=4.0, help="maximum size of one safetensors file, GiB")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      _import(args.hf, args.out, not args.no_mtp)
    else:
      _export(args.ckpt, args.out, args.fused_experts, args.dtype, args.max_shard_gb)
  except (ConversionError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
