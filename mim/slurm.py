"""Rendering and submitting slurm/mim.sbatch: the cluster options become its #SBATCH lines, the
stage and its arguments become variables at its `# mim-submit: environment` marker."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mim.errors import UserInputError
from mim.resources import shipped

TEMPLATE_NAME = "mim.sbatch"
ENVIRONMENT_MARKER = "# mim-submit: environment"
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass(frozen=True)
class JobSpec:
    stage: str
    arguments: list[str]
    log_dir: Path
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    dependency: str | None = None
    grace_seconds: int = 180
    max_requeues: int = 20
    job_name: str = "mim"
    python: str = field(default_factory=lambda: sys.executable)

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1:
            raise UserInputError(
                f"--nodes must be >= 1, --gpus-per-node >= 0, --cpus-per-task >= 1 (got "
                f"{self.nodes}, {self.gpus_per_node}, {self.cpus_per_task})"
            )
        if not _TIME.match(self.time):
            raise UserInputError(f"--time {self.time!r} is not a Slurm time (e.g. 30, 4:00:00, 2-00:00:00)")
        if self.dependency and not re.match(
            r"^(after|afterok|afterany|afternotok|singleton)", self.dependency
        ):
            raise UserInputError(
                f"--dependency {self.dependency!r} is not a Slurm dependency (e.g. afterok:123)"
            )


def sbatch_options(spec: JobSpec) -> list[str]:
    tasks = spec.tasks_per_node or max(1, spec.gpus_per_node)
    options = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={spec.cpus_per_task}",
        f"--time={spec.time}",
        f"--signal=B:USR1@{spec.grace_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={spec.log_dir}/slurm-%j.out",
    ]
    if spec.gpus_per_node:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    options += [
        f"--{name}={value}"
        for name, value in (
            ("partition", spec.partition),
            ("account", spec.account),
            ("dependency", spec.dependency),
        )
        if value
    ]
    return options


def render(spec: JobSpec, template: str | None = None) -> str:
    spec.check()
    text = template if template is not None else (shipped("slurm") / TEMPLATE_NAME).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#SBATCH")]
    shebang, body = lines[0], lines[1:]
    header = [f"#SBATCH {option}" for option in sbatch_options(spec)]
    environment = [
        f"export MIM_STAGE={shlex.quote(spec.stage)}",
        f"export MIM_PYTHON={shlex.quote(spec.python)}",
        f"export MIM_MAX_REQUEUES={spec.max_requeues}",
        "mim_args=(" + " ".join(shlex.quote(a) for a in spec.arguments) + ")",
        f"cd {shlex.quote(str(Path.cwd()))}",
    ]
    rendered = []
    for line in body:
        rendered += environment if line.strip() == ENVIRONMENT_MARKER else [line]
    # The #SBATCH lines must come before the first command; the comment block stays on top.
    first_command = next(i for i, line in enumerate(rendered) if line and not line.startswith("#"))
    return "\n".join([shebang, *rendered[:first_command], *header, *rendered[first_command:]]) + "\n"


def submit(script: str, path: Path) -> str:
    """Writes the script and submits it; returns the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserInputError("sbatch not found: is this a Slurm login node?") from None
    if result.returncode != 0:
        raise UserInputError(f"sbatch refused {path}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def requeue_job(why: str) -> bool:
    """Asks Slurm to requeue the job this process runs in (the whole job: every task is ended and
    it starts again, resuming from its newest checkpoint); False outside Slurm or where scontrol
    fails (logged)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return False
    log = logging.getLogger("mim.requeue")
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("scontrol requeue %s failed: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s (%s); it will resume from its newest checkpoint", job_id, why)
    return True
