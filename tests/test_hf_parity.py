"""Logit parity with Hugging Face transformers' DeepseekV3/V2ForCausalLM on random tiny float32 models.

Each case builds a random HF model, `save_pretrained`s it, loads it with `convert.load_hf_checkpoint` and runs
our `model.apply` on the same tokens. Norm weights and V3 router biases are randomized too (HF initializes
them to ones / zeros, which would hide mapping mistakes).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from deepseek_jax import convert, model  # noqa: E402

TOL = 1e-4
BASE = dataclasses.replace(convert.ModelConfig(), dtype="float32")   # HF has no dtype/init fields
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
            initializer_range=0.05)


def _yarn(orig: int, mscale: float) -> dict:
  # factor 40 with original length 32: pair 0 extrapolates, pair 1 is blended, pairs >= 2 are interpolated,
  # so YaRN is really active at these short lengths; the softmax scale carries mscale^2.
  return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": orig,
          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}


CASES = {
    # (a) V3: YaRN, group-limited noaux_tc routing, q_lora, random bias, renormalized weights x 2.5
    "v3_yarn_groups": ("v3", dict(q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, rope_parameters=_yarn(32, 1.0),
                                  max_position_embeddings=1280)),
    # (b) V3: plain RoPE, no groups, unnormalized weights
    "v3_plain": ("v3", dict(q_lora_rank=32, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=False,
                            routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            max_position_embeddings=64)),
    # (c) V2-Lite: no q compression, softmax greedy, YaRN with mscale 0.707
    "v2_lite": ("v2", dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1,
                           routed_scaling_factor=1.0, rope_parameters=_yarn(32, 0.707), max_position_embeddings=1280)),
    # (d) V2: group_limited_greedy softmax, q_lora, x16 scaling, another rope_theta. A group scores its best
    # expert, so the limit only changes choices when top-k spans more than topk_group groups: k=3 > 2.
    "v2_group_limited": ("v2", dict(q_lora_rank=32, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
                                    topk_group=2, num_experts_per_tok=3, routed_scaling_factor=16.0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                    max_position_embeddings=64)),
}
GROUPED = ("v3_yarn_groups", "v2_group_limited")


def _build_hf(kind: str, overrides: dict, seed: int = 0):
  cls_cfg, cls_model = ((transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM) if kind == "v3" else
                        (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM))
  hf_cfg = cls_cfg(**{**TINY, **overrides}, attn_implementation="eager")
  torch.manual_seed(seed)
  hf = cls_model(hf_cfg).float().eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      if kind == "v2" and name.endswith("mlp.gate.weight"):
        p.mul_(10.0)   # peaked softmax scores: the routing decides a lot of the output
    for name, b in hf.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  return hf


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """name -> (HF model, checkpoint dir, tokens [2, 24], HF logits); each case is built once per module."""
  cache = {}

  def get(name: str):
    if name not in cache:
      kind, overrides = CASES[name]
      hf = _build_hf(kind, overrides)
      path = tmp_path_factory.mktemp(name)
      hf.save_pretrained(path)
      tokens = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
      with torch.no_grad():
        cache[name] = (hf, path, tokens.numpy(), hf(tokens).logits.numpy())
    return cache[name]
  return get


def _logits(cfg, params, tokens) -> np.ndarray:
  graphdef, p, bias = model.split_model(model.from_pure_dict(cfg, params))
  logits, _ = model.apply(graphdef, p, bias, jnp.asarray(tokens), mtp=False)
  return np.asarray(logits)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(name, built):
  _, path, tokens, ref = built(name)
  cfg, params = convert.load_hf_checkpoint(path, base=BASE)
  assert cfg.n_mtp_layers == 0   # V3 configs announce one MTP layer, but save_pretrained writes none
  assert cfg.rope_factor == (40.0 if CASES[name][1]["rope_parameters"]["rope_type"] == "yarn" else 1.0)
  diff = float(np.abs(_logits(cfg, params, tokens) - ref).max())
  print(f"\n{name}: max |logits - HF| = {diff:.3g} (max |HF logits| = {np.abs(ref).max():.3g})")
  assert np.abs(ref).max() > 1.0    # not a trivially small comparison
  assert diff < TOL


@pytest.mark.parametrize("name", GROUPED)
def test_group_limit_changes_routing(name, built):
  """Without the group limit the logits would differ: the group-limited cases really exercise it."""
  _, path, tokens, ref = built(name)
  cfg, params = convert.load_hf_checkpoint(path, base=BASE)
  assert 1 < cfg.n_limited_groups < cfg.n_expert_groups
  free = dataclasses.replace(cfg, n_limited_groups=cfg.n_expert_groups)
  assert np.abs(_logits(free, params, tokens) - ref).max() > 100 * TOL


def test_fused_expert_layout_loads_identically(built, tmp_path):
  """Rewrite the per-expert tensors as transformers 5.x's fused gate_up_proj [E, 2F, D] / down_proj [E, D, F]."""
  _, path, _, _ = built("v3_yarn_groups")
  tensors = load_file(path / "model.safetensors")
  E = TINY["n_routed_experts"]
  for i in range(1, TINY["num_hidden_layers"]):
    pfx = f"model.layers.{i}.mlp.experts."
    gate, up, down = ([tensors.pop(f"{pfx}{j}.{proj}.weight") for j in range(E)]
                      for proj in ("gate_proj", "up_proj", "down_proj"))
    tensors[pfx + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
    tensors[pfx + "down_proj"] = torch.stack(down)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  cfg_a, want = convert.load_hf_checkpoint(path, base=BASE)
  cfg_b, got = convert.load_hf_checkpoint(tmp_path, base=BASE)
  assert cfg_a == cfg_b
  _assert_bitwise(got, want)


@pytest.mark.parametrize("name,fused", [("v3_yarn_groups", True), ("v3_yarn_groups", False), ("v2_lite", False),
                                        ("v2_group_limited", True)])
def test_export_loads_in_hf(name, fused, built, tmp_path):
  """Our export is read by transformers' own from_pretrained and gives its logits again."""
  hf, path, tokens, ref = built(name)
  cfg, params = convert.load_hf_checkpoint(path, base=BASE)
  convert.save_hf_checkpoint(cfg, params, tmp_path, fused_experts=fused)
  cls = type(hf)
  again = cls.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
  with torch.no_grad():
    got = again(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_array_equal(got, ref)


def _assert_bitwise(got: dict, want: dict):
  flat_got, flat_want = convert._leaf_shapes(got), convert._leaf_shapes(want)
  assert flat_got == flat_want
  for p in flat_want:
    np.testing.assert_array_equal(convert._at(got, p).view(np.uint32), convert._at(want, p).view(np.uint32))
