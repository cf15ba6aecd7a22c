"""One of several processes launched by test_loading.py to measure the peak memory of loading.

usage: python loading_worker.py PORT PROCESS_ID N_PROCESSES HF_DIR MODE OUT.json   (MODE: stream | naive)
The global 8-device mesh is data=2 x expert=4 with the expert axis across the processes, so that a process's
devices hold only part of the experts. `stream` loads with hf_load.load_hf_params; `naive` is the old path
(the whole float32 model in host memory, then placed). Writes the peak RSS growth, the bytes of this
process's device buffers and share, the bytes read from the checkpoint and, for `stream`, whether every
local shard equals the slice of the full load.
"""

import gc
import json
import pathlib
import sys

import numpy as np


def _status_bytes(key: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak_rss() -> None:
  """VmHWM := VmRSS (Linux >= 4.0). ru_maxrss cannot be used: it keeps the peak of the forked parent (pytest)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  assert _status_bytes("VmHWM") <= _status_bytes("VmRSS") + (4 << 20)


def _held_bytes(arrays) -> int:
  """Bytes in this process's device buffers. CPU devices live in host memory, one buffer per device except
  where JAX aliased a (64-byte aligned) host array: distinct buffer addresses count once."""
  buffers = {sh.data.unsafe_buffer_pointer(): sh.data.nbytes for a in arrays for sh in a.addressable_shards}
  return sum(buffers.values())


def _share_bytes(arrays) -> int:
  """Bytes of the distinct parts of the model on this process's devices (its share, replicas once)."""
  boxes = {(id(a), tuple((i.start, i.stop) for i in sh.index)): sh.data.nbytes
           for a in arrays for sh in a.addressable_shards}
  return sum(boxes.values())


def main(port: int, process_id: int, n_procs: int, ckpt: str, mode: str, out: str) -> None:
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8 // n_procs)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n_procs,
                             process_id=process_id, initialization_timeout=60)
  from flax import nnx

  from deepseek_jax import convert, hf_load, model
  from deepseek_jax.config import MeshConfig, ModelConfig
  from sharding import rules
  from sharding.mesh import make_mesh

  hf = json.loads((pathlib.Path(ckpt) / "config.json").read_text())
  cfg = convert.config_from_hf(hf, ModelConfig(dtype="float32"))
  # Mesh position (d, e) -> device: expert column e lives on process e // (4 // n_procs).
  by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  local, per = 8 // n_procs, 4 // n_procs
  grid = [by_process[(e // per) * local + d * per + e % per] for d in range(2) for e in range(4)]
  mesh = make_mesh(MeshConfig(data=2, expert=4), grid)
  _, abstract_params, abstract_bias = model.abstract_model(cfg)
  param_sh = nnx.to_pure_dict(rules.param_shardings(abstract_params, mesh))
  bias_sh = nnx.to_pure_dict(rules.param_shardings(abstract_bias, mesh))
  read = []
  real_readinto = hf_load._readinto

  def counting_readinto(f, offset, out, what):
    read.append(out.nbytes)
    real_readinto(f, offset, out, what)
  hf_load._readinto = counting_readinto
  gc.collect()
  _reset_peak_rss()
  before = _status_bytes("VmRSS")
  if mode == "stream":
    params, bias = hf_load.load_hf_params(ckpt, cfg, param_sh, bias_sh)
    leaves = {**convert.flatten(params), **convert.flatten(bias)}
  else:
    _, full = convert.load_hf_checkpoint(ckpt, base=cfg)
    full = model.stack_layers(cfg, full)
    shardings = {**convert.flatten(param_sh), **convert.flatten(bias_sh)}
    leaves = {p: jax.make_array_from_callback(x.shape, shardings[p], lambda i, x=x: x[i])
              for p, x in convert.flatten(full).items()}
    del full
  growth = _status_bytes("VmHWM") - before
  result = dict(growth=growth, held=_held_bytes(leaves.values()), share=_share_bytes(leaves.values()),
                model=sum(4 * int(np.prod(a.shape)) for a in leaves.values()), read=sum(read))
  if mode == "stream":
    _, ref = convert.load_hf_checkpoint(ckpt, base=cfg)
    ref = convert.flatten(model.stack_layers(cfg, ref))
    result["equal"] = all(np.array_equal(np.asarray(sh.data), ref[p][sh.index])
                          for p, a in leaves.items() for sh in a.addressable_shards)
  pathlib.Path(out).write_text(json.dumps(result))
  jax.distributed.shutdown()


if __name__ == "__main__":
  port, pid, n, ckpt, mode, out = sys.argv[1:]
  main(int(port), int(pid), int(n), ckpt, mode, out)
