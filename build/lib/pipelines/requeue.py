"""After a stop signal under Slurm: ask Slurm to requeue this job (rank 0 only)."""

from __future__ import annotations

import logging
import os
import subprocess

from mim.distributed import DistEnv

log = logging.getLogger("mim.requeue")


def requeue_if_stopped(reason: str, env: DistEnv) -> int:
    if reason != "signal" or not env.is_main or "SLURM_JOB_ID" not in os.environ:
        return 0
    job_id = os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return 1
    log.info("requeued Slurm job %s; it will resume from the checkpoint just written", job_id)
    return 0
