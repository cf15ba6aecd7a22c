"""One of the 2 processes (4 CPU devices each) launched by test_multiprocess.py.

usage: python multiprocess_worker.py PORT PROCESS_ID OUT.npz
Builds the global 8-device mesh data=2 x expert=4 with the devices interleaved across the processes, so that
both the data and the expert collectives cross the process boundary; runs the tiny model's forward and
backward; process 0 writes the results (gathered to every process) to OUT.npz.
"""

import os
import sys

B, S = 8, 32
FAST_COMPILE = {"xla_backend_optimization_level": 0}   # compile time dominates on 2 cores


def reference_inputs(cfg):
  """Same tokens in every process: a host numpy array, [B, S + 2]."""
  import numpy as np
  return np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S + 2)).astype(np.int32)


def loss_and_grads(graphdef, params, bias, tokens_BS):
  """Next-token + MTP cross-entropy + balance loss -> flat dict of named float32 results."""
  import jax
  import jax.numpy as jnp
  from deepseek_jax import model as M

  def loss_fn(params):
    logits_BSV, aux = M.apply(graphdef, params, bias, tokens_BS[:, :-2])
    def xent(logits, targets):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    loss = xent(logits_BSV, tokens_BS[:, 1:-1]) + 0.3 * xent(aux.mtp_logits[0], tokens_BS[:, 2:])
    return loss + aux.aux_loss, (logits_BSV, aux.mtp_logits[0], aux.dropped)

  (loss, (logits, mtp_logits, dropped)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  out = {"loss": loss, "logits": logits, "mtp_logits": mtp_logits, "dropped": dropped}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    out["grad" + jax.tree_util.keystr(path)] = g
  return out


def main(port: int, process_id: int, out_path: str):
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=60, heartbeat_timeout_seconds=30,
                             shutdown_timeout_seconds=30)
  import functools

  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from deepseek_jax import model as M
  from deepseek_jax.config import MeshConfig, load_config
  from sharding.mesh import make_mesh
  from sharding.rules import mesh_spec, shard_state

  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")).model
  graphdef, params, bias = M.split_model(M.init_model(cfg, seed=0))
  by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  interleaved = [d for pair in zip(by_process[:4], by_process[4:]) for d in pair]   # p0, p1, p0, p1, ...
  mesh = make_mesh(MeshConfig(data=2, expert=4), interleaved)
  tokens = reference_inputs(cfg)
  with jax.set_mesh(mesh):
    params, bias = shard_state(params, mesh), shard_state(bias, mesh)
    sharding = NamedSharding(mesh, mesh_spec(("batch", None), mesh))
    tokens = jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])
    step = jax.jit(functools.partial(loss_and_grads, graphdef), out_shardings=NamedSharding(mesh, P()),
                   compiler_options=FAST_COMPILE)
    out = step(params, bias, tokens)
  out = {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}   # replicated: every process has it
  if process_id == 0:
    np.savez(out_path, **out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
