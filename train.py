"""Train a DeepSeek-V3-style model: python train.py --config configs/tiny.yaml [--set section.key=value ...]

The loop is deepseek_jax/loop.py (Grain -> jitted step under the run's mesh -> Orbax checkpoints); this file is
its command line. On several hosts, start one process per host with the same flags plus either
--distributed auto (SLURM, MPI, GKE, Cloud TPU) or --coordinator/--num-processes/--process-id.
"""

from __future__ import annotations

import argparse
import sys

from deepseek_jax.checkpoint import CheckpointError
from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.data import DataError
from deepseek_jax.distributed import DistributedError, Launch, initialize
from deepseek_jax.loop import train


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="YAML config (see configs/)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set train.steps=100 (repeatable)")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.ckpt_dir")
  g = p.add_argument_group("multi-process runs (one process per host)")
  g.add_argument("--distributed", choices=("auto",), help="join the cluster JAX detects (SLURM, MPI, GKE, TPU)")
  g.add_argument("--coordinator", default="", metavar="HOST:PORT", help="process 0's address")
  g.add_argument("--num-processes", type=int, default=0)
  g.add_argument("--process-id", type=int, default=-1)
  g.add_argument("--distributed-timeout", type=int, default=300, metavar="SECONDS",
                 help="how long to wait for the coordinator and for every process to join")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    cfg = load_config(args.config, args.set)
    initialize(Launch(coordinator=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id, auto=args.distributed == "auto",
                      initialization_timeout=args.distributed_timeout))
    train(cfg, resume=args.resume)
  except (ConfigError, DataError, CheckpointError, DistributedError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
