"""Temporary GPU probe (not committed): Pallas gmm inside the expert-parallel shard_map; Run step speed."""
import functools, time, sys
import jax, jax.numpy as jnp, numpy as np
from deepseek_jax.config import load_config, MeshConfig
from deepseek_jax import moe, experts
from deepseek_jax.run import Run
from sharding.mesh import make_mesh
import dataclasses

def timeit(f, *a, n=10):
  out = f(*a); jax.block_until_ready(out)
  out = f(*a); jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(n):
    out = f(*a)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n * 1e3

# Whole train step through Run (as train.py runs it), random packed batch.
c = load_config("configs/bench.yaml", sys.argv[2:])
run = Run(c)
state = run.init_state()
B, S = c.train.batch_size, c.data.seq_len
rng = np.random.default_rng(0)
tok = rng.integers(0, c.model.vocab_size, (B, S + 1)).astype(np.int32)
seg = np.repeat(np.arange(1, 5, dtype=np.int32), S // 4)[None].repeat(B, 0)   # 4 packed documents per row
pos = np.tile(np.arange(S // 4, dtype=np.int32), 4)[None].repeat(B, 0)
local = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg, "positions": pos,
         "loss_mask": np.ones((B, S), np.int32)}
batch = run.device_batch(local)
for i in range(3):
  state, m = run.train_step(state, batch)
jax.block_until_ready(m)
n = 10
t = time.perf_counter()
for i in range(n):
  state, m = run.train_step(state, batch)
jax.block_until_ready(m)
dt = (time.perf_counter() - t) / n
print(f"Run.train_step bench config {sys.argv[2:]}: {dt*1e3:.1f} ms/step, {B*S/dt:.0f} tokens/s, loss {float(m['loss']):.3f}, "
      f"load_max {np.asarray(m['load_max']).round(2).tolist()}")
print(jax.devices(), jax.__version__)
