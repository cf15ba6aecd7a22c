"""Saves and restores the train state, the Grain iterator and a JSON config; hides the Orbax API (ecosystem.md 7).

Orbax writes `<dir>/<step>.orbax-checkpoint-tmp-<time>/`, puts `commit_success.txt` in it, then renames it to
`<dir>/<step>/`: a killed save leaves only an unlisted tmp dir. We also skip step dirs without the marker (partial
copies); a committed step that fails to read raises CheckpointError instead of falling back to an older one.

Several processes (one per host) share one checkpoint directory: each writes its own array shards and its own
Grain iterator position (`data/process_<i>-of-<n>.json`). Every process must therefore see the same steps, and
a run with a data iterator resumes only with the process count that saved it; both are one-line errors.
"""

from __future__ import annotations

import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

_policies = ocp.checkpoint_managers


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or does not fit the state it is restored into."""


class Checkpointer:
  """Keeps the newest `keep` checkpoints of a run, saving every `every` steps (or when forced)."""

  def __init__(self, directory: str | epath.PathLike, *, keep: int, every: int, async_save: bool = True):
    if keep < 1 or every < 1:
      raise ValueError(f"checkpoint keep={keep} and every={every} must both be >= 1")
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # Orbax's default policy also saves the first step it is shown; we want exactly the multiples of `every`.
        save_decision_policy=_policies.AnySavePolicy(
            [_policies.FixedIntervalPolicy(every), _policies.PreemptionCheckpointingPolicy()]),
        # Orbax only asks for commit_success.txt on GCS; asking for it everywhere skips uncommitted steps.
        step_name_format=ocp.step.standard_name_format(
            temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath))
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, state: Any, data_iter=None, *, meta: dict | None = None, force: bool = False) -> bool:
    """Starts saving (in the background if async) if `step` is a multiple of `every` or `force`; returns whether
    it did. A step already saved is never written twice."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    try:
      return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:  # only reachable with force=True
      return False
    except Exception as e:
      raise CheckpointError(f"saving step {step} to {self.directory} failed: {_one_line(e)}") from e

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step; None for an empty or missing directory.

    With several processes this is a collective (every process must call it) that fails unless all of them
    see the same step: a directory that is not shared would otherwise let some hosts resume and others start
    afresh."""
    step = self._mngr.latest_step()
    if jax.process_count() > 1:
      seen = multihost_utils.process_allgather(np.int64(-1 if step is None else step)).tolist()
      if len(set(seen)) > 1:
        by_process = ", ".join(f"process {i}: {s if s >= 0 else 'none'}" for i, s in enumerate(seen))
        raise CheckpointError(f"processes see different latest checkpoints in {self.directory} ({by_process}); "
                              "the checkpoint directory must be one directory shared by every host")
    return step

  def restore(self, step: int | None, abstract_state: Any, data_iter=None) -> Any:
    """Reads step `step` (None = latest) into the shapes, dtypes and shardings of `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct (or arrays) whose shardings are concrete
    NamedShardings; they may name a different mesh than the one that saved. `data_iter` is restored in place.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f"no checkpoint to restore in {self.directory}")
    path = self.directory / str(step)
    self._check(step, path, abstract_state, data_iter is not None)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as e:
      raise CheckpointError(f"{path} is unreadable: {_one_line(e)}") from e

  def _check(self, step: int, path: epath.Path, abstract_state: Any, with_data: bool) -> None:
    """Fails early, in one line, on what orbax would report as a page of tensorstore specs (or not at all)."""
    if step not in self._mngr.all_steps():
      raise CheckpointError(f"{path}: step {step} is not a committed checkpoint (committed: {self.all_steps()})")
    wanted = ["_CHECKPOINT_METADATA", "state"] + (["data"] if with_data else [])
    if missing := [name for name in wanted if not (path / name).exists()]:
      raise CheckpointError(f"{path} is incomplete: {', '.join(missing)} missing")
    if with_data:
      _check_data_processes(path)
    target = _leaves(abstract_state)
    for name, leaf in target.items():
      sharding = getattr(leaf, "sharding", None)
      if sharding is None or isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
        raise ValueError(f"abstract_state leaf {name!r} needs a sharding on a concrete jax.sharding.Mesh")
    try:
      metadata = self._mngr.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"{path} is unreadable: {_one_line(e)}") from e
    if metadata is None:  # orbax can restore without state/_METADATA, but then nothing checks the tree
      raise CheckpointError(f"{path} is unreadable: state/_METADATA is missing or invalid")
    if problem := _mismatch(_leaves(metadata.tree), target):
      raise CheckpointError(f"{path} does not match the target state: {problem}")

  def read_meta(self, step: int | None = None) -> dict | None:
    """The `meta` dict saved with `step` (None = latest), or None if there is none."""
    step = self.latest_step() if step is None else int(step)
    if step is None or not (self.directory / str(step) / "meta").exists():
      return None
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointError(f"{self.directory / str(step)}/meta is unreadable: {_one_line(e)}") from e

  def wait(self) -> None:
    """Blocks until background saves are committed; raises CheckpointError if one failed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"saving to {self.directory} failed: {_one_line(e)}") from e

  def close(self) -> None:
    self.wait()
    self._mngr.close()


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def saved_process_count(path: epath.Path) -> int | None:
  """How many processes saved the Grain iterator positions of the step directory `path` (from grain's file
  names data/process_<i>-of-<n>.json); None if there are none."""
  counts = {int(m[2]) for f in (path / "data").iterdir() if (m := _DATA_FILE.fullmatch(f.name))}
  if len(counts) > 1:
    raise CheckpointError(f"{path}/data mixes iterator files of {sorted(counts)} processes")
  return counts.pop() if counts else None


def _check_data_processes(path: epath.Path) -> None:
  """Each process reads back its own iterator position, so the process count must be the one that saved."""
  saved, now = saved_process_count(path), jax.process_count()
  if saved is not None and saved != now:
    raise CheckpointError(f"{path} was saved by {_processes(saved)} but this run has {now}: each process "
                          f"resumes its own position in the data, so resume with {_processes(saved)}")
  own = f"process_{jax.process_index()}-of-{now}.json"
  if not (path / "data" / own).exists():
    raise CheckpointError(f"{path} is incomplete: data/{own} missing")


def _processes(n: int) -> str:
  return f"{n} process" + ("" if n == 1 else "es")


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):  # DictKey / GetAttrKey (NamedTuple fields) / SequenceKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves(tree) -> dict[str, Any]:
  """{'params/layers/0/w': leaf}. Orbax's metadata turns NamedTuples into dicts; names make both sides agree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _mismatch(stored: dict[str, Any], target: dict[str, Any]) -> str:
  """'' if every target leaf is in the checkpoint with the same shape, else the first problem."""
  for what, names in (("missing from the checkpoint", target.keys() - stored.keys()),
                      ("not in the target", stored.keys() - target.keys())):
    if names:
      names = sorted(names)
      return f"{what}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
  for name, want in target.items():
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      continue  # typed PRNG keys are stored as their raw uint32 data, with an extra trailing dim
    if tuple(stored[name].shape) != tuple(want.shape):
      return f"{name} has shape {tuple(stored[name].shape)} in the checkpoint but {tuple(want.shape)} in the target"
  return ""


def _one_line(e: BaseException, limit: int = 300) -> str:
  """Orbax and TensorStore errors span many lines of specs; the full text stays on __cause__."""
  text = f"{type(e).__name__}: {' '.join(str(e).split())}"
  return text if len(text) <= limit else text[:limit] + " ..."
