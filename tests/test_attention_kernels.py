"""Attention implementations (model.attn_impl) against the XLA reference.

On CPU the Pallas TPU splash kernel runs in interpret mode ("splash_interpret"): the same kernel code, its
tiling, online softmax, segment ids and custom VJP, evaluated by Pallas' interpreter. The cuDNN and compiled
TPU paths have equality tests that run only on their own backend.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.attention import dot_product_attention
from deepseek_jax.config import ConfigError, MeshConfig, ModelConfig, load_config
from deepseek_jax.kernels.tpu_attention import splash_attention
from deepseek_jax.model import apply, init_model, split_model
from sharding.mesh import make_mesh

SCALE = 0.3
B, H, K, O = 2, 2, 48, 32   # MLA-style head dims: qk 48 (32 nope + 16 rope), v 32


def _qkv(S, b=B, h=H, k=K, o=O, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, S, h, k), dtype), jax.random.normal(kk, (b, S, h, k), dtype),
          jax.random.normal(kv, (b, S, h, o), dtype))


def _packed_segments(S, b=B):
  """Row 0: two documents then padding (segment 0); row 1: all padding. Rows beyond 1 repeat the pattern."""
  row0 = np.zeros(S, np.int32)
  row0[: S * 3 // 8] = 1
  row0[S * 3 // 8: S * 3 // 4] = 2
  rows = [row0, np.zeros(S, np.int32)]
  return jnp.asarray(np.stack([rows[i % 2] for i in range(b)]))


def _value_and_grads(fn, q, k, v):
  """Output and d(sum(sin(out) * w))/d(q, k, v): a cotangent that differs at every output element."""
  w = jax.random.normal(jax.random.key(7), fn(q, k, v).shape)
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, tol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)


# The splash kernel, interpreted --------------------------------------------------------------------------

@pytest.mark.parametrize("S, block, packed, dims", [
    (200, 128, True, (K, O)),    # 2 x 2 tiles (online softmax across kv tiles, the upper tile skipped);
                                 # S padded to 256 inside the kernel wrapper
    (256, 128, False, (K, O)),   # no segment ids: plain causal
    (128, 512, True, (32, 32)),  # one tile; v_head_dim == qk_head_dim (MHA), nothing padded
])
def test_splash_kernel_matches_xla(S, block, packed, dims):
  q, k, v = _qkv(S, k=dims[0], o=dims[1])
  seg = _packed_segments(S) if packed else None
  splash = lambda q, k, v: splash_attention(q, k, v, seg, scale=SCALE, block=block, interpret=True)
  xla = lambda q, k, v: dot_product_attention(q, k, v, seg, SCALE, "xla")
  _assert_close(_value_and_grads(splash, q, k, v), _value_and_grads(xla, q, k, v))


def _square_f32_buffers(hlo_text: str, S: int) -> list[str]:
  """f32 tensors whose last two dims are [S, S] (StableHLO `tensor<...xSxSxf32>`)."""
  return re.findall(rf"tensor<(?:\d+x)*{S}x{S}xf32>", hlo_text)


def test_splash_path_runs_the_kernel_and_never_builds_full_logits():
  S = 1024  # two 512-tiles; distinct from every other dim, so an [S, S] buffer can only be the logits
  q, k, v = _qkv(S)
  seg = _packed_segments(S)

  def fwd_bwd(impl):
    return jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, seg, SCALE, impl) ** 2), argnums=(0, 1, 2)))

  assert _square_f32_buffers(fwd_bwd("xla").lower(q, k, v).as_text(), S)   # the check sees XLA's logits
  assert not _square_f32_buffers(fwd_bwd("splash_interpret").lower(q, k, v).as_text(), S)
  jaxpr = str(jax.make_jaxpr(fwd_bwd("splash_interpret"))(q, k, v))
  assert jaxpr.count("pallas_call") >= 3   # forward, dq and dkv kernels


@pytest.mark.parametrize("packed", [True, False])
def test_splash_under_a_mesh_is_one_shard_map_per_call(packed):
  """Under a mesh the kernel runs per (batch, head) shard; the result is the unsharded one."""
  S, b, h = 128, 4, 4
  q, k, v = _qkv(S, b=b, h=h)
  seg = _packed_segments(S, b=b) if packed else None
  mesh = make_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2), jax.devices()[:8])
  fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, seg, SCALE, "splash_interpret"))
  with jax.set_mesh(mesh):
    got = fn(q, k, v)
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
  assert jaxpr.count("shard_map") == 1 and "pallas_call" in jaxpr
  _assert_close(got, dot_product_attention(q, k, v, seg, SCALE, "xla"))


def test_splash_under_a_mesh_refuses_a_batch_the_mesh_does_not_divide():
  mesh = make_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2), jax.devices()[:8])
  message = r"shards batch 3 over \('data', 'fsdp', 'expert'\) \(4\) and heads 2 over tensor \(2\): both must"
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=message):
    jax.jit(lambda q, k, v: dot_product_attention(q, k, v, None, SCALE, "splash_interpret"))(*_qkv(128, b=3))


# The model ---------------------------------------------------------------------------------------------

def _tiny(attn_impl: str, **overrides) -> ModelConfig:
  cfg = load_config("configs/tiny.yaml", [f"model.attn_impl={attn_impl}"]).model
  return ModelConfig(**{**cfg.__dict__, **overrides})


def test_model_with_splash_matches_xla():
  """Tiny config (MLA qk 48 / v 32; here one dense and one MoE layer, and MTP): logits, MTP logits and every
  parameter gradient, through dot_product_attention's dispatch on model.attn_impl."""
  S = 128
  tokens = jax.random.randint(jax.random.key(1), (B, S), 0, 256)
  seg = _packed_segments(S)
  positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))

  def run(impl):
    graphdef, params, bias = split_model(init_model(_tiny(impl, n_layers=2), seed=0))

    def loss(params):
      logits, aux = apply(graphdef, params, bias, tokens, positions, seg)
      mtp = jax.tree.leaves(aux)
      return jnp.mean(logits ** 2) + sum(jnp.mean(x.astype(jnp.float32) ** 2) for x in mtp), (logits, aux)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads

  (got_out, got_grads), (want_out, want_grads) = run("splash_interpret"), run("xla")
  _assert_close(got_out, want_out, tol=1e-4)
  _assert_close(got_grads, want_grads, tol=1e-4)


# Choices that cannot run here fail loudly ----------------------------------------------------------------

@pytest.mark.parametrize("impl, platform", [("cudnn", "gpu"), ("cudnn_padded", "gpu"), ("splash", "tpu")])
def test_accelerator_choice_on_the_wrong_backend_is_a_one_line_error(impl, platform):
  if jax.default_backend() == platform:
    pytest.skip(f"runs on {platform}")
  q, k, v = _qkv(128)
  with pytest.raises(ValueError, match=rf"attn_impl='{impl}' needs a {platform.upper()} backend.*'xla'") as e:
    dot_product_attention(q, k, v, _packed_segments(128), SCALE, impl)
  assert "\n" not in str(e.value)


def test_unknown_attn_impl_is_a_config_error():
  with pytest.raises(ConfigError, match="model.attn_impl='flash' is not one of"):
    ModelConfig(attn_impl="flash")


# On their own accelerators -------------------------------------------------------------------------------

def _assert_close_bf16(impl, S, packed):
  """bf16 `impl` against the float32 XLA reference at V3's MLA head dims (qk 192, v 128), forward and
  gradients, each within 2% of the reference's largest magnitude."""
  q, k, v = _qkv(S, h=4, k=192, o=128)
  seg = _packed_segments(S) if packed else None
  scale = 192 ** -0.5
  bf16 = lambda fn: lambda *a: fn(*(x.astype(jnp.bfloat16) for x in a)).astype(jnp.float32)
  got = _value_and_grads(bf16(lambda *a: dot_product_attention(*a, seg, scale, impl)), q, k, v)
  want = _value_and_grads(lambda *a: dot_product_attention(*a, seg, scale, "xla"), q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=2e-2 * float(jnp.abs(w).max()))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("impl", ["cudnn", "cudnn_padded"])
@pytest.mark.parametrize("packed", [True, False])
def test_cudnn_matches_xla_on_gpu(impl, packed):
  _assert_close_bf16(impl, 512, packed)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="the compiled splash kernel needs a TPU")
@pytest.mark.parametrize("S", [1024, 1000])
@pytest.mark.parametrize("packed", [True, False])
def test_splash_matches_xla_on_tpu(S, packed):
  _assert_close_bf16("splash", S, packed)
