"""Memory plan: per-device bytes of one training step on a mesh, computed without allocating anything.

  python -m deepseek_jax.plan --config configs/deepseek-v3-671b.yaml --mesh 1,8,32,1 [--hbm-gb 80]
      [--micro-batch 1] [--set model.remat=full ...] [--no-compile] [--json]

Three estimates, all per device (GB = 1e9 bytes):
  state     parameters, gradients, optimizer moments and the grad-accumulation buffer: exact, from the shardings
            run.Run builds, on an AbstractMesh (Run(cfg, n_devices): no devices needed; NamedSharding.shard_shape).
  analytic  activations from the shapes: what JAX saves for the backward (residuals; the formulas reproduce
            jax's saved_residuals, see tests/test_plan.py), one block's working set while it is recomputed
            and differentiated, and the expert-parallel dispatch buffers [P, cap, D].
  compiled  XLA's temp memory for the real train step (Run.lower_train_step) of reduced-depth copies of the
            model (the dense prefix + 1 MoE layer, and + 1 more), compiled on as many simulated CPU devices as
            the mesh has, extrapolated linearly to the full depth. An upper bound: XLA:CPU computes bf16 in
            float32, and its scheduler does not keep what remat saves.
The verdict ("fits in N GB") uses the analytic peak; the compiled figure is printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.config import Config, ConfigError, MeshConfig, load_config
from deepseek_jax.run import Run
from sharding.rules import MESH_AXES, axis_size, logical_to_spec

GB = 1e9
F32 = 4
FAST_COMPILE = {"xla_backend_optimization_level": 0}   # LLVM codegen only; buffer assignment is unchanged
CPU_CAVEAT = ("XLA:CPU computes bf16 as f32, its scheduler does not keep remat's savings, and it expands "
              "lax.ragged_dot (dropless experts) into one masked dense matmul per local expert, f32[E/P, rows, D]: "
              "the compiled temp is an upper bound")


# Inputs ----------------------------------------------------------------------------------------------------

def parse_mesh(text: str) -> MeshConfig:
  """'1,8,32,1' -> MeshConfig(data=1, fsdp=8, expert=32, tensor=1)."""
  parts = text.split(",")
  if len(parts) != len(MESH_AXES) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--mesh {text!r}: expected {len(MESH_AXES)} positive integers {','.join(MESH_AXES)}, "
                     f"e.g. 1,8,32,1")
  return MeshConfig(**{a: int(p) for a, p in zip(MESH_AXES, parts)})


def plan_config(cfg: Config, mesh: MeshConfig | None = None, micro_batch: int | None = None) -> Config:
  """The config to plan: `mesh` replaces cfg.mesh; `micro_batch` (sequences per batch shard and micro-batch)
  keeps the global batch and sets grad_accum = batch_size / (micro_batch * batch shards)."""
  mesh = mesh or cfg.mesh
  if any(getattr(mesh, a) < 1 for a in MESH_AXES):
    raise ValueError(f"mesh {mesh}: give every axis size (--mesh data,fsdp,expert,tensor); -1 needs real devices")
  cfg = dataclasses.replace(cfg, mesh=mesh)
  if micro_batch is not None:
    if micro_batch < 1:
      raise ValueError(f"--micro-batch {micro_batch}: must be >= 1")
    per_micro = micro_batch * _batch_shards(mesh)
    if cfg.train.batch_size % per_micro:
      raise ValueError(f"--micro-batch {micro_batch} x {_batch_shards(mesh)} batch shards = {per_micro} sequences "
                       f"does not divide train.batch_size={cfg.train.batch_size}")
    train = dataclasses.replace(cfg.train, grad_accum=cfg.train.batch_size // per_micro)
    cfg = dataclasses.replace(cfg, train=train)
  if cfg.model.gmm_impl == "mgpu":   # the Hopper kernel cannot be resolved on CPU; same buffers as "xla"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gmm_impl="xla"))
  return cfg


def n_devices(mesh: MeshConfig) -> int:
  return math.prod(getattr(mesh, a) for a in MESH_AXES)


class _Sizes:
  """Mesh axis sizes as an object `rules.axis_size` accepts (axis_names / axis_sizes)."""

  def __init__(self, mesh: MeshConfig):
    self.axis_names = MESH_AXES
    self.axis_sizes = tuple(getattr(mesh, a) for a in MESH_AXES)


def _split(mesh: MeshConfig, logical: str) -> int:
  """How many ways the rules split a logical axis on this mesh."""
  return axis_size(_Sizes(mesh), logical_to_spec((logical,))[0])


def _batch_shards(mesh: MeshConfig) -> int:
  return _split(mesh, "batch")


# State: exact, from Run's shardings on an AbstractMesh -----------------------------------------------------

def _shard_bytes(x) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def state_bytes(run) -> dict[str, Any]:
  """Per-device bytes of the train state as `run` shards it (parameters incl. router biases, optimizer state),
  the gradients (float32, sharded like the parameters) and the grad-accumulation buffer (one more float32
  copy of the gradients, carried by the micro-batch scan when grad_accum > 1)."""
  st = run.abstract_state()
  params = sum(_shard_bytes(x) for x in jax.tree.leaves(st.params))
  grads = sum(math.prod(x.sharding.shard_shape(x.shape)) * F32 for x in jax.tree.leaves(st.params))
  leaves = jax.tree_util.tree_flatten_with_path(st.params)[0]
  largest = sorted(((jax.tree_util.keystr(p), _shard_bytes(x)) for p, x in leaves), key=lambda kv: -kv[1])[:5]
  return {"params": params + sum(_shard_bytes(x) for x in jax.tree.leaves(st.bias)),
          "grads": grads,
          "optimizer": sum(_shard_bytes(x) for x in jax.tree.leaves(st.opt_state)),
          "accum": grads if run.cfg.train.grad_accum > 1 else 0,
          "n_params": sum(x.size for x in jax.tree.leaves(st.params)),
          "largest_params": largest}


# Analytic activations ---------------------------------------------------------------------------------------

class Dims(NamedTuple):
  """Per-device sizes of one micro-batch's activations."""
  b: int          # sequences per device (replicated over the tensor axis)
  S: int
  tok: int        # b * S
  dt: int         # bytes of the compute dtype
  heads: int      # attention heads per device
  mlp: int        # split of dense/shared hidden widths and of the expert F
  vocab: int      # split of the logits' vocab
  embed: int      # split of the weights' model width (gathered before use)
  experts: int    # P: size of the expert axis


def dims(cfg: Config) -> Dims:
  mesh, m = cfg.mesh, cfg.model
  b = cfg.train.batch_size // cfg.train.grad_accum // _batch_shards(mesh)
  return Dims(b, cfg.data.seq_len, b * cfg.data.seq_len, jnp.dtype(m.dtype).itemsize,
              m.n_heads // _split(mesh, "act_heads"), _split(mesh, "act_mlp"), _split(mesh, "act_vocab"),
              _split(mesh, "embed"), _split(mesh, "act_expert"))


def ep_buffers(cfg: Config) -> dict[str, Any]:
  """The routed experts' rows on one device (sharding/expert_parallel.py): the path, the rows R the expert FFN
  runs on, and the all_to_all buffers [P, cap, D]: two live at once (an all_to_all's send and receive; the
  dispatch, the combine and their transposes in the backward run one after another, and the rows the experts
  keep for their backward are counted in the block, see `block_saved`). Dropless: cap = T * min(k, E/P);
  capacity: cap = E/P * ceil(cf * T * k / E); dropless with P = 1 runs on the T*k local rows, no buffer."""
  m, d = cfg.model, dims(cfg)
  T, k, E, P = d.tok, m.n_activated_experts, m.n_routed_experts, d.experts
  out = {"P": P, "cap": 0, "D": m.dim, "dtype": m.dtype, "rows": T * k, "buffer_bytes": 0, "n_buffers": 0,
         "payload_bytes": T * k * m.dim * d.dt}
  if not m.n_moe_layers and not (m.n_mtp_layers and E):
    path = "none"
  elif m.moe_impl == "dense":
    path, out["rows"] = "dense", T * E
  elif m.capacity_factor > 0:
    path, out["cap"] = "capacity", E // P * max(1, math.ceil(m.capacity_factor * T * k / E))
  elif P == 1:
    path = "dropless-local"
  else:
    path, out["cap"] = "dropless", T * min(k, E // P)
  if out["cap"]:
    out.update(rows=P * out["cap"], buffer_bytes=P * out["cap"] * m.dim * d.dt, n_buffers=2)
  return {**out, "path": path, "bytes": out["n_buffers"] * out["buffer_bytes"]}


def _norm(tok: int, n: int, dt: int) -> int:
  """RMSNorm's residuals: the float32 upcast, the normalized cast and the scaled output."""
  return tok * n * (F32 + 2 * dt)


def block_saved(cfg: Config, moe: bool) -> tuple[int, int, dict[str, int]]:
  """What one block saves for its backward without remat, per device: (bytes, largest tensor, by part).
  Weights are counted gathered (full model width, split over tensor) in the compute dtype."""
  m, d = cfg.model, dims(cfg)
  tok, dt, Hh = d.tok, d.dt, d.heads
  parts, largest = {}, 0
  # attention
  if m.attn_type == "mla":
    qk, O = m.qk_head_dim, m.v_head_dim
    norms = 2 * _norm(tok, m.dim, dt) + _norm(tok, m.kv_lora_rank, dt)
    w = (m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * Hh * (m.qk_nope_head_dim + O)
         + Hh * O * m.dim)                                  # wkv_a, wkv_b, wo
    if m.q_lora_rank:
      norms += _norm(tok, m.q_lora_rank, dt)
      w += m.dim * m.q_lora_rank + m.q_lora_rank * Hh * qk
    else:
      w += m.dim * Hh * qk
  else:
    qk = O = m.qk_rope_head_dim
    norms, w = 2 * _norm(tok, m.dim, dt), 4 * m.dim * Hh * qk
  parts["norms"] = norms
  parts["qkv"] = tok * Hh * (2 * qk + 2 * O) * dt          # q, k (after RoPE), v, attention output
  if m.attn_impl == "xla":   # masked logits and their exp (f32), probabilities (bf16), the mask (bool)
    parts["scores"] = d.b * Hh * d.S * d.S * (2 * F32 + dt + 1)
    largest = d.b * Hh * d.S * d.S * F32
  else:                      # flash kernels keep per-row statistics only
    parts["scores"] = 2 * d.b * Hh * d.S * F32
  parts["attn_weights"] = w * dt
  # feed-forward
  if moe:
    ep = ep_buffers(cfg)
    R, F = ep["rows"], m.moe_inter_dim // d.mlp
    Fs = m.n_shared_experts * m.moe_inter_dim // d.mlp
    parts["expert_rows"] = R * m.dim * dt + 6 * R * F * dt   # sorted rows; gate, up, silu, product (SwiGLU)
    parts["combine"] = (tok * m.n_activated_experts * m.dim * F32          # the f32 weighted sum over k
                        + tok * m.dim * F32 + 2 * tok * m.n_routed_experts * F32)   # router input, scores
    parts["shared"] = 6 * tok * Fs * dt
    parts["ffn_weights"] = 3 * m.dim * (m.n_routed_experts // d.experts * F + Fs) * dt
    largest = max(largest, R * m.dim * dt, tok * m.n_activated_experts * m.dim * F32)
  else:
    I = m.inter_dim // d.mlp
    parts["mlp"] = 6 * tok * I * dt
    parts["ffn_weights"] = 3 * m.dim * I * dt
    largest = max(largest, tok * I * dt, m.dim * I * dt)
  return sum(parts.values()), largest, parts


def activations(cfg: Config, grads: int) -> dict[str, Any]:
  """Analytic activation bytes per device and the phase-peak model (see `plan`)."""
  m, d = cfg.model, dims(cfg)
  tok, dt, mtp, D = d.tok, d.dt, m.n_mtp_layers, m.dim
  V = m.vocab_size // d.vocab
  outside = {
      "exp_logits": (1 + mtp) * tok * V * F32,      # kept for the cross-entropy backward, per output head
      "final_norms": (1 + 3 * mtp) * tok * D * (F32 + dt) + (1 + mtp) * tok * D * dt + mtp * tok * 2 * D * dt,
      "head_weight_casts": (1 + mtp) * D * V * dt // d.embed + mtp * 2 * D * D * dt // d.embed,
  }
  n_moe = m.n_moe_layers + (mtp if m.n_routed_experts else 0)
  n_dense = m.n_layers + mtp - n_moe
  moe_b, moe_big, moe_parts = block_saved(cfg, True) if n_moe else (0, 0, {})
  dense_b, dense_big, dense_parts = block_saved(cfg, False) if n_dense else (0, 0, {})
  if m.remat == "full":
    blocks = (m.n_layers + mtp) * tok * D * dt     # each block's input; the rest is recomputed
    block_transient = max(moe_b + moe_big, dense_b + dense_big)
  else:   # none; save_dots counted as none (an upper bound)
    blocks = n_moe * moe_b + n_dense * dense_b
    block_transient = max(moe_big, dense_big)
  residuals = sum(outside.values()) + blocks
  head_transient = tok * V * F32 + D * V * dt        # d(logits) in f32 and the gathered bf16 head
  embed_transient = V * D * (dt + F32)               # the gathered table's gradient, bf16 then f32
  ep = ep_buffers(cfg)["bytes"] if n_moe else 0
  # FSDP traffic: every block's weights gathered (bf16) for the forward and again for the recompute/backward,
  # its gradients reduce-scattered: ~3x the gathered bytes per micro-batch, grad_accum micro-batches per step.
  gathered = sum(n * (parts["attn_weights"] + parts["ffn_weights"])
                 for n, parts in ((n_moe, moe_parts), (n_dense, dense_parts)) if n)
  phases = {"loss": residuals + head_transient,
            "blocks": max(residuals, grads) + block_transient + ep,
            "embedding": grads + embed_transient}
  return {"residuals": residuals, "residual_parts": {**outside, "blocks": blocks},
          "block_transient": block_transient, "head_transient": head_transient,
          "embed_transient": embed_transient, "moe_block": moe_parts, "dense_block": dense_parts,
          "phases": phases, "fsdp_bytes_per_step": 3 * gathered * cfg.train.grad_accum}


# Compiled: reduced depth on simulated CPU devices, extrapolated ------------------------------------------

def compile_depths(cfg: Config) -> tuple[int, ...]:
  """Depths to compile: the dense prefix + one MoE period, and + two (or the full depth if smaller)."""
  m = cfg.model
  d1 = min(m.n_dense_layers + 1, m.n_layers)
  d2 = d1 + max(m.moe_layer_freq, 1)
  return (m.n_layers,) if d2 > m.n_layers else (d1, d2)


def compiled_temp(cfg: Config, devices, depths: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Compiles Run's train step at each depth (default `compile_depths`) and extrapolates temp bytes linearly
  from the first two to cfg.model.n_layers."""
  m = cfg.model
  attn = "xla"   # cudnn / splash kernels do not compile for CPU; xla materializes the S x S scores
  temps, args, seconds = [], [], []
  depths = depths or compile_depths(cfg)
  for depth in depths:
    model = dataclasses.replace(m, n_layers=depth, n_dense_layers=min(m.n_dense_layers, depth), attn_impl=attn)
    t0 = time.perf_counter()
    compiled = Run(dataclasses.replace(cfg, model=model), devices).lower_train_step().compile(FAST_COMPILE)
    seconds.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    temps.append(mem.temp_size_in_bytes)
    args.append(mem.argument_size_in_bytes)
  if len(depths) == 1:
    per_layer, full = 0, temps[0]
  else:
    per_layer = (temps[1] - temps[0]) / (depths[1] - depths[0])
    full = temps[0] + per_layer * (m.n_layers - depths[0])
  return {"depths": list(depths), "temp_bytes": temps, "arg_bytes": args, "compile_s": seconds,
          "temp_per_layer": per_layer, "temp_full": int(full), "attn_impl": attn, "caveat": CPU_CAVEAT}


def _cpu_devices(n: int):
  """n simulated CPU devices (python -m deepseek_jax.plan creates them before JAX starts)."""
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(f"compiling for {n} devices needs {n} CPU devices, this process has {len(devices)}: run "
                     f"`python -m deepseek_jax.plan` in a fresh process, or pass --no-compile")
  return devices[:n]


# The plan ---------------------------------------------------------------------------------------------------

def plan(cfg: Config, hbm_gb: float = 80.0, compile: bool = True) -> dict[str, Any]:
  """Per-device memory plan of `cfg` (a plan_config result) on cfg.mesh.

  total = params + optimizer + accum + the largest of three phases of the step:
    loss       all residuals + d(logits) and the gathered head
    blocks     max(residuals, gradients) + one block recomputed and differentiated + its EP buffers
    embedding  all gradients + the embedding table's gathered gradient
  (the residuals shrink as the gradients grow during the backward). `sum` adds every row instead.
  """
  n = n_devices(cfg.mesh)
  run = Run(cfg, n)                       # AbstractMesh: shardings and abstract state only
  st = state_bytes(run)
  cfg = run.cfg
  act = activations(cfg, st["grads"])
  ep = ep_buffers(cfg)
  base = st["params"] + st["optimizer"] + st["accum"]
  peak = base + max(act["phases"].values())
  rows = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"], "accum": st["accum"],
          "activations": act["residuals"] + act["block_transient"], "ep_buffers": ep["bytes"]}
  out = {
      "mesh": {a: getattr(cfg.mesh, a) for a in MESH_AXES}, "devices": n,
      "seq_len": cfg.data.seq_len, "seqs_per_device": dims(cfg).b, "batch_shards": _batch_shards(cfg.mesh),
      "grad_accum": cfg.train.grad_accum, "batch_size": cfg.train.batch_size, "remat": cfg.model.remat,
      "mu_dtype": cfg.optim.mu_dtype, "attn_impl": cfg.model.attn_impl, "moe_path": ep["path"],
      "n_params": st["n_params"], "largest_params": st["largest_params"],
      "bytes": rows, "total": peak, "total_sum": sum(rows.values()),
      "activations": act, "ep": ep, "hbm_gb": hbm_gb,
      "fits": peak <= hbm_gb * GB, "margin_gb": hbm_gb - peak / GB, "compiled": None,
  }
  if compile:
    c = compiled_temp(cfg, _cpu_devices(n))
    c["total"] = st["params"] + st["optimizer"] + c["temp_full"]
    c["fits"] = c["total"] <= hbm_gb * GB
    out["compiled"] = c
  return out


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gb(x) -> str:
  return f"{x / GB:9.2f}"


def format_plan(p: dict[str, Any]) -> str:
  mesh = " x ".join(f"{a}={s}" for a, s in p["mesh"].items())
  b, ep, act = p["bytes"], p["ep"], p["activations"]
  lines = [
      f"mesh {mesh} ({p['devices']} devices); {_count(p['n_params'])} params",
      f"seq {p['seq_len']}, {p['seqs_per_device']} seq/device x {p['batch_shards']} batch shards x grad_accum "
      f"{p['grad_accum']} = batch {p['batch_size']}; remat {p['remat']}; mu {p['mu_dtype']}; "
      f"attn {p['attn_impl']}; MoE {p['moe_path']}",
      "",
      "| per device          |        GB | how |",
      "|---|---:|---|",
      f"| parameters          | {_gb(b['params'])} | float32, Run's shardings |",
      f"| gradients           | {_gb(b['grads'])} | float32, sharded like the parameters |",
      f"| optimizer           | {_gb(b['optimizer'])} | AdamW mu {p['mu_dtype']}, nu float32 |",
      f"| grad-accum buffer   | {_gb(b['accum'])} | float32 copy of the gradients (grad_accum > 1) |",
      f"| activations         | {_gb(b['activations'])} | residuals {act['residuals'] / GB:.2f} + one block "
      f"{act['block_transient'] / GB:.2f} (analytic) |",
      f"| EP buffers          | {_gb(b['ep_buffers'])} | {_ep_text(ep, p)} |",
      f"| **total (peak)**    | {_gb(p['total'])} | params + optimizer + accum + max phase "
      f"({', '.join(f'{k} {v / GB:.1f}' for k, v in act['phases'].items())}) |",
      f"| total (sum of rows) | {_gb(p['total_sum'])} | upper bound |",
  ]
  c = p["compiled"]
  if c:
    temps = ", ".join(f"{d} layers {t / GB:.1f}" for d, t in zip(c["depths"], c["temp_bytes"]))
    lines.append(f"| compiled (CPU)      | {_gb(c['total'])} | params + optimizer + temp {c['temp_full'] / GB:.1f} "
                 f"extrapolated from {temps} GB ({c['temp_per_layer'] / GB:.2f}/layer; attn {c['attn_impl']}; "
                 f"compile {sum(c['compile_s']):.0f} s) |")
  lines += ["", f"fits in {p['hbm_gb']:g} GB HBM: {'yes' if p['fits'] else 'no'} "
            f"({'margin' if p['fits'] else 'over by'} {abs(p['margin_gb']):.2f} GB)"]
  if c:
    lines.append(f"compiled on CPU: {c['total'] / GB:.1f} GB ({'fits' if c['fits'] else 'does not fit'}); "
                 f"{c['caveat']}")
  for kind in ("moe_block", "dense_block"):
    if act[kind]:
      parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in act[kind].items())
      lines.append(f"one {kind.replace('_', ' ')} saves (GB, without remat): {parts}")
  parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in act["residual_parts"].items())
  lines.append(f"residuals (GB): {parts}")
  lines.append(f"FSDP traffic: ~{act['fsdp_bytes_per_step'] / 1e12:.1f} TB per device per optimizer step "
               f"(block weights gathered twice and gradients reduce-scattered, x grad_accum {p['grad_accum']})")
  top = ", ".join(f"{k} {v / GB:.3f}" for k, v in p["largest_params"][:3])
  lines.append(f"largest parameter shards (GB): {top}")
  return "\n".join(lines)


def _ep_text(ep: dict, p: dict) -> str:
  if not ep["n_buffers"]:
    return f"no dispatch buffers ({ep['path']})"
  return (f"{ep['n_buffers']} x [{ep['P']}, {ep['cap']}, {ep['D']}] {ep['dtype']} ({ep['path']}) = "
          f"{ep['buffer_bytes'] / GB:.2f} GB each; "
          f"payload {ep['payload_bytes'] / GB:.2f} GB ({ep['buffer_bytes'] / max(ep['payload_bytes'], 1):.0f}x)")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m deepseek_jax.plan", description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--mesh", help="data,fsdp,expert,tensor sizes, e.g. 1,8,32,1 (default: the config's mesh)")
  ap.add_argument("--hbm-gb", type=float, default=80.0, help="device memory in GB (1e9 bytes)")
  ap.add_argument("--micro-batch", type=int, help="sequences per batch shard per micro-batch; keeps "
                  "train.batch_size and sets grad_accum (default: the config's grad_accum)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  ap.add_argument("--no-compile", action="store_true", help="skip the CPU compile (state and analytic only)")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  try:
    cfg = plan_config(load_config(args.config, args.set), parse_mesh(args.mesh) if args.mesh else None,
                      args.micro_batch)
    _start_cpu_backend(n_devices(cfg.mesh) if not args.no_compile else 1)
    result = plan(cfg, args.hbm_gb, compile=not args.no_compile)
  except (ConfigError, ValueError) as e:
    print(f"plan: error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1) if args.json else format_plan(result))
  return 0


def _start_cpu_backend(n: int) -> None:
  """Plans compile on simulated CPU devices; set before JAX starts (a no-op once it has, e.g. under pytest)."""
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass


if __name__ == "__main__":
  sys.exit(main())
