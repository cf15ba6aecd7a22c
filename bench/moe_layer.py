"""Times one MoE layer (router + routed experts + shared expert), forward + backward, per expert implementation.

  dense     moe.dense_experts: every expert on every token, a dense [T, E] combine (the test oracle)
  grouped   sort by expert + lax.ragged_dot (dropless; moe.grouped_ffn)
  capacity  sort by expert + [E, C, D] buffer + batched einsum (moe.padded_ffn), cf = --capacity-factor

Defaults are the `bench` model's MoE (d=1536, 64 experts of 768, top-6, 1 shared, 4 x 4096 tokens) in
bfloat16, for a GPU; --cpu-small is a float32 toy size. With --mesh, the layer runs under jax.set_mesh, so
grouped/capacity go through the expert-parallel shard_map (sharding/expert_parallel.py).

TFLOP/s counts model FLOPs only (router, k routed experts and the shared experts per token; fwd + bwd =
3 x fwd), so the dense path's extra E/k work is not credited.

  python bench/moe_layer.py --cpu-small
  python bench/moe_layer.py --mesh 1,1,8,1 --impls grouped,capacity
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import MeshConfig, ModelConfig
from deepseek_jax import moe
from deepseek_jax.layers import RouterBias
from deepseek_jax.moe import MoE

GPU_DEFAULTS = dict(tokens=4 * 4096, dim=1536, experts=64, inter=768, topk=6, shared=1, groups=8,
                    limited_groups=4, dtype="bfloat16")
CPU_SMALL = dict(tokens=1024, dim=128, experts=16, inter=64, topk=4, shared=1, groups=4, limited_groups=2,
                 dtype="float32")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cpu-small", action="store_true", help="small float32 sizes for a CPU")
  for name, typ in (("tokens", int), ("dim", int), ("experts", int), ("inter", int), ("topk", int),
                    ("shared", int), ("groups", int), ("limited-groups", int), ("dtype", str)):
    p.add_argument(f"--{name}", type=typ, default=None, help=f"default {GPU_DEFAULTS[name.replace('-', '_')]}")
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--impls", default="dense,grouped,capacity")
  p.add_argument("--mesh", default="", help="data,fsdp,expert,tensor sizes (default: one device, no mesh)")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args(argv)
  sizes = dict(CPU_SMALL if args.cpu_small else GPU_DEFAULTS)
  for key in sizes:
    if getattr(args, key) is not None:
      sizes[key] = getattr(args, key)
  return args, sizes


def model_config(sizes, impl: str, capacity_factor: float) -> ModelConfig:
  return ModelConfig(dim=sizes["dim"], moe_inter_dim=sizes["inter"], n_routed_experts=sizes["experts"],
                     n_activated_experts=sizes["topk"], n_shared_experts=sizes["shared"],
                     n_expert_groups=sizes["groups"], n_limited_groups=sizes["limited_groups"],
                     dtype=sizes["dtype"], moe_impl="dense" if impl == "dense" else "grouped",
                     capacity_factor=capacity_factor if impl == "capacity" else 0.0)


def model_flops(sizes) -> float:
  """fwd + bwd model FLOPs: 3 x (router + k routed SwiGLUs + shared SwiGLU) per token."""
  T, D, F, E, k, s = (sizes[n] for n in ("tokens", "dim", "inter", "experts", "topk", "shared"))
  fwd = 2 * T * D * E + 3 * 2 * T * D * F * (k + s)
  return 3.0 * fwd


def make_step(cfg: ModelConfig, batch: int, seq: int):
  graphdef, params, bias = nnx.split(MoE(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, RouterBias)
  x = jax.random.normal(jax.random.key(1), (batch, seq, cfg.dim), jnp.dtype(cfg.dtype))
  mask = jnp.ones((batch, seq), bool)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params, bias)(x, mask)
    return jnp.mean(y.astype(jnp.float32) ** 2) + stats["aux_loss"], stats["dropped"]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  return step, params, x


def time_impl(cfg, sizes, args, mesh):
  batch = 4 if sizes["tokens"] % 4 == 0 else 1
  if mesh is not None:   # one sequence per token shard at least
    from sharding.rules import RULES, axis_size, mesh_spec, shard_state
    batch = math.lcm(batch, axis_size(mesh, RULES["batch"]))
  step, params, x = make_step(cfg, batch, sizes["tokens"] // batch)
  if mesh is not None:
    params = shard_state(params, mesh)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, mesh_spec(("batch", "seq", "act_embed"), mesh)))
  t0 = time.perf_counter()
  out = jax.block_until_ready(step(params, x))
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    jax.block_until_ready(step(params, x))
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t0)
  dropped = int(out[0][1])
  return statistics.median(times), compile_s, dropped


def main(argv=None):
  args, sizes = parse_args(argv)
  mesh = None
  if args.mesh:
    from sharding.mesh import make_mesh
    data, fsdp, expert, tensor = (int(v) for v in args.mesh.split(","))
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, expert=expert, tensor=tensor))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} ({jax.devices()[0].device_kind}) "
        f"jax={jax.__version__} mesh={dict(mesh.shape) if mesh else None}")
  print("sizes: " + " ".join(f"{k}={v}" for k, v in sizes.items()) + f" capacity_factor={args.capacity_factor}")
  pick = getattr(moe, "grouped_matmul_impl", None)   # the single-device dropless kernel choice, if moe has one
  if pick is not None:
    kernel = pick(jnp.dtype(sizes["dtype"]), sizes["dim"], sizes["inter"])
    print(f"grouped kernel without --mesh: {kernel}; with --mesh the expert-parallel path: lax.ragged_dot")
  flops = model_flops(sizes)
  print(f"{'impl':<10}{'ms':>10}{'TFLOP/s':>10}{'compile s':>11}{'dropped':>10}")
  for impl in args.impls.split(","):
    cfg = model_config(sizes, impl, args.capacity_factor)
    try:
      if mesh is not None:
        with jax.set_mesh(mesh):
          sec, compile_s, dropped = time_impl(cfg, sizes, args, mesh)
      else:
        sec, compile_s, dropped = time_impl(cfg, sizes, args, None)
    except Exception as e:  # noqa: BLE001  (e.g. the dense path out of memory at full size)
      print(f"{impl:<10}  failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
      continue
    frac = dropped / (sizes["tokens"] * sizes["topk"])
    print(f"{impl:<10}{sec * 1e3:>10.2f}{flops / sec / 1e12:>10.3f}{compile_s:>11.1f}{dropped:>7} "
          f"({frac:.1%})")


if __name__ == "__main__":
  main()
