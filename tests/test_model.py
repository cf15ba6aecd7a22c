"""Model behaviour on CPU: causality, packing, MoE paths, MTP, balancing, gradients, configs, FLOPs."""

import dataclasses
import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import experts, flops, loss, moe
from deepseek_jax import model as M
from deepseek_jax.config import ConfigError, ModelConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
  return load_config(ROOT / "configs/tiny.yaml").model


@pytest.fixture(scope="module")
def parts(cfg):
  graphdef, params, bias = M.split_model(M.init_model(cfg, seed=0))
  return graphdef, params.to_pure_dict(), bias.to_pure_dict()


def _tokens(b=2, s=24, seed=0, vocab=256):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, vocab)


def test_causality_no_gradient_from_future(cfg, parts):
  """d logits[t] / d embedding[t'] == 0 for t' > t, for main and MTP heads."""
  graphdef, params, bias = parts
  toks = _tokens()
  t = 10

  def out_at_t(emb):
    p = dict(params, embed=emb)
    logits, aux = M.apply(graphdef, p, bias, toks)
    return logits[:, t].sum() + aux.mtp_logits[0][:, t - 1].sum()

  g = jax.grad(out_at_t)(params["embed"])
  future = np.unique(np.asarray(toks[:, t + 1:]))
  past = np.unique(np.asarray(toks[:, :t + 1]))
  only_future = np.setdiff1d(future, past)
  assert only_future.size > 0
  assert np.abs(np.asarray(g)[only_future]).max() == 0.0
  assert np.abs(np.asarray(g)[past]).max() > 0.0


def test_packed_documents_do_not_attend_across(cfg, parts):
  """With segment ids, document 2's logits equal those of running document 2 alone."""
  graphdef, params, bias = parts
  toks = _tokens(1, 32)
  seg = jnp.concatenate([jnp.ones((1, 12), jnp.int32), 2 * jnp.ones((1, 20), jnp.int32)], 1)
  pos = jnp.concatenate([jnp.arange(12), jnp.arange(20)])[None]
  packed, _ = M.apply(graphdef, params, bias, toks, pos, seg, mtp=False)
  alone, _ = M.apply(graphdef, params, bias, toks[:, 12:], mtp=False)
  chex.assert_trees_all_close(packed[:, 12:], alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [dict(moe_impl="dense"), dict(capacity_factor=8.0)])
def test_moe_paths_agree(cfg, parts, variant):
  graphdef, params, bias = parts
  toks = _tokens()
  ref, _ = M.apply(graphdef, params, bias, toks)
  gd2, _, _ = M.split_model(M.init_model(dataclasses.replace(cfg, **variant)))
  got, aux = M.apply(gd2, params, bias, toks)
  chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)
  assert int(aux.dropped) == 0


def test_capacity_drops_are_counted():
  cfg = dataclasses.replace(load_config(ROOT / "configs/tiny.yaml").model, capacity_factor=0.25)
  x = jax.random.normal(jax.random.key(1), (64, cfg.dim))
  idx = jnp.zeros((64, cfg.n_activated_experts), jnp.int32).at[:, 1].set(1)  # all tokens on experts 0, 1
  w = jnp.ones((64, cfg.n_activated_experts)) / 2
  ws = [jax.random.normal(jax.random.key(i), s) * 0.1 for i, s in
        enumerate([(8, cfg.dim, 16), (8, cfg.dim, 16), (8, 16, cfg.dim)])]
  _, dropped = experts.capacity_experts(x, idx, w, *ws, cfg)
  cap = experts.capacity(64, cfg)            # ceil(0.25 * 64 * 2 / 8) = 4 slots per expert
  assert int(dropped) == 2 * (64 - cap)


def test_group_limited_routing_respects_groups(cfg):
  x = jax.random.normal(jax.random.key(0), (128, cfg.dim))
  gate = jax.random.normal(jax.random.key(1), (cfg.dim, cfg.n_routed_experts))
  r = moe.route(x, gate, jnp.zeros(cfg.n_routed_experts), cfg)
  groups = np.asarray(r.idx_Tk) // cfg.experts_per_group
  assert max(len(set(row)) for row in groups) <= cfg.n_limited_groups
  np.testing.assert_allclose(np.asarray(r.w_Tk).sum(-1), cfg.route_scale, rtol=1e-5)  # normalized


def test_router_bias_is_selection_only(cfg):
  x = jax.random.normal(jax.random.key(0), (64, cfg.dim))
  gate = jax.random.normal(jax.random.key(1), (cfg.dim, cfg.n_routed_experts))
  bias = jnp.zeros(cfg.n_routed_experts).at[3].set(10.0)
  r = moe.route(x, gate, bias, cfg)
  assert (np.asarray(r.idx_Tk) == 3).any(axis=1).all()          # bias forces selection of expert 3
  s = np.asarray(r.scores_TE)
  picked = np.take_along_axis(s, np.asarray(r.idx_Tk), 1)
  np.testing.assert_allclose(np.asarray(r.w_Tk), picked / picked.sum(1, keepdims=True) * cfg.route_scale,
                             rtol=1e-5)                           # weights from unbiased scores


def test_bias_update_moves_load_toward_balance(cfg):
  """A skewed router: repeated aux-loss-free updates shrink the max/mean load ratio."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (512, cfg.dim)) + 0.5
  gate = jax.random.normal(jax.random.key(1), (cfg.dim, cfg.n_routed_experts)) * 0.05
  gate = gate.at[:, 0].add(0.02).at[:, 1].add(0.015)            # experts 0, 1 favoured
  mask = jnp.ones((1, 512), bool)

  def imbalance(bias):
    r = moe.route(x, gate, bias, cfg)
    load = moe.expert_counts(r.idx_Tk[None], mask, cfg.n_routed_experts)[0]
    return load, float(load.max() / load.mean())

  bias = jnp.zeros(cfg.n_routed_experts)
  load, start = imbalance(bias)
  for _ in range(200):
    bias = moe.update_router_bias(bias, load, 0.01)
    load, end = imbalance(bias)
  assert start > 3.0 and end < 1.5, (start, end)


def test_seq_aux_loss_is_alpha_when_balanced(cfg):
  B, S, E, k = 2, 8, cfg.n_routed_experts, cfg.n_activated_experts
  scores = jnp.full((B, S, E), 0.5)
  counts = jnp.full((B, E), S * k / E)
  got = moe.seq_aux_loss(scores, counts, jnp.ones((B, S), bool), cfg)
  np.testing.assert_allclose(float(got), cfg.seq_aux_alpha, rtol=1e-6)


def test_mtp_targets_and_loss(cfg, parts):
  targets = jnp.arange(10)[None]
  mask = jnp.ones((1, 10))
  seg = jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
  t1, m1 = loss.mtp_targets(targets, mask, seg, 1)
  assert t1[0, 0] == 1 and t1[0, 4] == 5
  np.testing.assert_array_equal(np.asarray(m1[0]), [1, 1, 1, 1, 1, 0, 1, 1, 1, 0])
  # The MTP loss on a real forward equals a hand-computed CE of the depth-1 head over valid positions.
  graphdef, params, bias = parts
  toks = _tokens(1, 16)
  batch = loss.Batch(inputs=toks, targets=jnp.roll(toks, -1, 1), segment_ids=jnp.ones((1, 16), jnp.int32),
                     positions=jnp.arange(16)[None], loss_mask=jnp.ones((1, 16)).at[0, -1].set(0))
  logits, aux = M.apply(graphdef, params, bias, toks)
  main, mtp_raw, mtp_w = loss.lm_losses(logits, aux.mtp_logits, batch, 0.3)
  lp = jax.nn.log_softmax(aux.mtp_logits[0][0], -1)
  want = -sum(float(lp[i, toks[0, i + 2]]) for i in range(14)) / 15.0   # 14 valid, divided by main count
  np.testing.assert_allclose(float(mtp_raw), want, rtol=1e-5)
  np.testing.assert_allclose(float(mtp_w), 0.3 * want, rtol=1e-5)
  assert 5.0 < float(main) < 6.0           # ~ln(256) at init


def test_gradients_finite_and_nonzero(cfg, parts):
  graphdef, params, bias = parts
  toks = _tokens()

  def f(p):
    logits, aux = M.apply(graphdef, p, bias, toks)
    return logits.mean() + aux.mtp_logits[0].mean() + aux.aux_loss

  grads = jax.jit(jax.grad(f))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(float(jnp.abs(g).sum() > 0) for g in leaves) >= 0.9 * len(leaves)


@pytest.mark.parametrize("variant", [dict(moe_impl="dense"), dict(capacity_factor=8.0)])
def test_vmap_over_examples_matches_batch(cfg, parts, variant):
  """vmap over single examples equals the batched forward. (The dropless ragged_dot path is not vmappable:
  JAX's ragged_dot batching rule is not implemented for it.)"""
  _, params, bias = parts
  graphdef, _, _ = M.split_model(M.init_model(dataclasses.replace(cfg, **variant)))
  toks = _tokens(3, 12)
  batched, _ = M.apply(graphdef, params, bias, toks, mtp=False)
  mapped = jax.vmap(lambda t: M.apply(graphdef, params, bias, t[None], mtp=False)[0][0])(toks)
  chex.assert_trees_all_close(mapped, batched, atol=1e-5, rtol=1e-5)


def test_remat_matches(cfg, parts):
  graphdef, params, bias = parts
  toks = _tokens()
  gd2, _, _ = M.split_model(M.init_model(dataclasses.replace(cfg, remat="full")))
  f = lambda gd: jax.grad(lambda p: M.apply(gd, p, bias, toks)[0].mean())(params)
  chex.assert_trees_all_close(f(gd2), f(graphdef), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ({"n_routed_experts": 10, "n_expert_groups": 4}, "not divisible by n_expert_groups"),
    ({"score_func": "relu"}, "model.score_func"),
    ({"n_dense_layers": 9}, "n_dense_layers"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2: layers are scanned"),
])
def test_inconsistent_model_config_fails(cfg, override, message):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(cfg, **override)


def test_unknown_config_key_fails(tmp_path):
  p = tmp_path / "bad.yaml"
  p.write_text("model:\n  dimm: 3\n")
  with pytest.raises(ConfigError, match="unknown config key 'model.dimm'"):
    load_config(p)
  with pytest.raises(ConfigError, match="should be of type int"):
    load_config(ROOT / "configs/tiny.yaml", ["model.dim=abc"])
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(tmp_path / "missing.yaml")


def test_v3_flops_match_spec():
  """Spec section 11: V3 active matmul params 36.625B, training 250.4 GFLOPs/token at S=4096 (no MTP)."""
  v3 = ModelConfig()
  assert flops.attn_matmul_params(v3) == 187_105_280
  np.testing.assert_allclose(flops.active_matmul_params(v3, mtp=False), 36.625e9, rtol=1e-4)
  np.testing.assert_allclose(flops.train_flops_per_token(v3, 4096, mtp=False), 250.4e9, rtol=1e-3)


def test_fast_grouped_path_matches_ragged_dot(cfg):
  """The GPU kernel's custom VJP run with its CPU reference kernel ('ref' = the same VJP structure on
  lax.ragged_dot) equals autodiff of plain ragged_dot ('xla'), values and gradients."""
  T, E, D, F = 48, cfg.n_routed_experts, cfg.dim, 32
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (T, D))
  r = moe.route(x, jax.random.normal(keys[1], (D, E)), jnp.zeros(E), cfg)
  ws = [0.1 * jax.random.normal(kk, s) for kk, s in zip(keys[2:], [(E, D, F), (E, D, F), (E, F, D)])]

  def loss(fn, x, w_Tk, *ws):
    return jnp.sum(fn(x, r.idx_Tk, w_Tk, *ws) ** 2)

  plain = lambda *a: experts.dropless_experts(*a, impl="xla")
  fast = lambda *a: experts.dropless_experts(*a, impl="ref")
  ref_val, ref_grads = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3, 4))(x, r.w_Tk, *ws)
  val, grads = jax.value_and_grad(functools.partial(loss, fast), argnums=(0, 1, 2, 3, 4))(x, r.w_Tk, *ws)
  np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=5e-5)   # float32 sums in another order; grads are O(1)


def test_layers_are_scanned(cfg, parts):
  """The decoder stack is two scans (dense prefix, MoE layers) over stacked parameters: the lowered forward has
  one while loop per stack, whatever the depth, and the per-layer layout round-trips through the stacks."""
  graphdef, params, bias = parts
  assert params["moe_layers"]["ffn"]["w1"].shape[0] == cfg.n_layers - cfg.n_dense_layers
  assert params["dense_layers"]["attn_norm"]["weight"].shape == (cfg.n_dense_layers, cfg.dim)
  deep = dataclasses.replace(cfg, n_layers=8)
  gd8, p8, b8 = M.split_model(M.init_model(deep))
  text = jax.jit(lambda p, b, t: M.apply(gd8, p, b, t, mtp=False)[0]).lower(p8, b8, _tokens()).as_text()
  gd_unrolled = M.split_model(M.init_model(dataclasses.replace(deep, scan_layers=False)))[0]
  loss = lambda gd: jax.value_and_grad(lambda p: M.apply(gd, p, b8, _tokens())[0].mean())(p8)
  unrolled = jax.jit(lambda p, b, t: M.apply(gd_unrolled, p, b, t, mtp=False)[0]).lower(p8, b8, _tokens()).as_text()
  # the scan adds one loop per stack (dense prefix, MoE layers); unrolled, the same stacked parameters, none
  assert text.count("stablehlo.while") == unrolled.count("stablehlo.while") + 2
  chex.assert_trees_all_close(loss(gd_unrolled), loss(gd8), atol=1e-6, rtol=1e-5)
  tree = M.to_pure_dict(M.init_model(cfg))
  assert sorted(tree["layers"]) == list(range(cfg.n_layers))
  back = M.to_pure_dict(M.from_pure_dict(cfg, tree))
  chex.assert_trees_all_equal(back, tree)
  views = list(M.init_model(cfg).blocks())
  assert len(views) == cfg.n_layers and [b.is_moe for b in views] == [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
