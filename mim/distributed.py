"""Where this process sits in the job: one function reads the environment (Slurm, torchrun or
the deepspeed launcher) and returns a frozen `DistEnv`; the process group is set up from it."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # slurm | torchrun | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / deepspeed launcher
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname()
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            # A port from the job id: jobs sharing a node do not collide, a requeued job reuses it.
            master_port=int(env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000),
            launcher="slurm",
        )
    # One process: any free port, so that several single-process runs on one machine never collide.
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def use_cpu_accelerator() -> bool:
    """DeepSpeed's CPU accelerator (gloo) when there is no CUDA device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return os.environ.get("DS_ACCELERATOR") == "cpu"


def init_distributed(env: DistEnv) -> torch.device:
    """Initialises the process group (also for one process: DeepSpeed expects one) and returns
    this process's device."""
    cpu = use_cpu_accelerator()
    for key, value in dict(
        RANK=env.rank,
        LOCAL_RANK=env.local_rank,
        WORLD_SIZE=env.world_size,
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=env.master_port,
    ).items():
        os.environ[key] = str(value)
    if not cpu:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(
            dist_backend="gloo" if cpu else "nccl",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(minutes=30),
        )
    return torch.device("cpu") if cpu else torch.device("cuda", env.local_rank)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(value: object) -> list:
    """`value` from every rank, in rank order (all ranks must call it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (all ranks must call it)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
