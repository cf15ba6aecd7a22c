"""Two processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives) run the sharded tiny model
on one global 8-device mesh; the result must match this process's single-device run."""

import functools
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

import multiprocess_worker as worker
from deepseek_jax import model as M
from deepseek_jax.config import load_config

ROOT = pathlib.Path(__file__).parent.parent
TIMEOUT_S = 110   # the whole test, so that a hung peer fails it quickly


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  """CPU only, 4 devices per process: nothing of this process's 8-device setting may leak in."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.pop("XLA_FLAGS", "")).strip()
  if flags:                         # XLA reads a non-"--" value as a file name, so never pass blanks
    env["XLA_FLAGS"] = flags
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
  return env


def test_two_processes_match_single_process(tmp_path):
  start = time.monotonic()
  port, out = free_port(), tmp_path / "out.npz"
  logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(port), str(i),
                             str(out)], env=worker_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
           for i, log in enumerate(logs)]
  try:
    # The single-process reference, computed while the workers start up.
    cfg = load_config(ROOT / "configs" / "tiny.yaml").model
    graphdef, params, bias = M.split_model(M.init_model(cfg, seed=0))
    step = jax.jit(functools.partial(worker.loss_and_grads, graphdef), compiler_options=worker.FAST_COMPILE)
    want = step(params, bias, worker.reference_inputs(cfg))
    for p in procs:
      p.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
  except subprocess.TimeoutExpired:
    pytest.fail(f"workers did not finish in {TIMEOUT_S} s:\n" + _tails(tmp_path))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  assert [p.returncode for p in procs] == [0, 0], _tails(tmp_path)
  got = dict(np.load(out))
  assert sorted(got) == sorted(want)
  assert int(got["dropped"]) == 0
  for name, value in want.items():
    np.testing.assert_allclose(got[name], np.asarray(value), rtol=1e-5, atol=1e-6, err_msg=name)


def _tails(tmp_path) -> str:
  return "\n".join(f"--- worker{i} ---\n" + (tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
