"""flops.py against XLA's own FLOP count (cost analysis of the lowered module) on the tiny model.

XLA also counts elementwise work (softmax, SwiGLU, norms), a few percent at these sizes, so the tolerance is
5%: enough to catch a missing expert, projection or block (9% or more here), not the router's small D x E.
The routed experts run the capacity path at capacity factor 1 with T*k/E whole, so the buffer holds exactly
the T*k assignments the formula counts.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import flops
from deepseek_jax import model as model_lib
from deepseek_jax.attention import dot_product_attention
from deepseek_jax.config import load_config
from deepseek_jax.layers import RouterBias
from deepseek_jax.moe import MoE

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Unrolled layers: XLA's cost analysis counts a scanned loop body once.
CFG = dataclasses.replace(load_config(ROOT / "configs/tiny.yaml").model, capacity_factor=1.0, scan_layers=False)
B, S = 2, 64
TOL = 0.05


def xla_flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def moe_layer_fn():
  graphdef, params, bias = nnx.split(MoE(CFG, rngs=nnx.Rngs(0)), nnx.Param, RouterBias)
  x_BSD = jax.random.normal(jax.random.key(1), (B, S, CFG.dim))
  mask_BS = jnp.ones((B, S))
  return (lambda p, x: nnx.merge(graphdef, p, bias)(x, mask_BS)[0]), params, x_BSD


@pytest.mark.parametrize("train", [False, True])
def test_moe_layer_flops(train):
  assert B * S * CFG.n_activated_experts % CFG.n_routed_experts == 0
  fwd, params, x = moe_layer_fn()
  fn = jax.grad(lambda p, x: fwd(p, x).sum(), argnums=(0, 1)) if train else fwd
  np.testing.assert_allclose(xla_flops(fn, params, x), flops.moe_layer_flops(CFG, B * S, train=train), rtol=TOL)


def test_attention_core_flops_are_half_the_square():
  q = jnp.ones((B, S, CFG.n_heads, CFG.qk_head_dim))
  v = jnp.ones((B, S, CFG.n_heads, CFG.v_head_dim))
  full_square = xla_flops(lambda q, k, v: dot_product_attention(q, k, v, None, 1.0), q, q, v)   # XLA: no skipping
  np.testing.assert_allclose(full_square, 2 * flops.attention_core_flops(CFG, B, S, train=False), rtol=TOL)


def test_model_forward_flops_per_token():
  """train_flops_per_token / 3 is the forward, with causal attention at half the square; XLA computes the
  whole square, so its count is compared with the forward plus the other half."""
  assert CFG.n_mtp_layers > 0
  graphdef, params, bias = model_lib.split_model(model_lib.init_model(CFG))
  tokens = jnp.zeros((B, S), jnp.int32)
  counted = xla_flops(lambda p, t: model_lib.apply(graphdef, p, bias, t, mtp=True), params, tokens)
  fwd_per_token = flops.train_flops_per_token(CFG, S) / 3
  other_half = (CFG.n_layers + CFG.n_mtp_layers) * flops.attention_flops_per_token(CFG, S)
  np.testing.assert_allclose(counted, B * S * (fwd_per_token + other_half), rtol=TOL)
