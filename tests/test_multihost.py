"""train.py as 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives), as on a pod.

The two processes train for 2 steps into one checkpoint directory, stop, and resume (two fresh processes) to
step 4. Their losses and final state must match this process running the same schedule on 8 devices with the
same global batches; only process 0 may print the progress bar and write metrics. The mesh is expert=8 over
both processes' devices (the batch is split over it too), so the expert all-to-alls, the gradient reductions and
the parameter all-gathers all cross the process boundary.
"""

import concurrent.futures
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train as train_cli
from deepseek_jax import data as data_lib
from deepseek_jax import loop as train_lib
from deepseek_jax.checkpoint import Checkpointer, saved_process_count
from deepseek_jax.config import load_config
from deepseek_jax.run import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["data.seq_len=32", "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "model.n_layers=2",
         "model.n_mtp_layers=1", "optim.warmup_steps=2", "mesh.data=1", "mesh.expert=8", "train.ckpt_every=2"]
FIRST, LAST = 2, 4           # the first launch stops after FIRST steps; the resumed one trains to LAST
LAUNCH_TIMEOUT_S = 300       # per launch of both processes; a hung peer fails the test instead of hanging it


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(cache_dir: pathlib.Path) -> dict[str, str]:
  """4 CPU devices per process (nothing of this process's 8-device setting leaks in), the tests' matmul
  precision, and fast compiles: compilation dominates on 2 cores, and the resumed launch reuses the first
  launch's executables from a persistent cache."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.pop("XLA_FLAGS", "")).strip()
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", JAX_DEFAULT_MATMUL_PRECISION="highest",
             XLA_FLAGS=f"{flags} --xla_backend_optimization_level=0".strip(), PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
  return env


def launch(tmp_path: pathlib.Path, name: str, args_by_process: list[list[str]]) -> list[tuple[int, str]]:
  """Runs `python train.py ARGS --coordinator ... --process-id I` for each process; (returncode, output) each."""
  port, start = free_port(), time.monotonic()
  logs = [tmp_path / f"{name}.process{i}.log" for i in range(len(args_by_process))]
  procs = []
  for i, (args, log) in enumerate(zip(args_by_process, logs)):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *args,
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(len(args_by_process)),
           "--process-id", str(i), "--distributed-timeout", "120"],
          env=process_env(tmp_path / "xla_cache"), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT))
  try:
    for p in procs:
      p.wait(timeout=max(1.0, LAUNCH_TIMEOUT_S - (time.monotonic() - start)))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [log.read_text() for log in logs]
  if any(p.returncode == -9 for p in procs):
    pytest.fail(f"{name}: processes did not finish in {LAUNCH_TIMEOUT_S} s\n" + _tails(outputs))
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


def _tails(outputs) -> str:
  return "\n".join(f"--- process {i} ---\n{out[-3000:]}" for i, out in enumerate(outputs))


def _flags(*settings: str) -> list[str]:
  return [a for s in settings for a in ("--set", s)]


def _cfg(*extra):
  return load_config(ROOT / "configs/tiny.yaml", SMALL + list(extra))


def _launch_stop_resume(tmp: pathlib.Path) -> dict[str, list[str]]:
  """Two processes train FIRST steps into tmp/ckpt, stop, and two fresh ones resume to LAST. -> outputs."""
  common = _flags(*SMALL, f"train.ckpt_dir={tmp / 'ckpt'}")
  outputs = {}
  for name, extra in (("first", _flags(f"train.steps={FIRST}")),
                      ("resumed", ["--resume", *_flags(f"train.steps={LAST}")])):
    results = launch(tmp, name, [common + extra] * 2)
    assert [rc for rc, _ in results] == [0, 0], _tails([out for _, out in results])
    outputs[name] = [out for _, out in results]
  return outputs


def _two_process_batches(make_dataset):
  """make_dataset for one process whose batch is the 2 processes' local batches stacked: the global batch
  that jax.make_array_from_process_local_data assembles in the 2-process run."""
  def fake(cfg, *, batch_size, split="train"):
    parts = [make_dataset(cfg, batch_size=batch_size // 2, split=split, process_index=i, process_count=2)
             for i in range(2)]
    while True:
      local = [next(p) for p in parts]
      yield {k: np.concatenate([b[k] for b in local]) for k in local[0]}
  return fake


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """-> (ckpt_dir, outputs by launch, (state, history) of the same schedule in this process on 8 devices).

  The reference trains here while the subprocesses run (a compile mostly keeps one core busy)."""
  tmp = tmp_path_factory.mktemp("multihost")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    launched = pool.submit(_launch_stop_resume, tmp)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(data_lib, "make_dataset", _two_process_batches(data_lib.make_dataset))
      reference = train_lib.train(_cfg(f"train.steps={LAST}"), devices=jax.devices()[:8])
    outputs = launched.result()
  return tmp / "ckpt", outputs, reference


def test_two_processes_stop_resume_match_one_process(two_process_run):
  ckpt, _, (want_state, want_hist) = two_process_run
  rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, LAST + 1))     # the resumed launch appended 3 and 4
  for got, want in zip(rows, want_hist, strict=True):
    for key in ("loss", "mtp_loss", "aux_loss", "grad_norm"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"step {got['step']} {key}")

  run = Run(_cfg(f"train.steps={LAST}"), jax.devices()[:8])
  # The step that both runs trace: its expert all-to-alls span all 8 devices, so 4 of them in each process.
  all_to_alls = re.findall(r"all_to_all.*?split_count = (\d+)", run.lower_train_step().as_text())
  assert all_to_alls and set(all_to_alls) == {"8"}, all_to_alls
  got_state = Checkpointer(ckpt, keep=3, every=2).restore(LAST, run.abstract_state())
  assert int(got_state.step) == LAST
  flat_got, flat_want = (jax.tree_util.tree_flatten_with_path(s)[0] for s in (got_state, want_state))
  for (path, got), (_, want) in zip(flat_got, flat_want, strict=True):   # measured: <= 6.3e-7 on weights ~0.09
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_each_process_saves_its_data_position(two_process_run):
  """Every process's saved Grain state, set into a fresh iterator over that process's shard, continues with
  the batch that follows the ones trained on (the resumed losses above check the same end to end)."""
  ckpt, _, _ = two_process_run
  cfg = _cfg()
  for i in range(2):
    def fresh():
      return data_lib.make_dataset(cfg.data, batch_size=4, process_index=i, process_count=2)
    straight = fresh()
    batches = [next(straight) for _ in range(LAST + 1)]
    for step in (FIRST, LAST):
      assert saved_process_count(ckpt / str(step)) == 2
      it = fresh()
      it.set_state(json.loads((ckpt / str(step) / "data" / f"process_{i}-of-2.json").read_text()))
      for key, value in next(it).items():
        np.testing.assert_array_equal(value, batches[step][key], err_msg=f"process {i} step {step} {key}")


def test_only_process_0_reports(two_process_run):
  ckpt, outputs, _ = two_process_run
  assert [p.relative_to(ckpt) for p in ckpt.rglob("*.jsonl")] == [pathlib.Path("metrics.jsonl")]
  for name, (out0, out1) in outputs.items():
    assert "it/s" in out0 or "s/it" in out0, out0[-2000:]       # tqdm's rate field
    assert "model:" in out0
    for text in ("it/s", "s/it", "%|", "model:", "resumed from"):
      assert text not in out1, (name, text, out1[-2000:])
  assert f"resumed from {ckpt} at step {FIRST}" in outputs["resumed"][0]


def test_resuming_with_another_process_count_is_one_line_error(two_process_run, capsys):
  ckpt, _, _ = two_process_run
  rc = train_cli.main(["--config", str(ROOT / "configs/tiny.yaml"), "--resume",
                       *_flags(*SMALL, f"train.steps={LAST + 2}", f"train.ckpt_dir={ckpt}")])
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert rc == 2 and len(errors) == 1, errors
  assert f"{ckpt / str(LAST)} was saved by 2 processes but this run has 1" in errors[0], errors[0]
  assert Checkpointer(ckpt, keep=3, every=2).latest_step() == LAST     # nothing written


def test_checkpoint_dir_not_shared_is_one_line_error(two_process_run, tmp_path):
  """Process 1 looks into an empty directory of its own (a host-local disk): both processes stop."""
  ckpt, _, _ = two_process_run
  args = ["--resume", *_flags(*SMALL, f"train.steps={LAST}")]
  results = launch(tmp_path, "unshared", [args + _flags(f"train.ckpt_dir={d}") for d in (ckpt, tmp_path / "own")])
  for i, (rc, out) in enumerate(results):
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, (i, out[-3000:])
    assert f"(process 0: {LAST}, process 1: none); the checkpoint directory must be one directory shared by " \
           "every host" in errors[0], errors[0]


def _clean_env() -> dict[str, str]:
  """This environment without anything JAX's cluster detection reads."""
  cluster = re.compile(r"(SLURM_|OMPI_|PMI_|KUBERNETES_|TPU_|MEGASCALE_|JAX_COORDINATOR|JAX_PROCESS)")
  env = {k: v for k, v in os.environ.items() if not cluster.match(k)}
  path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


@pytest.mark.parametrize("args, message", [
    (["--coordinator", "127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
      "--distributed-timeout", "1"],
     "coordinator 127.0.0.1:{port} (process 0) not reachable within 1 s"),
    (["--distributed", "auto", "--distributed-timeout", "1"], "--distributed auto found no cluster"),
])
def test_no_coordinator_is_one_line_error(args, message):
  """Without the check, JAX aborts a process that cannot reach its coordinator (a C++ fatal error and a stack
  trace, after --distributed-timeout)."""
  port = free_port()                          # nothing listens there
  args, message = [a.format(port=port) for a in args], message.format(port=port)
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *args],
      env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert message in errors[0], errors[0]
  assert time.monotonic() - start < 60


def test_distributed_timeout_must_be_positive(capsys):
  rc = train_cli.main(["--config", str(ROOT / "configs/tiny.yaml"), "--coordinator", "127.0.0.1:1",
                       "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "0"])
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert rc == 2 and errors == ["error: --distributed-timeout=0 must be at least 1 second"], errors
