"""Joining a multi-process run (several hosts, or several processes on one host) before JAX starts.

On GPU clusters every process sees only its own GPUs until `jax.distributed.initialize` has run; without it,
N processes would silently train N independent models into one checkpoint directory. Two ways in:
  explicit  --coordinator HOST:PORT --num-processes N --process-id I (all three, on every process)
  auto      --distributed auto: JAX's own cluster detection (SLURM, Open MPI, Kubernetes/GKE, Cloud TPU)
A single process (no flags) starts nothing.

JAX aborts the whole process (a C++ fatal error, no Python exception) when it cannot reach the coordinator, so
the explicit form first waits for process 0's port itself and reports a missing coordinator in one line.
"""

from __future__ import annotations

import dataclasses
import socket
import time

import jax

from deepseek_jax.config import ConfigError


class DistributedError(RuntimeError):
  """This process could not join the multi-process run; the message is one line naming the cause."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
  """How this process joins the run (command-line flags of train.py)."""
  coordinator: str = ""        # "host:port" of process 0's coordinator service
  num_processes: int = 0
  process_id: int = -1
  auto: bool = False           # let JAX detect the cluster (SLURM, MPI, GKE, TPU pods)
  initialization_timeout: int = 300  # seconds to wait for the coordinator and for every process to join

  @property
  def explicit(self) -> bool:
    return bool(self.coordinator) or self.num_processes > 0 or self.process_id >= 0

  def validate(self) -> None:
    if self.initialization_timeout < 1:
      raise ConfigError(f"--distributed-timeout={self.initialization_timeout} must be at least 1 second")
    if self.auto and self.explicit:
      raise ConfigError("--distributed auto and --coordinator/--num-processes/--process-id exclude each other")
    if not self.explicit:
      return
    if not (self.coordinator and self.num_processes > 0 and self.process_id >= 0):
      raise ConfigError("--coordinator, --num-processes and --process-id must be given together "
                        f"(got coordinator={self.coordinator!r}, num_processes={self.num_processes}, "
                        f"process_id={self.process_id})")
    host, _, port = self.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"--coordinator={self.coordinator!r} must look like host:port")
    if not 0 <= self.process_id < self.num_processes:
      raise ConfigError(f"--process-id={self.process_id} must be in [0, --num-processes={self.num_processes})")


def initialize(launch: Launch) -> None:
  """Starts jax.distributed as `launch` says; nothing for a single process."""
  launch.validate()
  timeout = launch.initialization_timeout
  if launch.auto:
    try:
      jax.distributed.initialize(initialization_timeout=timeout)
    except ValueError as e:      # nothing detected: JAX asks for the coordinator address, process count or id
      raise DistributedError(f"--distributed auto found no cluster (SLURM, Open MPI, Kubernetes, Cloud TPU): "
                             f"{_one_line(e)}; pass --coordinator, --num-processes and --process-id") from None
  elif launch.explicit:
    start = time.monotonic()
    if launch.process_id != 0:   # process 0 runs the coordinator service; the others must reach it
      _wait_for_coordinator(launch.coordinator, timeout)
    jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                               process_id=launch.process_id,
                               initialization_timeout=max(1, round(timeout - (time.monotonic() - start))))


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once a TCP connection to `address` (host:port) succeeds; DistributedError after `timeout` s."""
  host, _, port = address.rpartition(":")
  host = host.removeprefix("[").removesuffix("]")            # [::1]:1234
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        return
    except OSError as e:                                       # refused, unreachable, unknown host, timed out
      if time.monotonic() >= deadline:
        raise DistributedError(f"coordinator {address} (process 0) not reachable within {timeout} s "
                               f"({_one_line(e)}); start process 0 there, or raise --distributed-timeout") from None
    time.sleep(0.2)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__
