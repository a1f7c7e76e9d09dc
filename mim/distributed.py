"""Where this process sits in the job: one function reads the environment (Slurm, torchrun or
the deepspeed launcher) and returns a frozen `DistEnv`; the process group is set up from it."""

from __future__ import annotations

import contextlib
import datetime
import io
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
    node: str = ""  # this process's node (Slurm's node name, else the host name)
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _scontrol(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["scontrol", *args], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _first_slurm_host(nodelist: str) -> str:
    hosts = (_scontrol("show", "hostnames", nodelist) or "").split()
    return hosts[0] if hosts else nodelist.split(",")[0].split("[")[0]


def rendezvous_host(nodelist: str) -> str:
    """The first node of a Slurm node list as the other nodes can reach it: its name where the
    name resolves (most clusters), else the node's address as Slurm knows it (NodeAddr), for
    clusters whose Slurm node names are not host names."""
    host = _first_slurm_host(nodelist)
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    for field in (_scontrol("show", "node", host, "-o") or "").split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return host


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    host = socket.gethostname().split(".")[0]
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / deepspeed launcher
        world_size = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world_size,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
            node=host,
            node_rank=int(env.get("GROUP_RANK", 0)),
            num_nodes=max(1, world_size // int(env.get("LOCAL_WORLD_SIZE") or world_size)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or host
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            # From the allocation, never from MASTER_ADDR/MASTER_PORT: sbatch exports the submitting
            # shell's environment, where those may be left over from some other run.
            master_addr=rendezvous_host(nodelist),
            # A port from the job id: jobs sharing a node do not collide, a requeued job reuses it.
            master_port=20000 + int(env["SLURM_JOB_ID"]) % 20000,
            launcher="slurm",
            node=env.get("SLURMD_NODENAME") or host,
            node_rank=int(env.get("SLURM_NODEID", 0)),
            num_nodes=int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1),
        )
    # One process: any free port, so that several single-process runs on one machine never collide.
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single", host)


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
        if cpu:
            # Importing DeepSpeed imports torch's cpp_extension, which warns on every machine
            # without a CUDA runtime that it found none: expected here, so its logger says errors only.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        import deepspeed

        # DeepSpeed prints (not logs) that it built its shared-memory op: kept as a debug line.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(
                dist_backend="gloo" if cpu else "nccl",
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(minutes=30),
            )
        for line in printed.getvalue().splitlines():
            log.debug("deepspeed: %s", line)
    log.info(
        "%d process(es) on %d node(s) (%s), rendezvous %s:%d; rank 0 on %s",
        env.world_size,
        env.num_nodes,
        env.launcher,
        env.master_addr,
        env.master_port,
        env.node,
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
    """Destroys the process group. No barrier here: after a stop or a failure a peer may be blocked
    or gone. Where every rank is known to be alive, `barrier()` first, so that no rank closes its
    connections while a peer still receives from it (gloo then aborts the process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
