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

cfg = load_config("configs/bench.yaml").model
T, D, F, E, k = 16384, cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts, cfg.n_activated_experts
ks = jax.random.split(jax.random.key(0), 6)
x = jax.random.normal(ks[0], (T, D), jnp.bfloat16)
gate = jax.random.normal(ks[1], (D, E)) * 0.02
r = moe.route(x, gate, jnp.zeros(E), cfg)
w1, w3 = (0.02 * jax.random.normal(kk, (E, D, F)) for kk in ks[2:4])
w2 = 0.02 * jax.random.normal(ks[4], (E, F, D))

def loss(x, w, w1, w3, w2, c):
  y, _ = moe.routed_experts(x, r.idx_Tk, w, w1, w3, w2, c)
  return jnp.sum(y.astype(jnp.float32) ** 2)
g = lambda c: jax.jit(jax.grad(functools.partial(loss, c=c), argnums=(0, 1, 2, 3, 4)))
mesh = make_mesh(MeshConfig(data=1))
for impl in sys.argv[1].split(","):
  c = dataclasses.replace(cfg, gmm_impl=impl)
  try:
    t_local = timeit(g(c), x, r.w_Tk, w1, w3, w2)
    with jax.set_mesh(mesh):
      t_mesh = timeit(g(c), x, r.w_Tk, w1, w3, w2)
    print(f"moe layer fwd+bwd impl={impl}: no mesh {t_local:.2f} ms, 1x1x1x1 mesh {t_mesh:.2f} ms", flush=True)
  except Exception as e:
    print(f"impl={impl} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)

# Whole train step through Run (as train.py runs it), random packed batch.
c = load_config("configs/bench.yaml", sys.argv[2:])
run = Run(c)
with jax.set_mesh(run.mesh):
  comp = run.lower_train_step().compile()
ma = comp.memory_analysis()
print(f"with mesh: temp {ma.temp_size_in_bytes/2**30:.2f} GiB args {ma.argument_size_in_bytes/2**30:.2f} GiB", flush=True)
comp2 = run._train_step.lower(run.abstract_state(), run.abstract_batch()).compile()
ma2 = comp2.memory_analysis()
print(f"no mesh: temp {ma2.temp_size_in_bytes/2**30:.2f} GiB args {ma2.argument_size_in_bytes/2**30:.2f} GiB", flush=True)
state = run.init_state()
B, S = c.train.batch_size, c.data.seq_len
rng = np.random.default_rng(0)
tok = rng.integers(0, c.model.vocab_size, (B, S + 1)).astype(np.int32)
local = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((B, S), np.int32),
         "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)), "loss_mask": np.ones((B, S), np.int32)}
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
print(f"Run.train_step bench config: {dt*1e3:.1f} ms/step, {B*S/dt:.0f} tokens/s, loss {float(m['loss']):.3f}, "
      f"load_max {np.asarray(m['load_max']).round(2).tolist()}")
print(jax.devices(), jax.__version__)
