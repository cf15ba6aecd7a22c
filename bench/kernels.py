"""Kernel choices at the config's shapes: Mosaic-GPU grouped-matmul tiles, and attention implementations.

tiles      the MoE layer (bench/moe_layer.py, local path, forward + backward) for every combination of the
           `--sweep KEY=v1,v2` config overrides, e.g. model.gmm_tiles.block_n=128,192; fastest first.
attention  softmax(QK^T)V forward + backward for each model.attn_impl, on whole causal rows (no segment ids)
           and on packed rows (segment ids, several documents a row), with the relative error of the output
           and of the gradients against "xla". An implementation that cannot run here gets its one-line error.

  PYTHONPATH=. python -m bench.kernels --out $OUT/kernels.json                          # GPU, bench config
  PYTHONPATH=. python -m bench.kernels --only tiles --sweep model.gmm_tiles.block_k=64,128
  PYTHONPATH=. python -m bench.kernels --smoke                                          # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, moe_layer
from deepseek_jax import flops
from deepseek_jax.attention import dot_product_attention
from deepseek_jax.config import Config
from deepseek_jax.run import resolve_config

DEFAULT_SWEEP = ["model.gmm_tiles.grid_block_n=1,2", "model.gmm_tiles.block_n=128,192"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.config_args(p, "kernels.json")
  p.add_argument("--only", choices=("tiles", "attention"), default=None, help="default: both")
  p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                 help=f"config values to combine (repeatable; default {' '.join(DEFAULT_SWEEP)})")
  p.add_argument("--attn-impls", default="xla,cudnn,cudnn_padded",
                 help="model.attn_impl values (smoke: xla,splash_interpret)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args(argv)
  if args.smoke:   # tiles change nothing in the "ref" kernel: the smoke checks the harness only
    args.sweep = args.sweep or ["model.gmm_tiles.block_m=64,128"]
    args.set = ["model.gmm_impl=ref"] + args.set
    args.attn_impls = "xla,splash_interpret" if args.attn_impls == "xla,cudnn,cudnn_padded" else args.attn_impls
    args.warmup, args.iters = 1, 2
  return args


def sweep_overrides(sweeps: list[str]) -> list[list[str]]:
  """["a=1,2", "b=3"] -> [["a=1", "b=3"], ["a=2", "b=3"]]."""
  axes = []
  for item in sweeps:
    key, sep, values = item.partition("=")
    if not sep or not values:
      raise ValueError(f"--sweep {item!r} must look like section.key=v1,v2")
    axes.append([f"{key}={v}" for v in values.split(",")])
  return [list(combo) for combo in itertools.product(*axes)]


def tile_sweep(args) -> list[dict]:
  rows = []
  for combo in sweep_overrides(args.sweep or DEFAULT_SWEEP):
    cfg = resolve_config(common.bench_config(args, combo))
    model = dataclasses.replace(cfg.model, capacity_factor=0.0)
    inputs = moe_layer.layer_inputs(model, cfg.train.batch_size, cfg.data.seq_len)
    row = moe_layer.time_path(model, inputs, None, args)
    rows.append({"overrides": " ".join(combo), **row})
    print(f"  {rows[-1]['overrides']}: {row['ms']:.2f} ms", flush=True)
  return sorted(rows, key=lambda r: r["ms"])


def attention_inputs(cfg: Config, packed: bool):
  m, B, S = cfg.model, cfg.train.batch_size, cfg.data.seq_len
  ks = jax.random.split(jax.random.key(0), 4)
  q, k = (jax.random.normal(kk, (B, S, m.n_heads, m.qk_head_dim), jnp.float32).astype(m.dtype) for kk in ks[:2])
  v, r = (jax.random.normal(kk, (B, S, m.n_heads, m.v_head_dim), jnp.float32).astype(m.dtype) for kk in ks[2:])
  seg = jnp.asarray(common.synthetic_batches(1, B, S, 256, seed=1)[0]["segment_ids"]) if packed else None
  return (q, k, v), seg, r


def attention_grad_fn(cfg: Config, impl: str, seg, r):
  def loss(q, k, v):
    o = dot_product_attention(q, k, v, seg, cfg.model.softmax_scale, impl)
    return jnp.sum(o.astype(jnp.float32) * r.astype(jnp.float32)), o
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_rows(args) -> list[dict]:
  cfg = common.bench_config(args)
  B, S = cfg.train.batch_size, cfg.data.seq_len
  rows = []
  for packed in (False, True):
    qkv, seg, r = attention_inputs(cfg, packed)
    ref = None
    for impl in ["xla"] + [i for i in args.attn_impls.split(",") if i != "xla"]:
      row = {"attn_impl": impl, "rows": "packed" if packed else "causal"}
      try:
        fn = attention_grad_fn(cfg, impl, seg, r)
        (_, out), grads = fn(*qkv)
        sec = common.seconds_per_call(fn, qkv, args.warmup, args.iters)
      except ValueError as e:   # the implementation's own one-line reason it cannot run here
        rows.append({**row, "error": str(e)})
        continue
      ref = (out, grads) if impl == "xla" else ref
      row.update(ms=sec * 1e3, tflops=flops.attention_core_flops(cfg.model, B, S) / sec / 1e12,
                 err_out=rel_err(out, ref[0]), err_grad=max(rel_err(g, g0) for g, g0 in zip(grads, ref[1])))
      rows.append(row)
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = common.bench_config(args)
  results = {"config": common.config_path(args), "overrides": args.set, "smoke": args.smoke, **common.device_info(),
             "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len}
  if args.only in (None, "tiles"):
    results["tiles"] = tile_sweep(args)
    print(f"\nMoE layer fwd+bwd (local, dropless) per tile setting, {results['device']}")
    print(common.table(results["tiles"], [("overrides", "overrides", "s"), ("gmm_impl", "gmm", "s"),
                                          ("ms", "ms", ".2f"), ("tflops", "TFLOP/s", ".3g")]))
  if args.only in (None, "attention"):
    results["attention"] = attention_rows(args)
    print(f"\nattention fwd+bwd, B={cfg.train.batch_size} S={cfg.data.seq_len} H={cfg.model.n_heads}, "
          f"{cfg.model.dtype}, {results['device']} (errors relative to xla)")
    print(common.table(results["attention"], [
        ("attn_impl", "impl", "s"), ("rows", "rows", "s"), ("ms", "ms", ".2f"), ("tflops", "TFLOP/s", ".3g"),
        ("err_out", "err out", ".1e"), ("err_grad", "err grads", ".1e"), ("error", "error", "s")]))
  common.write_json(args.out, results)
  return results


if __name__ == "__main__":
  main()
