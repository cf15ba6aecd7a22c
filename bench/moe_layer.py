"""One MoE layer, forward + backward, on one device: the local path against the expert-parallel path.

moe.routed_experts picks the path from the ambient mesh: with none set, the per-device expert math of
experts.py on all tokens; under `jax.set_mesh(run.mesh)` (as train.py runs every step), the expert-parallel
shard_map of sharding/expert_parallel.py. On a 1x1x1x1 mesh the two must cost the same. Each variant
(gmm_impl x capacity factor; the capacity path runs no grouped matmul, so it is timed once) is timed both ways
on the config's shapes: the whole MoE module (router, routed experts, shared experts) on train.batch_size x
data.seq_len tokens in model.dtype. Every traced program is checked for the shard_map (present under the mesh,
absent without), so each time belongs to the path its row names. TFLOP/s counts flops.moe_layer_flops.

  PYTHONPATH=. python -m bench.moe_layer --out $OUT/moe_layer.json      # GPU: bench config, mgpu and xla
  PYTHONPATH=. python -m bench.moe_layer --smoke                         # CPU: tiny config, xla and ref
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from deepseek_jax import flops
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import RouterBias
from deepseek_jax.moe import MoE
from deepseek_jax.run import Run


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.config_args(p, "moe_layer.json")
  p.add_argument("--impls", default="mgpu", help="model.gmm_impl values for the dropless path (smoke: xla,ref; "
                 "xla = lax.ragged_dot needs >80 GiB at the bench shapes on an H100)")
  p.add_argument("--capacity-factors", default="0,1.25", help="model.capacity_factor values (0 = dropless)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args(argv)
  if args.smoke:
    args.impls = "xla,ref" if args.impls == "mgpu" else args.impls
    args.warmup, args.iters = 1, 2
  return args


def variants(model: ModelConfig, impls: str, capacity_factors: str) -> list[ModelConfig]:
  out = []
  for cf in (float(c) for c in capacity_factors.split(",")):
    for impl in impls.split(",") if cf == 0 else impls.split(",")[:1]:
      out.append(dataclasses.replace(model, gmm_impl=impl, capacity_factor=cf))
  return out


def layer_grad_fn(model: ModelConfig, params, bias, mask_BS):
  """jit(value_and_grad) of mean(y^2) + balance loss of the MoE layer; also returns the dropped count."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoE(model, rngs=nnx.Rngs(0))))

  def loss(params, x_BSD):
    y_BSD, stats = nnx.merge(graphdef, params, bias)(x_BSD, mask_BS)
    return jnp.mean(jnp.square(y_BSD.astype(jnp.float32))) + stats["aux_loss"], stats["dropped"]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def time_path(model: ModelConfig, inputs, mesh, args) -> dict:
  """One row: the layer lowered with `mesh` set (or none), checked for the shard_map, compiled and timed."""
  params, bias, x_BSD, mask_BS = inputs
  fn = layer_grad_fn(model, params, bias, mask_BS)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    traced = fn.trace(params, x_BSD)
    lowered = traced.lower()
  # In the traced program, not the StableHLO: on a one-device mesh JAX inlines the shard_map's body.
  shard_map = "shard_map" in str(traced.jaxpr)
  if shard_map != (mesh is not None):
    raise AssertionError(f"{'mesh' if mesh else 'local'} path, gmm_impl={model.gmm_impl}, capacity_factor="
                         f"{model.capacity_factor}: shard_map {'found' if shard_map else 'missing'} in the module")
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  sec = common.seconds_per_call(compiled, (params, x_BSD), args.warmup, args.iters)
  (loss, dropped), _ = compiled(params, x_BSD)
  n_tokens = x_BSD.shape[0] * x_BSD.shape[1]
  return {"path": "mesh" if mesh else "local", "gmm_impl": model.gmm_impl if model.capacity_factor == 0 else "-",
          "capacity_factor": model.capacity_factor, "ms": sec * 1e3, "compile_s": compile_s,
          "tflops": flops.moe_layer_flops(model, n_tokens) / sec / 1e12, "shard_map": shard_map,
          "loss": float(loss), "dropped_frac": int(dropped) / (n_tokens * model.n_activated_experts)}


def layer_inputs(model: ModelConfig, batch: int, seq_len: int):
  _, params, bias = nnx.split(MoE(model, rngs=nnx.Rngs(0)), nnx.Param, RouterBias)
  x_BSD = jax.random.normal(jax.random.key(1), (batch, seq_len, model.dim), jnp.float32).astype(model.dtype)
  return params, bias, x_BSD, jnp.ones((batch, seq_len), jnp.int32)


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = common.bench_config(args)
  run = Run(cfg, jax.devices()[:1])          # the run's mesh, on one device: 1x1x1x1
  B, S = cfg.train.batch_size, cfg.data.seq_len
  inputs = layer_inputs(cfg.model, B, S)
  rows = []
  for model in variants(run.cfg.model, args.impls, args.capacity_factors):
    for mesh in (None, run.mesh):
      rows.append(time_path(model, inputs, mesh, args))
      print(common.table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
  for local, ep in zip(rows[::2], rows[1::2]):
    ep["mesh_over_local"] = ep["ms"] / local["ms"]
  results = {"config": common.config_path(args), "overrides": args.set, "smoke": args.smoke, "tokens": B * S,
             "mesh": common.mesh_name(run.mesh), "dtype": cfg.model.dtype, **common.device_info(), "rows": rows}
  print(f"\nMoE layer fwd+bwd, {B}x{S} tokens, D={cfg.model.dim} F={cfg.model.moe_inter_dim} "
        f"E={cfg.model.n_routed_experts} k={cfg.model.n_activated_experts}, {cfg.model.dtype}, "
        f"{results['device']}; mesh = jax.set_mesh(Run(cfg).mesh) {results['mesh']}")
  print(common.table(rows, COLUMNS))
  common.write_json(args.out, results)
  return results


COLUMNS = [("path", "path", "s"), ("gmm_impl", "gmm", "s"), ("capacity_factor", "cf", "g"), ("ms", "ms", ".2f"),
           ("tflops", "TFLOP/s", ".3g"), ("mesh_over_local", "mesh/local", ".3f"), ("dropped_frac", "dropped", ".2%"),
           ("loss", "loss", ".6g"), ("compile_s", "compile s", ".1f"), ("shard_map", "shard_map", "s")]


if __name__ == "__main__":
  main()
