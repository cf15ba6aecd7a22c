"""Generation: cached decoding against the full forward, Hugging Face `generate`, speculative decoding, meshes, CLI."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import convert, decode, generate, sampling
from deepseek_jax import model as M
from deepseek_jax.config import ConfigError, MeshConfig, ModelConfig, load_config, to_dict
from deepseek_jax.generate import Generator
from deepseek_jax.sampling import SamplingConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"
SMALL = ["model.n_layers=2", "model.init_std=0.1"]   # 1 dense + 1 MoE layer; logits of order 1-10
YARN = ["model.rope_factor=40.0", "model.original_seq_len=8"]   # YaRN really active at these lengths
CONFIGS = {
    # V3: q-LoRA, YaRN (mscale 1 -> softmax scale x mscale^2), sigmoid group-limited routing, one MTP module
    "v3": SMALL + YARN + ["model.kv_lora_rank=48"],
    # V2-Lite: no q compression, YaRN with mscale 0.707, softmax greedy routing, no MTP
    "v2_lite": SMALL + YARN + ["model.q_lora_rank=0", "model.mscale=0.707", "model.mscale_all_dim=0.707",
                               "model.score_func=softmax", "model.router_bias=false", "model.norm_topk_prob=false",
                               "model.n_expert_groups=1", "model.n_limited_groups=1", "model.n_mtp_layers=0"],
    # DeepSeekMoE-16B: plain multi-head attention, rotate-half RoPE on the whole head
    "v1_mha": SMALL + ["model.attn_type=mha", "model.qk_nope_head_dim=0", "model.qk_rope_head_dim=32",
                       "model.v_head_dim=32", "model.score_func=softmax", "model.router_bias=false",
                       "model.n_mtp_layers=0"],
}
TOL = 1e-5


@functools.cache
def parts(name: str):
  cfg = load_config(TINY, CONFIGS[name]).model
  graphdef, params, bias = M.split_model(M.init_model(cfg, seed=0))
  return cfg, graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(bias)


# Decode steps against the full forward ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, params, bias, tokens_BP, caches, mtp_cache, next_BP):
  model = nnx.merge(graphdef, params, bias)
  h_BPD, caches = decode.prefill(model, tokens_BP, caches)
  mtp_h, mtp_cache = (decode.mtp_prefill(model, h_BPD, next_BP, mtp_cache) if model.mtp else (None, None))
  mtp_logits = decode.logits(model, mtp_h) if model.mtp else None
  return decode.logits(model, h_BPD), h_BPD, caches, mtp_logits, mtp_cache


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, params, bias, tokens_BS, start_B, caches, mtp_cache, next_BS):
  model = nnx.merge(graphdef, params, bias)
  h_BSD, caches = decode.step(model, tokens_BS, start_B, caches)
  mtp_logits, mtp_cache = (decode.mtp_step(model, h_BSD, next_BS, start_B, mtp_cache) if model.mtp
                           else (None, None))
  return decode.logits(model, h_BSD), caches, mtp_logits, mtp_cache


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_logits_equal_full_forward(name, width):
  """A ragged batch (prompts of 5, 1 and 9 tokens, junk in the padding) is prefilled, then teacher-forced
  `width` tokens per step; at every position the logits (and the MTP logits) equal the full forward's."""
  cfg, graphdef, params, bias = parts(name)
  B, S, T = 3, 14, 32
  tokens_BT = jax.random.randint(jax.random.key(1), (B, T + 2), 0, cfg.vocab_size)
  ref_BSV, aux = M.apply(graphdef, params, bias, tokens_BT[:, :S])
  lens_B = np.array([5, 1, 9])
  in_prompt_BP = jnp.arange(9)[None] < lens_B[:, None]
  junk_BP = jax.random.randint(jax.random.key(2), (B, 9), 0, cfg.vocab_size)
  prompt_BP, next_BP = (jnp.where(in_prompt_BP, tokens_BT[:, i:9 + i], junk_BP) for i in (0, 1))
  caches = decode.init_cache(cfg, B, T, cfg.n_layers)
  mtp_cache = decode.init_cache(cfg, B, T, 1)[0] if cfg.n_mtp_layers else None
  logits_BPV, _, caches, mtp_BPV, mtp_cache = _prefill(graphdef, params, bias, prompt_BP, caches, mtp_cache,
                                                       next_BP)
  got = {(b, p): logits_BPV[b, p] for b in range(B) for p in range(lens_B[b])}
  got_mtp = {(b, p): mtp_BPV[b, p] for b in range(B) for p in range(lens_B[b])} if cfg.n_mtp_layers else {}
  pos_B = jnp.asarray(lens_B, jnp.int32)
  rows_B1 = jnp.arange(B)[:, None]
  while int(pos_B.min()) < S:   # rows past S keep stepping on later tokens; they are not compared
    idx_BS = pos_B[:, None] + jnp.arange(width)
    logits_BSV, caches, mtp_BSV, mtp_cache = _step(graphdef, params, bias, tokens_BT[rows_B1, idx_BS], pos_B,
                                                   caches, mtp_cache, tokens_BT[rows_B1, idx_BS + 1])
    for b in range(B):
      for s in range(width):
        got[b, int(pos_B[b]) + s] = logits_BSV[b, s]
        if cfg.n_mtp_layers:
          got_mtp[b, int(pos_B[b]) + s] = mtp_BSV[b, s]
    pos_B = pos_B + width
  have = np.stack([got[b, p] for b in range(B) for p in range(S)])
  want = np.asarray(ref_BSV).reshape(B * S, -1)
  np.testing.assert_allclose(have, want, atol=TOL, rtol=TOL)
  assert np.abs(want).max() > 1.0
  if cfg.n_mtp_layers:   # the full forward's MTP logits at i predict token i+2; the last position is junk
    have = np.stack([got_mtp[b, p] for b in range(B) for p in range(S - 1)])
    want = np.asarray(aux.mtp_logits[0][:, :S - 1]).reshape(B * (S - 1), -1)
    np.testing.assert_allclose(have, want, atol=TOL, rtol=TOL)


# The cache is the latent -----------------------------------------------------------------------------------

def _intermediate_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of every value computed in `jaxpr`, sub-jaxprs (jit, while, custom_vjp, shard_map) included."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if hasattr(sub, "eqns"):
          out += _intermediate_shapes(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out += _intermediate_shapes(sub.jaxpr)
  return out


def test_decode_cache_holds_only_latents_and_is_never_expanded():
  """The MLA cache pytree is c_KV [B,T,C] and k_rope [B,T,R] per layer, and a decode step computes nothing of
  shape [.., T, .., H, ..] with a K or O dim: the keys and values are never rebuilt from the latent."""
  cfg, graphdef, params, bias = parts("v3")
  B, T = 2, 40
  H, K, O, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  assert len({T, H, K, C, K + O}) == 5   # the shapes below are unambiguous
  caches = decode.init_cache(cfg, B, T, cfg.n_layers)
  assert [type(c) for c in caches] == [decode.LatentCache] * cfg.n_layers
  assert {tuple(x.shape) for x in jax.tree.leaves(caches)} == {(B, T, C), (B, T, cfg.qk_rope_head_dim)}

  def expanded(shapes):
    return [s for s in shapes if T in s and H in s and {K, O, K + O} & set(s)]

  def one_step(params, caches):
    return decode.step(nnx.merge(graphdef, params, bias), jnp.zeros((B, 1), jnp.int32), jnp.full((B,), 7), caches)
  assert not expanded(_intermediate_shapes(jax.make_jaxpr(one_step)(params, caches).jaxpr))

  def naive(params):   # the training form over T tokens does build them: the check above can see them
    mla = next(nnx.merge(graphdef, params, bias).blocks()).attn
    cos_sin = decode.rope.cos_sin(cfg, jnp.zeros((B, T), jnp.int32))
    return mla(jnp.zeros((B, T, cfg.dim)), cos_sin, None)
  assert expanded(_intermediate_shapes(jax.make_jaxpr(naive)(params).jaxpr))


@pytest.mark.parametrize("path,per_layer", [
    ("configs/deepseek-v3-671b.yaml", 512 + 64),         # c_KV + k_rope
    ("configs/deepseek-v2-lite.yaml", 512 + 64),
    ("configs/deepseekmoe-16b.yaml", 16 * (128 + 128)),  # K and V of every head
    ("configs/tiny.yaml", 32 + 16)])
def test_cache_bytes_per_token(path, per_layer):
  cfg = load_config(ROOT / path).model
  per_token = cfg.n_layers * per_layer * jnp.dtype(cfg.dtype).itemsize
  assert decode.cache_bytes_per_token(cfg) == per_token
  abstract = jax.eval_shape(lambda: decode.init_cache(cfg, 3, 5, cfg.n_layers))   # nothing allocated
  assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) == 3 * 5 * per_token
  if "v3" in path:
    assert per_token == 70_272


# Hugging Face generate ------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
               kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24, first_k_dense_replace=1,
               initializer_range=0.1, max_position_embeddings=1280)


def _yarn(mscale: float) -> dict:
  return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}


HF_CASES = {
    "v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
           dict(q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
                routed_scaling_factor=2.5, rope_parameters=_yarn(1.0))),
    "v2_lite": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1,
                     routed_scaling_factor=1.0, rope_parameters=_yarn(0.707))),
}
PROMPTS = [[5, 6, 7, 8, 9], [11], [3, 1, 4, 1, 5, 9, 2, 6], [40, 41]]


@pytest.mark.parametrize("name", list(HF_CASES))
def test_greedy_matches_hf_generate(name, tmp_path):
  """Random tiny HF model -> save_pretrained -> load_hf_checkpoint; our batched ragged greedy decoding gives
  HF generate's tokens for each prompt, stopping at the same EOS."""
  cfg_cls, model_cls, overrides = HF_CASES[name]
  torch.manual_seed(0)
  hf = model_cls(cfg_cls(**HF_TINY, **overrides, attn_implementation="eager")).float().eval()
  with torch.no_grad():   # HF initializes norms to ones and the V3 router bias to zeros: randomize them
    for pname, p in hf.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    for bname, b in hf.named_buffers():
      if bname.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  hf.save_pretrained(tmp_path)
  cfg, tree = convert.load_hf_checkpoint(tmp_path, base=ModelConfig(dtype="float32"))
  eos = hf.generation_config.eos_token_id
  ours = Generator(cfg, tree).generate(PROMPTS, max_new_tokens=16, eos_id=eos).tokens
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=eos)
    assert got == out[0, len(prompt):].tolist(), prompt
  assert max(len(t) for t in ours) == 16


# Speculative decoding -------------------------------------------------------------------------------------

@functools.cache
def draftable_model():
  """The v3 model made mostly a bigram model (FFN outputs zeroed, attention output x 0.05) and an MTP module
  that copies it (eh_proj = [I ; 0], its block's outputs zeroed): its drafts are often, not always, right."""
  cfg, _, params, bias = parts("v3")
  tree = M.unstack_layers(cfg, jax.tree.map(np.array, generate._deep_merge(params, bias)))   # writable host copies
  for blk in tree["layers"].values():
    blk["attn"]["wo"] *= 0.05
    blk["ffn"]["w2"] *= 0
    if "shared_experts" in blk["ffn"]:
      blk["ffn"]["shared_experts"]["w2"] *= 0
  mtp = tree["mtp"][0]
  mtp["eh_proj"] = np.concatenate([np.eye(cfg.dim), np.zeros((cfg.dim, cfg.dim))]).astype(np.float32)
  for w in (mtp["block"]["attn"]["wo"], mtp["block"]["ffn"]["w2"], mtp["block"]["ffn"]["shared_experts"]["w2"]):
    w *= 0
  return cfg, tree


SPEC_PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1], [3, 3], [200, 100], [42] * 6, [5, 4], [0]]


@functools.cache
def draftable_generator() -> Generator:
  return Generator(*draftable_model())


@functools.cache
def single_device_results():
  gen = draftable_generator()
  return (gen.generate(SPEC_PROMPTS, max_new_tokens=24),
          gen.generate(SPEC_PROMPTS, max_new_tokens=24, speculative=True))


def test_speculative_greedy_equals_plain_greedy():
  plain, spec = single_device_results()
  assert spec.tokens == plain.tokens
  assert all(len(t) == 24 for t in spec.tokens)
  print(f"\nacceptance {spec.acceptance:.1%}, decode steps {spec.steps} (plain {plain.steps})")
  assert 0.2 < spec.acceptance < 0.95      # both the accept and the reject paths are exercised
  assert spec.steps < plain.steps          # and accepted drafts really save main-model steps


def test_speculative_sampling_rule_keeps_the_target_distribution():
  """P(token) = q(x) min(1, p(x)/q(x)) + P(reject) residual(x) = p(x): checked by Monte Carlo."""
  p = jnp.array([0.5, 0.2, 0.15, 0.1, 0.05])
  q = jnp.array([0.1, 0.4, 0.1, 0.3, 0.1])
  n = 200_000
  k_draft, k_rule = jax.random.split(jax.random.key(0))
  draft = jax.random.categorical(k_draft, jnp.log(q), shape=(n,)).astype(jnp.int32)
  accepted, tok = sampling.speculative_accept(k_rule, jnp.broadcast_to(p, (n, 5)), jnp.broadcast_to(q, (n, 5)), draft)
  freq = np.bincount(np.asarray(tok), minlength=5) / n
  np.testing.assert_allclose(freq, p, atol=0.005)
  np.testing.assert_allclose(float(accepted.mean()), float(jnp.minimum(p, q).sum()), atol=0.005)


# Sampling ------------------------------------------------------------------------------------------------

def test_filters_keep_the_right_tokens():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, SamplingConfig(temperature=1.0, top_k=5))))
  assert (kept.sum(-1) == 5).all()
  np.testing.assert_array_equal(kept, np.asarray(logits) >= np.sort(np.asarray(logits))[:, -5:-4])
  top_p = 0.8
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, SamplingConfig(temperature=0.5, top_p=top_p))))
  probs = np.asarray(jax.nn.softmax(logits / 0.5))
  for row, keep in zip(probs, kept):   # the smallest set of most likely tokens with mass >= top_p
    order = np.argsort(-row)
    n = int(np.searchsorted(np.cumsum(row[order]), top_p) + 1)
    assert set(np.flatnonzero(keep)) == set(order[:n])


def test_sampling_is_seeded_and_follows_the_temperature():
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
  cfg = SamplingConfig(temperature=2.0)
  draws = jax.vmap(lambda k: sampling.sample(k, logits, cfg))(jax.random.split(jax.random.key(3), 50_000))
  want = np.asarray(jax.nn.softmax(logits[0] / 2.0))
  np.testing.assert_allclose(np.bincount(np.asarray(draws[:, 0]), minlength=3) / 50_000, want, atol=0.01)
  assert int(sampling.sample(None, logits, SamplingConfig())[0]) == 0


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)])
def test_bad_sampling_settings(bad):
  with pytest.raises(ConfigError, match="top_p|temperature|top_k"):
    SamplingConfig(**bad)


def test_generate_samples_with_seeds_and_filters():
  gen = draftable_generator()
  warm = SamplingConfig(temperature=1.0, top_k=40)
  a, b, c = (gen.generate(SPEC_PROMPTS, max_new_tokens=12, sampling_cfg=warm, seed=s).tokens for s in (0, 0, 1))
  assert a == b and a != c
  greedy = single_device_results()[0].tokens
  top1 = gen.generate(SPEC_PROMPTS, max_new_tokens=12, sampling_cfg=SamplingConfig(temperature=1.0, top_k=1)).tokens
  assert top1 == [t[:12] for t in greedy]
  assert a != top1


# The loop ---------------------------------------------------------------------------------------------------

def test_eos_stops_each_sequence_and_the_loop(monkeypatch):
  gen = draftable_generator()
  greedy = single_device_results()[0].tokens
  eos = greedy[0][3]
  want = [t[:t.index(eos) + 1] if eos in t else t for t in greedy]
  assert gen.generate(SPEC_PROMPTS, max_new_tokens=24, eos_id=eos).tokens == want
  assert gen.generate(SPEC_PROMPTS, max_new_tokens=24, eos_id=eos, speculative=True).tokens == want
  compiled = gen._run._cache_size()
  prompt_BP, lens_B = gen.check(SPEC_PROMPTS, 24, False)
  short = gen.run(prompt_BP, lens_B, max_new_tokens=5, capacity=24, sampling_cfg=SamplingConfig())
  assert [t[:n].tolist() for t, n in zip(np.asarray(short.tokens_BN), np.asarray(short.n_B))] == \
      [t[:5] for t in greedy]
  assert int(short.steps) == 4 and gen._run._cache_size() == compiled   # same program, fewer tokens
  traced, real_step = [], decode.step
  monkeypatch.setattr(decode, "step", lambda *a: traced.append(1) or real_step(*a))
  alone = gen.generate(SPEC_PROMPTS[:1], max_new_tokens=24, eos_id=eos)   # a new shape: traced afresh
  assert alone.tokens == want[:1]
  assert len(traced) == 1     # one decode step traced, inside one while loop: no Python per token
  assert alone.steps == greedy[0].index(eos)   # the loop ends once every sequence has stopped


def test_bad_requests():
  cfg, gen = draftable_model()[0], draftable_generator()
  with pytest.raises(ValueError, match="empty prompt"):
    gen.generate([[1], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
    gen.generate([[1] * cfg.max_seq_len], max_new_tokens=1)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gen.generate([[cfg.vocab_size]], max_new_tokens=1)
  v2_cfg = parts("v2_lite")[0]
  with pytest.raises(ValueError, match="MTP"):
    Generator(v2_cfg, M.to_pure_dict(M.init_model(v2_cfg))).generate([[1]], max_new_tokens=2, speculative=True)


# Mesh -------------------------------------------------------------------------------------------------------

def test_expert_parallel_mesh_equals_one_device():
  """data=2 x expert=4 over 8 simulated devices: the MoE runs its all_to_all expert-parallel path inside the
  decode loop, and plain and speculative greedy tokens equal the single-device ones."""
  from sharding.mesh import make_mesh
  gen = Generator(*draftable_model(), mesh=make_mesh(MeshConfig(data=2, expert=4)))
  prompt_BP, lens_B = gen.check(SPEC_PROMPTS, 24, True)
  assert "all_to_all" in gen.lower(prompt_BP, lens_B, max_new_tokens=24).as_text()
  plain, spec = single_device_results()
  assert gen.generate(SPEC_PROMPTS, max_new_tokens=24).tokens == plain.tokens
  assert gen.generate(SPEC_PROMPTS, max_new_tokens=24, speculative=True).tokens == spec.tokens


# Checkpoints and the CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """What train.py leaves in train.ckpt_dir: Checkpointer steps of the TrainState with meta {"config": ...}."""
  from deepseek_jax import optim, trainer
  from deepseek_jax.checkpoint import Checkpointer
  cfg = load_config(TINY, SMALL)
  _, params, bias = M.split_model(M.init_model(cfg.model, seed=3))
  params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
  state = trainer.TrainState(jnp.zeros((), jnp.int32), params, optim.make_optimizer(cfg.optim).init(params), bias)
  directory = tmp_path_factory.mktemp("run")
  ckpt = Checkpointer(directory, keep=2, every=1)
  ckpt.save(5, state, meta={"config": to_dict(cfg)}, force=True)
  ckpt.close()
  return directory, cfg, M.unstack_layers(cfg.model, generate._deep_merge(state.params, state.bias))


def _assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_load_checkpoint_reads_params_and_bias(run_dir, tmp_path):
  import orbax.checkpoint as ocp
  import yaml
  directory, cfg, want = run_dir
  got_cfg, tree = generate.load_checkpoint(str(directory))   # the optimizer state is not read
  assert got_cfg == cfg
  _assert_same_tree(tree, want)
  # `python -m deepseek_jax.convert import` output: config.yaml + params/ (the full pure dict)
  (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg.model)}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "params", want)
  got_cfg, tree = generate.load_checkpoint(str(tmp_path))
  assert got_cfg.model == cfg.model
  _assert_same_tree(tree, want)


def test_cli_generates_from_a_training_run(run_dir, capsys):
  directory, _, _ = run_dir
  assert generate.main(["--checkpoint", str(directory), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
  out, err = capsys.readouterr()
  assert out.startswith("Hello") and "[5 tokens in 4 decode steps" in err


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "/nonexistent/run", "--prompt", "x"], "checkpoint directory not found"),
    (["--checkpoint", "EMPTY", "--prompt", "x"], "no committed checkpoint"),
    (["--hf", "RUN", "--prompt", "x"], "config.json: not found"),
    (["--checkpoint", "RUN", "--prompt", ""], "empty prompt"),
    (["--checkpoint", "RUN", "--prompt", "x" * 1100], "exceeds model.max_seq_len=1024"),
    (["--checkpoint", "RUN", "--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--checkpoint", "RUN", "--prompt", "x", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
])
def test_cli_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, argv, message, capsys):
  argv = [a.replace("RUN", str(run_dir[0])).replace("EMPTY", str(tmp_path)) for a in argv]
  assert generate.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and message in err, err
