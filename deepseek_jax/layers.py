"""Small building blocks: parameter creation with logical axes, Linear projections, RMSNorm, SwiGLU MLP.

Kernels are stored [in, out] (x @ W), in float32; compute casts them to the activation dtype at use.
Every parameter carries its logical axis names as the `axes` metadata; `sharding/rules.py` maps them to
mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import fp8
from deepseek_jax.config import ModelConfig


class RouterBias(nnx.Variable):
  """Aux-loss-free selection bias: state updated outside the gradient (DeepSeek-V3 section 2.1.2)."""


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float) -> nnx.Param:
  """A float32 N(0, std^2) parameter tagged with logical axes (one name per dim)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def ones(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, jnp.float32), axes=axes)


def dtype_of(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def linear(cfg: ModelConfig, x, w, n_in: int = 1):
  """A Linear layer in x's dtype: x's last `n_in` dims contracted with w's first `n_in` dims. With
  cfg.fp8 set, its forward and both backward GEMMs run in FP8 (fp8.project)."""
  return fp8.project(x, w, n_in, cfg.fp8, cfg.fp8_gemm)


class RMSNorm(nnx.Module):
  """w * x / sqrt(mean(x^2) + eps); the statistics in float32, as HF and the reference do."""

  def __init__(self, dim: int, eps: float):
    self.weight = ones((dim,), ("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and for the shared experts."""

  def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.w1 = param(rngs, (cfg.dim, hidden), ("embed", "mlp"), cfg.init_std)   # gate_proj
    self.w3 = param(rngs, (cfg.dim, hidden), ("embed", "mlp"), cfg.init_std)   # up_proj
    self.w2 = param(rngs, (hidden, cfg.dim), ("mlp", "embed"), cfg.init_std)   # down_proj

  def __call__(self, x_BSD):
    gate_BSF = linear(self.cfg, x_BSD, self.w1[...])
    up_BSF = linear(self.cfg, x_BSD, self.w3[...])
    return linear(self.cfg, jax.nn.silu(gate_BSF) * up_BSF, self.w2[...])
