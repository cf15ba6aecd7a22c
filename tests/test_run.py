"""The step train.py runs is the expert-parallel, sharded step: checked in its lowered and compiled module.

Run (deepseek_jax/run.py) is the only place that jits a step and traces it under the run's mesh. A step traced
outside the mesh computes the same numbers through the single-device MoE, so these tests look at the module
itself: the all_to_alls of expert parallelism, the shard_map, the sharding constraints, and a per-device
temp-memory bound.
"""

import pathlib

import jax
import pytest

from deepseek_jax.config import load_config
from deepseek_jax.run import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# 2 layers (1 dense, 1 MoE) + 1 MTP block = 2 MoE blocks. vocab 4096 makes the logits the largest activation,
# as they are at DeepSeek scale, so that gathering them (or the global token set) shows in temp memory.
SMALL = ["data.seq_len=64", "train.batch_size=8", "model.n_layers=2", "model.n_mtp_layers=1",
         "model.vocab_size=4096", "mesh.data=1"]
N_MOE_BLOCKS = 2


def _run(*extra, n_devices=8):
  return Run(load_config(ROOT / "configs/tiny.yaml", SMALL + list(extra)), jax.devices()[:n_devices])


def _count(text: str, ops) -> dict:
  return {op: text.count(op) for op in ops}


@pytest.fixture(scope="module")
def ep_step():
  run = _run("mesh.expert=8")
  lowered = run.lower_train_step()
  return run, lowered, lowered.compile(compiler_options=FAST_COMPILE)


def test_lowered_step_runs_expert_parallelism(ep_step):
  _, lowered, compiled = ep_step
  text = lowered.as_text()
  # Per MoE block: forward rows out, expert ids out, rows back; backward: the two row exchanges transposed.
  assert text.count("stablehlo.all_to_all") == 5 * N_MOE_BLOCKS
  assert text.count("sdy.manual_computation") + text.count("shard_map") >= N_MOE_BLOCKS
  assert text.count("sharding_constraint") >= 10
  assert compiled.as_text().count("all-to-all(") >= 5 * N_MOE_BLOCKS


def test_step_traced_outside_the_mesh_would_not(ep_step):
  """What the tests above guard against: the same jitted step traced without jax.set_mesh."""
  run, _, _ = ep_step
  text = run._train_step.lower(run.abstract_state(), run.abstract_batch()).as_text()
  assert _count(text, ("stablehlo.all_to_all", "sharding_constraint")) == {"stablehlo.all_to_all": 0,
                                                                           "sharding_constraint": 0}


def test_per_device_temp_memory_is_that_of_a_device_share(ep_step):
  """Each of 8 devices holds about what one device needs for its own 1/8 of the batch (here: 1 sequence),
  not the global logits or the global token set (which a step without the mesh gathers: ~1.8x)."""
  _, _, compiled = ep_step
  share = _run("train.batch_size=1", n_devices=1).lower_train_step().compile(compiler_options=FAST_COMPILE)
  ep_temp = compiled.memory_analysis().temp_size_in_bytes
  share_temp = share.memory_analysis().temp_size_in_bytes
  assert ep_temp <= 1.5 * share_temp, (ep_temp, share_temp)
