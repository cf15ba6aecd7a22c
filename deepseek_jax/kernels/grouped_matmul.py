"""Grouped matmul for the routed experts: rows sorted by expert times one weight matrix per expert.

Implementations (ModelConfig.gmm_impl, resolved by `resolve_impl`):
  "xla"   jax.lax.ragged_dot, differentiated by JAX. Runs everywhere; slow on GPUs (~30x the Pallas kernel).
  "mgpu"  Pallas Mosaic-GPU ragged_dot / transposed_ragged_dot (Hopper, bf16/f16, dims multiple of 128).
  "ref"   the same custom VJP as "mgpu" on lax.ragged_dot / ragged_dot_general: the CPU oracle of that VJP.
  "auto"  "mgpu" on Hopper with bf16/f16 and tileable dims, else "xla"; resolved once, before tracing.

Inside a shard_map every operand carries the mesh axes it varies over (its "vma" type). A custom VJP must
return cotangents of the same type as its primals, so `gmm` first casts all operands to the union of their
varying axes (`pcast`, no data moves). The transpose of that cast is a psum over the added axes, which is
exactly the reduction autodiff would insert for a plain ragged_dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.config import GmmTiles

IMPLS = ("auto", "xla", "mgpu", "ref")


def is_hopper() -> bool:
  try:
    devs = jax.devices()
  except RuntimeError:
    return False
  return bool(devs) and all(d.platform == "gpu" and str(getattr(d, "compute_capability", "")) == "9.0"
                            for d in devs)


def resolve_impl(impl: str, dtype, dim: int, inter_dim: int) -> str:
  """The concrete implementation for `impl` on this machine; raises (one line) if it cannot run here."""
  if impl not in IMPLS:
    raise ValueError(f"model.gmm_impl={impl!r} is not one of {IMPLS}")
  mgpu_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and dim % 128 == 0 and inter_dim % 128 == 0
  if impl == "auto":
    return "mgpu" if mgpu_ok and is_hopper() else "xla"
  if impl == "mgpu" and not (mgpu_ok and is_hopper()):
    raise ValueError(f"model.gmm_impl='mgpu' needs Hopper GPUs, bf16/f16 compute and dim, moe_inter_dim "
                     f"multiples of 128 (have {jnp.dtype(dtype).name}, {dim}, {inter_dim}, "
                     f"{jax.default_backend()}); use gmm_impl='xla'")
  return impl


def _gmm_kwargs(t: GmmTiles, wgrad: bool = False) -> dict:
  return dict(block_m=t.block_m, block_n=t.block_n, block_k=t.block_k, max_concurrent_steps=t.max_concurrent_steps,
              grid_block_n=t.wgrad_grid_block_n if wgrad else t.grid_block_n)


def _vma(x) -> frozenset:
  """The mesh axes `x` varies over inside a shard_map (empty outside): `aval.vma` up to jax 0.10,
  `aval.manual_axis_type.varying` from 0.11."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _vary(y, vma: tuple[str, ...]):
  """Give `y` the varying axes `vma` (pcast, no data moves). A Pallas call's result carries no varying-axes
  type, and neither do custom-VJP cotangents computed from it; inside a shard_map they vary like the operands."""
  missing = tuple(sorted(frozenset(vma) - _vma(y)))
  return jax.lax.pcast(y, missing, to="varying") if missing else y


def _ragged_fwd(x_MK, w_GKN, gs_G, impl: str, tiles: GmmTiles, transpose_rhs: bool = False):
  """[M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N], rows grouped by gs (sum(gs) <= M)."""
  if impl == "mgpu":
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    y_MN = ragged_dot_mgpu.ragged_dot(x_MK, w_GKN, group_sizes=gs_G, transpose_rhs=transpose_rhs, **_gmm_kwargs(tiles))
    return y_MN
  w = jnp.swapaxes(w_GKN, 1, 2) if transpose_rhs else w_GKN
  return jax.lax.ragged_dot(x_MK, w, gs_G, preferred_element_type=jnp.float32).astype(x_MK.dtype)


def _ragged_wgrad(x_MK, dy_MN, gs_G, impl: str, tiles: GmmTiles):
  """sum over each group's rows of x^T dy -> [G, K, N]."""
  if impl == "mgpu":
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    dw_GKN = transposed_ragged_dot_mgpu.transposed_ragged_dot(x_MK, dy_MN, group_sizes=gs_G,
                                                              **_gmm_kwargs(tiles, wgrad=True))
    return dw_GKN
  dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                         lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return jax.lax.ragged_dot_general(x_MK, dy_MN, gs_G, dn, preferred_element_type=jnp.float32).astype(x_MK.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_vjp(x_MK, w_GKN, gs_G, impl: str, tiles: GmmTiles, vma: tuple[str, ...]):
  return _vary(_ragged_fwd(x_MK, w_GKN, gs_G, impl, tiles), vma)


def _gmm_fwd(x_MK, w_GKN, gs_G, impl, tiles, vma):
  return _gmm_vjp(x_MK, w_GKN, gs_G, impl, tiles, vma), (x_MK, w_GKN, gs_G)


def _gmm_bwd(impl, tiles, vma, res, dy_MN):
  x_MK, w_GKN, gs_G = res
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = _ragged_fwd(dy_MN, w_GKN, gs_G, impl, tiles, transpose_rhs=True)
  dw_GKN = _ragged_wgrad(x_MK, dy_MN, gs_G, impl, tiles)
  return _vary(dx_MK, vma), _vary(dw_GKN.astype(w_GKN.dtype), vma), None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _same_vma(*xs):
  """pcast every operand to the union of their varying mesh axes (a no-op outside shard_map)."""
  vmas = [_vma(x) for x in xs]
  union = frozenset().union(*vmas)
  return tuple(jax.lax.pcast(x, tuple(sorted(union - v)), to="varying") if union - v else x
               for x, v in zip(xs, vmas))


def gmm(x_MK, w_GKN, gs_G, impl: str, tiles: GmmTiles = GmmTiles()):
  """Grouped matmul: row block g of x (gs[g] rows, in order) times w[g]. Rows past sum(gs) give 0.

  impl must be resolved ("xla", "mgpu" or "ref"). "xla" is plain ragged_dot under JAX's autodiff; the others
  use an explicit VJP: dx = grouped dy w^T, dw = grouped x^T dy."""
  if impl == "xla":
    return jax.lax.ragged_dot(x_MK, w_GKN, gs_G, preferred_element_type=jnp.float32).astype(x_MK.dtype)
  x_MK, w_GKN, gs_G = _same_vma(x_MK, w_GKN, gs_G)
  return _gmm_vjp(x_MK, w_GKN, gs_G, impl, tiles, tuple(sorted(_vma(x_MK))))
