"""Rank, world size and local rank from whichever launcher started us.

The deepspeed launcher, torchrun and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK;
`srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; Open MPI sets OMPI_COMM_WORLD_*. A plain
`python` run is rank 0 of 1. This module only reads the environment; the engine initialises
the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_SOURCES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, prints and writes shared files."""
        return self.rank == 0


def _int(env: dict[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    # SLURM writes e.g. "2(x3)" for per-node task counts: take the leading number.
    digits = value.split("(")[0]
    return int(digits) if digits.isdigit() else default


def dist_info(env: dict[str, str] | None = None) -> DistInfo:
    """Read the launcher's environment (os.environ by default)."""
    env = dict(os.environ if env is None else env)
    for rank_key, world_key, local_key, local_world_key in _SOURCES:
        if rank_key in env and world_key in env:
            world = _int(env, world_key, 1)
            return DistInfo(
                rank=_int(env, rank_key, 0),
                world=world,
                local_rank=_int(env, local_key, 0),
                local_world=_int(env, local_world_key, world),
            )
    return DistInfo()


def export_env(info: DistInfo, *, master_addr: str = "127.0.0.1", master_port: int = 29500) -> None:
    """Set the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) that are
    missing, so that a plain `python` run or an `srun` task can initialise a process group."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world))
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
