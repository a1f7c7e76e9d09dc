"""After a stop signal under Slurm: ask Slurm to requeue this job (rank 0 only)."""

from __future__ import annotations

import os

from mim.distributed import DistEnv
from mim.slurm import requeue_job


def requeue_if_stopped(reason: str, env: DistEnv) -> int:
    if reason != "signal" or not env.is_main:
        return 0
    if "SLURM_JOB_ID" not in os.environ:
        return 0
    return 0 if requeue_job("stopped by a signal after its checkpoint") else 1
