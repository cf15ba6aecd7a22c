"""Joining a multi-process run (several hosts, or several processes on one host) before JAX starts.

On GPU clusters every process sees only its own GPUs until `jax.distributed.initialize` has run; without it,
N processes would silently train N independent models into one checkpoint directory. Two ways in:
  explicit  --coordinator HOST:PORT --num-processes N --process-id I (all three, on every process)
  auto      --distributed auto: JAX's own cluster detection (SLURM, Open MPI, Kubernetes/GKE, Cloud TPU)
A single process (no flags) starts nothing.
"""

from __future__ import annotations

import dataclasses

import jax

from deepseek_jax.config import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
  """How this process joins the run (command-line flags of train.py)."""
  coordinator: str = ""        # "host:port" of process 0's coordinator service
  num_processes: int = 0
  process_id: int = -1
  auto: bool = False           # let JAX detect the cluster (SLURM, MPI, GKE, TPU pods)
  initialization_timeout: int = 300

  @property
  def explicit(self) -> bool:
    return bool(self.coordinator) or self.num_processes > 0 or self.process_id >= 0

  def validate(self) -> None:
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
  if launch.auto:
    jax.distributed.initialize(initialization_timeout=launch.initialization_timeout)
  elif launch.explicit:
    jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                               process_id=launch.process_id,
                               initialization_timeout=launch.initialization_timeout)
