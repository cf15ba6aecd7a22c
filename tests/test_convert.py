"""deepseek_jax.convert: round trips, FP8, error messages, configs, CLI, and the big configs' parameter counts."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from deepseek_jax import convert, hf_load, model
from deepseek_jax.config import ModelConfig, load_config
from deepseek_jax.convert import ConversionError

st_numpy = pytest.importorskip("safetensors.numpy")   # an independent reader/writer for the tests

ROOT = pathlib.Path(__file__).resolve().parents[1]
# q_b_proj has 4 * 48 = 192 rows and the dense FFN 160: ragged 128-blocks for the FP8 test. One MTP module.
TINY = ModelConfig(vocab_size=61, dim=64, inter_dim=160, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                   q_lora_rank=48, kv_lora_rank=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                   n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                   n_limited_groups=2, max_seq_len=1280, original_seq_len=32, n_mtp_layers=1, dtype="float32")
FP8_PROJ = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj")


def _random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Random values (norms and router biases included) in the structure of to_pure_dict(init_model(cfg))."""
  rng = np.random.default_rng(seed)
  abstract = model.to_pure_dict(nnx.eval_shape(lambda: model.init_model(cfg)))
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)


def _assert_bitwise(got: dict, want: dict):
  flat_got, flat_want = convert._leaf_shapes(got), convert._leaf_shapes(want)
  assert flat_got == flat_want
  for p in flat_want:
    np.testing.assert_array_equal(np.asarray(convert._at(got, p)).view(np.uint32),
                                  np.asarray(convert._at(want, p)).view(np.uint32), err_msg=str(p))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(params, directory) of TINY exported as one float32 model.safetensors."""
  params = _random_params(TINY)
  path = tmp_path_factory.mktemp("tiny_hf")
  convert.save_hf_checkpoint(TINY, params, path)
  return params, path


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copies a single-file checkpoint, passing its tensors (a dict) through `edit`."""
  dst.mkdir(exist_ok=True)
  tensors = st_numpy.load_file(src / "model.safetensors")
  edit(tensors)
  st_numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  (dst / "config.json").write_text((src / "config.json").read_text())
  return dst


# Round trips ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_export_import_is_bitwise(fused, tmp_path):
  params = _random_params(TINY, seed=1)
  convert.save_hf_checkpoint(TINY, params, tmp_path, fused_experts=fused, max_shard_bytes=200_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  assert len(set(index.values())) > 1 and len(list(tmp_path.glob("*.safetensors"))) == len(set(index.values()))
  assert "model.layers.3.eh_proj.weight" in index and "model.layers.3.shared_head.norm.weight" in index
  assert ("model.layers.1.mlp.experts.gate_up_proj" in index) == fused
  assert ("model.layers.1.mlp.experts.7.up_proj.weight" in index) != fused
  cfg, loaded = convert.load_hf_checkpoint(tmp_path, base=TINY)
  assert cfg == TINY
  _assert_bitwise(loaded, params)
  with pytest.raises(ConversionError, match="refusing to mix"):
    convert.save_hf_checkpoint(TINY, params, tmp_path)


def test_bfloat16_export_rounds_once(exported, tmp_path):
  params, _ = exported
  convert.save_hf_checkpoint(TINY, params, tmp_path, dtype="bfloat16")
  _, loaded = convert.load_hf_checkpoint(tmp_path, base=TINY)
  bias = ("layers", 1, "ffn", "bias")
  np.testing.assert_array_equal(convert._at(loaded, bias), convert._at(params, bias))   # kept float32
  wq_b = ("layers", 2, "attn", "wq_b")
  want = convert._at(params, wq_b).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(convert._at(loaded, wq_b), want)


def test_mtp_layers_can_be_skipped(exported):
  _, path = exported
  cfg, params = convert.load_hf_checkpoint(path, base=TINY, load_mtp=False)
  assert cfg.n_mtp_layers == 0 and "mtp" not in params


# FP8 -----------------------------------------------------------------------------------------------------

def _quantize(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """Per-128x128-block e4m3 quantization (amax / 448), edge blocks ragged; spec section 7."""
  rows, cols = w.shape
  scale = np.zeros((-(-rows // block), -(-cols // block)), np.float32)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      scale[i, j] = max(np.abs(w[i * block:(i + 1) * block, j * block:(j + 1) * block]).max(), 1e-12) / 448.0
  full = np.kron(scale, np.ones((block, block), np.float32))[:rows, :cols]
  return (w / full).astype(ml_dtypes.float8_e4m3fn), scale


def test_dequantize_fp8_matches_reference():
  rng = np.random.default_rng(0)
  w8, scale = _quantize(rng.standard_normal((200, 300)).astype(np.float32))
  assert scale.shape == (2, 3)
  want = np.empty((200, 300), np.float32)
  for i in range(200):
    for j in range(300):
      want[i, j] = np.float32(w8[i, j]) * scale[i // 128, j // 128]
  np.testing.assert_array_equal(hf_load.dequantize_fp8(w8, scale), want)
  with pytest.raises(ValueError, match="scale shape"):
    hf_load.dequantize_fp8(w8, scale[:, :2])


def test_fp8_checkpoint_loads_dequantized(exported, tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file as torch_save
  params, path = exported
  tensors, want = {}, {}
  for name, w in st_numpy.load_file(path / "model.safetensors").items():
    if name.endswith(".weight") and name.split(".")[-2] in FP8_PROJ:
      w8, scale = _quantize(w)
      want[name] = hf_load.dequantize_fp8(w8, scale)
      atol = 0.0625 * np.abs(w) + np.kron(scale, np.ones((128, 128)))[:w.shape[0], :w.shape[1]] * 2.0**-9
      assert np.all(np.abs(want[name] - w) <= atol)     # e4m3: 3 mantissa bits
      tensors[name] = torch.from_numpy(w8.view(np.uint8)).view(torch.float8_e4m3fn)
      tensors[name + "_scale_inv"] = torch.from_numpy(scale)
    else:
      tensors[name] = torch.from_numpy(w.astype(ml_dtypes.bfloat16).view(np.uint16)).view(torch.bfloat16)
      want[name] = w.astype(ml_dtypes.bfloat16).astype(np.float32)
  assert max(t.shape[0] for n, t in tensors.items() if n.endswith("q_b_proj.weight")) > 128
  fp8 = tmp_path / "fp8"
  fp8.mkdir()
  torch_save(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
  hf = json.loads((path / "config.json").read_text())
  hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128]}
  (fp8 / "config.json").write_text(json.dumps(hf))
  cfg, loaded = convert.load_hf_checkpoint(fp8, base=TINY)
  assert cfg == TINY
  convert.save_hf_checkpoint(cfg, loaded, tmp_path / "again")   # back to HF names, float32
  again = st_numpy.load_file(tmp_path / "again" / "model.safetensors")
  assert sorted(again) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(again[name], want[name], err_msg=name)


def test_v2_without_shared_experts_loads(tmp_path):
  """transformers writes zero-sized shared-expert tensors for n_shared_experts: 0; they load (as no shared
  experts) and the logits match HF's."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.DeepseekV2Config(
      vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16,
      qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, q_lora_rank=None,
      n_shared_experts=0, topk_method="greedy", max_position_embeddings=64, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.DeepseekV2ForCausalLM(hf_cfg).float().eval()
  hf.save_pretrained(tmp_path)
  zero_sized = [n for n, x in st_numpy.load_file(tmp_path / "model.safetensors").items() if "shared_experts" in n]
  assert zero_sized and all(st_numpy.load_file(tmp_path / "model.safetensors")[n].size == 0 for n in zero_sized)
  cfg, params = convert.load_hf_checkpoint(tmp_path, base=dataclasses.replace(ModelConfig(), dtype="float32"))
  assert cfg.n_shared_experts == 0 and "shared_experts" not in params["layers"][1]["ffn"]
  tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
  with torch.no_grad():
    want = hf(torch.from_numpy(tokens)).logits.numpy()
  graphdef, p, bias = model.split_model(model.from_pure_dict(cfg, params))
  got, _ = jax.jit(functools.partial(model.apply, graphdef, mtp=False))(p, bias, tokens)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  # A shared-expert tensor with elements is still unexpected when the config has none.
  tensors = st_numpy.load_file(tmp_path / "model.safetensors")
  tensors["model.layers.1.mlp.shared_experts.up_proj.weight"] = np.ones((32, 64), np.float32)
  st_numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  _one_line_error(tmp_path, "1 unexpected tensor.*shared_experts.up_proj.weight")


# Errors --------------------------------------------------------------------------------------------------

def _one_line_error(path, match: str) -> str:
  with pytest.raises(ConversionError, match=match) as e:
    convert.load_hf_checkpoint(path, base=TINY)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_tensor_is_named(exported, tmp_path):
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  bad = _rewrite(exported[1], tmp_path, lambda t: t.pop(name))
  _one_line_error(bad, f"^{name}: missing")


def test_wrong_shape_is_named(exported, tmp_path):
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  bad = _rewrite(exported[1], tmp_path, lambda t: t.update({name: t[name][:-1]}))
  _one_line_error(bad, rf"^{name}: expected shape \(256, 16\), got \(255, 16\) in .*model.safetensors")


def test_unexpected_tensors_are_listed(exported, tmp_path):
  bad = _rewrite(exported[1], tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones(2)}))
  _one_line_error(bad, "1 unexpected tensor.*model.layers.0.self_attn.extra.weight")


def test_missing_config_and_corrupt_files(exported, tmp_path):
  _one_line_error(tmp_path, "config.json: not found")
  (tmp_path / "config.json").write_text((exported[1] / "config.json").read_text())
  _one_line_error(tmp_path, "no \\*.safetensors")
  blob = (exported[1] / "model.safetensors").read_bytes()
  for bad in (b"garbage", blob[:8] + b"{not json" + blob[17:], blob[:-100]):
    (tmp_path / "model.safetensors").write_bytes(bad)
    _one_line_error(tmp_path, "model.safetensors: unreadable or corrupt safetensors")


@pytest.mark.parametrize("key,value,match", [
    ("attention_bias", True, "attention_bias=True is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("rope_interleave", False, "rope_interleave"),
    ("num_key_value_heads", 1, "num_key_value_heads=1"),
    ("model_type", "llama", "model_type='llama'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, "rope type 'linear'"),
    ("scoring_func", "softmax", "deepseek_v3 supports only"),
    ("n_group", 3, "not divisible"),
])
def test_unsupported_config_values(key, value, match):
  hf = {**convert.config_to_hf(TINY), key: value}
  with pytest.raises(ConversionError, match=match) as e:
    convert.config_from_hf(hf)
  assert "\n" not in str(e.value)


# Configs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite", "tiny"])
def test_config_round_trip(name):
  cfg = load_config(ROOT / "configs" / f"{name}.yaml").model
  hf = convert.config_to_hf(cfg)
  assert convert.config_from_hf(hf, base=cfg) == cfg
  assert convert.config_to_hf(convert.config_from_hf(json.loads(json.dumps(hf)), base=cfg)) == hf


@pytest.mark.parametrize("changes,match", [
    (dict(attn_type="mha", qk_nope_head_dim=0, v_head_dim=16), "attn_type='mha'"),
    (dict(router_bias=False), "matches neither"),
    (dict(score_func="softmax", router_bias=False, norm_topk_prob=True), "matches neither"),
])
def test_unexportable_configs(changes, match):
  with pytest.raises(ConversionError, match=match):
    convert.config_to_hf(dataclasses.replace(TINY, **changes))


def test_hub_style_configs_match_yaml():
  """Hub config.json files (transformers 4.x style: rope_scaling with 'type', top-level rope_theta)."""
  common = dict(rope_theta=10000, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, moe_layer_freq=1,
                tie_word_embeddings=False, aux_loss_alpha=0.001, seq_aux=True, max_position_embeddings=163840,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, pretraining_tp=1)
  v3 = dict(common, model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
            moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
            num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1,
            num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
            norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
            quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
            rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
  lite = dict(common, model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
              moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
              num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
              num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
              norm_topk_prob=False, routed_scaling_factor=1.0,
              rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
  for hf, name in ((v3, "deepseek-v3-671b"), (lite, "deepseek-v2-lite")):
    want = load_config(ROOT / "configs" / f"{name}.yaml").model
    assert convert.config_from_hf(hf, base=want) == want
  assert convert.config_from_hf(v3).softmax_scale == pytest.approx(0.1352338, abs=1e-7)   # spec section 3


def test_yarn_without_mscale_follows_hf():
  """HF: no mscale_all_dim -> no softmax mscale; no mscale -> cos/sin scaled by get_mscale(factor)."""
  hf = convert.config_to_hf(TINY)
  hf["rope_parameters"] = {k: v for k, v in hf["rope_parameters"].items() if not k.startswith("mscale")}
  cfg = convert.config_from_hf(hf)
  assert cfg.mscale == cfg.mscale_all_dim == 0.0
  assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5)


# CLI -----------------------------------------------------------------------------------------------------

def test_cli_import_export_round_trip(exported, tmp_path):
  params, path = exported
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def run(*args):
    return subprocess.run([sys.executable, "-m", "deepseek_jax.convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  res = run("import", "--hf", str(path), "--out", str(tmp_path / "ckpt"))
  assert res.returncode == 0, res.stderr
  assert load_config(tmp_path / "ckpt" / "config.yaml").model == dataclasses.replace(TINY, dtype="bfloat16")
  res = run("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--fused-experts")
  assert res.returncode == 0, res.stderr
  _, loaded = convert.load_hf_checkpoint(tmp_path / "hf", base=TINY)
  _assert_bitwise(loaded, params)


def test_cli_help_and_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(["--help"])
  assert e.value.code == 0 and "import" in capsys.readouterr().out
  assert convert.main(["import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "config.json: not found" in err and err.count("\n") == 1
  assert convert.main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 1
  assert "params: not found" in capsys.readouterr().err


# Parameter counts of the big configs (abstract: nothing is allocated) -------------------------------------

def _expected_params(m: ModelConfig, mtp: bool) -> int:
  """Closed-form count, independent of the model code (spec section 1)."""
  D, H, Q, C = m.dim, m.n_heads, m.q_lora_rank, m.kv_lora_rank
  if m.attn_type == "mla":
    q = D * Q + Q + Q * H * m.qk_head_dim if Q else D * H * m.qk_head_dim
    attn = q + D * (C + m.qk_rope_head_dim) + C + C * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * D
  else:
    attn = 4 * D * H * m.qk_rope_head_dim
  moe = D * m.n_routed_experts + 3 * D * m.moe_inter_dim * (m.n_routed_experts + m.n_shared_experts)
  dense = attn + 2 * D + 3 * D * m.inter_dim
  sparse = attn + 2 * D + moe
  total = 2 * m.vocab_size * D + D + sum(sparse if m.is_moe_layer(i) else dense for i in range(m.n_layers))
  return total + (m.n_mtp_layers * (sparse + 2 * D * D + 3 * D) if mtp else 0)   # block, eh_proj, 3 norms


@pytest.mark.parametrize("name,billions,with_mtp", [("deepseek-v3-671b", 671.03, 682.64),
                                                    ("deepseek-v2-lite", 15.71, 15.71),
                                                    ("deepseekmoe-16b", 16.38, 16.38)])
def test_big_config_param_counts(name, billions, with_mtp):
  cfg = load_config(ROOT / "configs" / f"{name}.yaml").model
  _, params, bias = model.abstract_model(cfg)
  n = model.count_params(params)
  main = {k: v for k, v in model.to_pure_dict(params, cfg).items() if k != "mtp"}
  assert n == _expected_params(cfg, mtp=True)
  assert model.count_params(main) == _expected_params(cfg, mtp=False)
  assert round(n / 1e9, 2) == with_mtp
  assert round(model.count_params(main) / 1e9, 2) == billions    # spec section 1 counts without MTP
  assert model.count_params(bias) == cfg.n_routed_experts * (cfg.n_moe_layers + cfg.n_mtp_layers)
