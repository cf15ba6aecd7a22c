"""Round trips, pruning, resharding, the Grain iterator and the failure modes of `deepseek_jax.checkpoint`."""

import os

import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from deepseek_jax import optim  # noqa: E402
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, saved_process_count  # noqa: E402
from deepseek_jax.config import OptimConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


class State(NamedTuple):  # shaped like trainer.TrainState, plus PRNG keys
  step: jax.Array
  params: dict
  opt_state: Any
  keys: dict


def make_state(seed=0) -> State:
  """params + adamw state (after one update) + int step + PRNG keys; '0'/'1' keys as a layer dict would have."""
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"embed": jax.random.normal(k[0], (16, 8)),
            "layers": {"0": {"wq": jax.random.normal(k[1], (8, 8)), "attn_norm": jnp.ones((8,))},
                       "1": {"wq": jax.random.normal(k[2], (8, 8)), "attn_norm": jnp.full((8,), 2.0)}}}
  tx = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0))
  opt_state = tx.init(params)
  updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  return State(jnp.int32(7 + seed), optax.apply_updates(params, updates), opt_state,
               {"typed": k[3], "raw": jax.random.PRNGKey(seed)})


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_bitwise_equal(a, b):
  unwrap = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(unwrap(x)), np.asarray(unwrap(y))), a, b)
  assert all(x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def save_steps(directory, steps, state):
  ckpt = Checkpointer(directory, keep=10, every=1)
  for step in steps:
    assert ckpt.save(step, state)
  ckpt.close()


def test_round_trip_is_bitwise_with_async_saves(tmp_path):
  state = make_state()
  ckpt = Checkpointer(tmp_path, keep=3, every=10, async_save=True)
  assert ckpt.save(jnp.int32(10), state, meta={"model": {"dim": 8}, "note": "tiny"})
  ckpt.close()
  restarted = Checkpointer(tmp_path, keep=3, every=10)
  assert restarted.latest_step() == 10
  restored = restarted.restore(None, abstract(state))
  assert_bitwise_equal(restored, state)
  assert sorted(restored.params["layers"]) == ["0", "1"]  # string keys stay strings (no list conversion)
  assert type(restored.opt_state[1]) is type(state.opt_state[1])  # optax NamedTuples rebuilt
  assert restarted.read_meta() == {"model": {"dim": 8}, "note": "tiny"}
  restarted.close()


def test_saves_every_n_steps_and_keeps_the_newest(tmp_path):
  state = {"w": jnp.arange(4.0)}
  ckpt = Checkpointer(tmp_path, keep=2, every=10)
  saved = [step for step in range(1, 51) if ckpt.save(step, {"w": state["w"] + step})]
  assert saved == [10, 20, 30, 40, 50]
  # A forced final save; saving a step again (still in flight, or committed) is a no-op.
  assert ckpt.save(53, state, force=True) and not ckpt.save(53, state, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [50, 53] and ckpt.latest_step() == 53
  assert not ckpt.save(53, state, force=True) and not ckpt.save(50, state)
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["50", "53"]
  restored = Checkpointer(tmp_path, keep=2, every=10).restore(50, abstract(state))
  np.testing.assert_array_equal(restored["w"], np.arange(4.0) + 50)


def test_restore_onto_a_different_mesh(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  devices = np.array(jax.devices()[:8])
  old = jax.sharding.Mesh(devices.reshape(2, 4), ("data", "model"))
  new = jax.sharding.Mesh(devices, ("fsdp",))
  values = {"w": np.arange(16 * 8, dtype=np.float32).reshape(16, 8), "b": np.arange(8, dtype=np.float32)}
  specs_old = {"w": P("data", "model"), "b": P("model")}
  specs_new = {"w": P(None, "fsdp"), "b": P()}
  state = {k: jax.device_put(v, NamedSharding(old, specs_old[k])) for k, v in values.items()}
  save_steps(tmp_path, [1], state)
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(new, specs_new[k]))
            for k, v in values.items()}
  restored = Checkpointer(tmp_path, keep=1, every=1).restore(1, target)
  for k, v in values.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), v)
    assert restored[k].sharding == target[k].sharding
  assert len(restored["w"].addressable_shards) == 8 and restored["w"].addressable_shards[0].data.shape == (16, 1)


def test_grain_iterator_resumes_identically(tmp_path):
  def fresh():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
  it, state = fresh(), {"w": jnp.zeros(2)}
  for _ in range(3):
    next(it)
  ckpt = Checkpointer(tmp_path, keep=2, every=1)
  assert ckpt.save(3, state, data_iter=it)
  ckpt.close()
  expected = [next(it) for _ in range(5)]
  resumed = fresh()
  Checkpointer(tmp_path, keep=2, every=1).restore(3, abstract(state), data_iter=resumed)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)
  np.testing.assert_array_equal(expected[0], np.arange(12, 16))


def _save_with_iterator(directory, step=3):
  it, state = iter(grain.MapDataset.range(100).batch(4).to_iter_dataset()), {"w": jnp.zeros(2)}
  next(it)
  ckpt = Checkpointer(directory, keep=2, every=1)
  assert ckpt.save(step, state, data_iter=it)
  ckpt.close()
  return state, iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_iterator_resumes_only_with_the_process_count_that_saved(tmp_path, monkeypatch):
  """Saved by 1 process, resumed as process 0 of 2 (2 -> 1 runs for real in test_multihost.py)."""
  state, fresh = _save_with_iterator(tmp_path)
  assert saved_process_count(tmp_path / "3") == 1
  ckpt = Checkpointer(tmp_path, keep=2, every=1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(CheckpointError, match=r"/3 was saved by 1 process but this run has 2: each process resumes "
                                            r"its own position in the data, so resume with 1 process$"):
    ckpt.restore(3, abstract(state), data_iter=fresh)


def test_missing_iterator_file_of_this_process_is_reported(tmp_path, monkeypatch):
  """A step whose data/ holds process 0's position only, read by process 1 of 2."""
  state, fresh = _save_with_iterator(tmp_path)
  data = tmp_path / "3" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  ckpt = Checkpointer(tmp_path, keep=2, every=1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(CheckpointError, match=r"/3 is incomplete: data/process_1-of-2.json missing$"):
    ckpt.restore(3, abstract(state), data_iter=fresh)


def test_empty_or_missing_directory_has_no_latest_step(tmp_path):
  ckpt = Checkpointer(tmp_path / "does" / "not" / "exist", keep=1, every=1)
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  with pytest.raises(CheckpointError, match="no checkpoint to restore in .*exist$"):
    ckpt.restore(None, {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=jnp.zeros(2).sharding)})


def _delete_tensor_files(step_dir):
  for f in (step_dir / "state" / "d").iterdir():
    f.unlink()


def _truncate_tensor_files(step_dir):
  for f in (step_dir / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _drop_step_metadata(step_dir):
  (step_dir / "_CHECKPOINT_METADATA").unlink()


def _drop_tree_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


# After a failed read, tensorstore's remaining callbacks hit orbax's closed event loop ("Event loop is closed");
# that noise is orbax's, not a second failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt, expected", [
    (_delete_tensor_files, "is unreadable: ValueError: NOT_FOUND"),     # tensorstore's errors, kept as __cause__
    (_truncate_tensor_files, "is unreadable: ValueError: OUT_OF_RANGE"),
    (_drop_step_metadata, "is incomplete: _CHECKPOINT_METADATA missing$"),  # orbax would only log a warning
    (_drop_tree_metadata, "is unreadable: state/_METADATA is missing or invalid$"),
])
def test_corrupt_latest_step_raises_one_line_error(tmp_path, corrupt, expected):
  state = make_state()
  save_steps(tmp_path, [1, 2], state)
  corrupt(tmp_path / "2")
  ckpt = Checkpointer(tmp_path, keep=3, every=1)
  assert ckpt.latest_step() == 2  # committed but broken: an error, not a silent fall back to step 1
  with pytest.raises(CheckpointError, match=expected) as err:
    ckpt.restore(None, abstract(state))
  message = str(err.value)
  assert "\n" not in message and message.startswith(str(tmp_path / "2")) and len(message) < 500, message
  assert (err.value.__cause__ is not None) == ("ValueError" in expected)


def test_interrupted_saves_are_ignored(tmp_path):
  good, other = make_state(0), make_state(1)
  save_steps(tmp_path, [10], good)
  save_steps(tmp_path / "scratch", [20, 30], other)
  # What a save killed before its rename leaves behind: orbax's tmp directory...
  shutil.copytree(tmp_path / "scratch" / "20", tmp_path / "20.orbax-checkpoint-tmp-1761000000000000")
  # ...and a step directory without the commit marker (a partial copy or a non-atomic filesystem).
  shutil.copytree(tmp_path / "scratch" / "30", tmp_path / "30")
  (tmp_path / "30" / "commit_success.txt").unlink()
  ckpt = Checkpointer(tmp_path, keep=3, every=10)
  assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
  assert_bitwise_equal(ckpt.restore(None, abstract(good)), good)
  with pytest.raises(CheckpointError, match=r"step 30 is not a committed checkpoint \(committed: \[10\]\)"):
    ckpt.restore(30, abstract(good))
  assert ckpt.save(20, other)  # the run continues past the debris
  ckpt.close()
  assert Checkpointer(tmp_path, keep=3, every=10).latest_step() == 20


def test_process_killed_during_async_save_keeps_last_good_step(tmp_path):
  script = textwrap.dedent(f"""
      import os, jax.numpy as jnp
      from deepseek_jax.checkpoint import Checkpointer
      ckpt = Checkpointer({str(tmp_path)!r}, keep=3, every=1)
      ckpt.save(1, {{"w": jnp.ones((64, 64))}}); ckpt.wait()
      ckpt.save(2, {{"w": jnp.zeros((4096, 1024))}})
      os._exit(0)  # dies with step 2 in flight: no wait, no finalize
  """)
  subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True)
  assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in tmp_path.iterdir())  # the half-written step
  ckpt = Checkpointer(tmp_path, keep=3, every=1)
  assert ckpt.latest_step() == 1
  target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=jnp.zeros(1).sharding)}
  np.testing.assert_array_equal(ckpt.restore(None, target)["w"], 1.0)
  assert ckpt.save(2, {"w": jnp.full((64, 64), 2.0)})  # the resumed run replaces the debris
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.params.pop("embed"), "not in the target: params/embed$"),
    (lambda s: s.params["layers"].update({"2": s.params["layers"]["0"]}),
     "missing from the checkpoint: params/layers/2/attn_norm, params/layers/2/wq$"),
    (lambda s: s.params.update(embed=jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=s.step.sharding)),
     r"params/embed has shape \(16, 8\) in the checkpoint but \(16, 4\) in the target"),
])
def test_tree_mismatch_raises_one_line_error(tmp_path, edit, message):
  state = make_state()
  save_steps(tmp_path, [5], state)
  target = abstract(state)
  edit(target)
  with pytest.raises(CheckpointError, match=message) as err:
    Checkpointer(tmp_path, keep=1, every=1).restore(5, target)
  assert "\n" not in str(err.value) and str(tmp_path / "5") in str(err.value)


def test_target_without_concrete_sharding_is_a_usage_error(tmp_path):
  save_steps(tmp_path, [1], {"w": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="leaf 'w' needs a sharding on a concrete"):
    Checkpointer(tmp_path, keep=1, every=1).restore(1, {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)})
