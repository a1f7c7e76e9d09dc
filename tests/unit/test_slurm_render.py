"""The rendered sbatch script: #SBATCH lines from the cluster options, arguments kept intact."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mim.errors import UserInputError
from mim.slurm import JobSpec, render


def test_options_become_sbatch_lines_before_the_first_command(tmp_path):
    script = render(
        JobSpec(
            "pretrain",
            ["--config", "c.yaml", "optim.betas=[0.9, 0.95]"],
            tmp_path,
            nodes=4,
            gpus_per_node=8,
            time="2-00:00:00",
            partition="gpu",
            account="vision",
            dependency="afterok:17",
            grace_seconds=300,
        )
    )
    lines = script.splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--time=2-00:00:00",
        "--partition=gpu",
        "--account=vision",
        "--dependency=afterok:17",
        "--signal=B:USR1@300",
        "--requeue",
        f"--output={tmp_path}/slurm-%j.out",
    ):
        assert f"#SBATCH {expected}" in sbatch
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line and not line.startswith("#"))
    assert all(lines.index(line) < first_command for line in sbatch)
    assert "mim_args=(--config c.yaml 'optim.betas=[0.9, 0.95]')" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_cpu_jobs_get_one_task_and_no_gpu_line(tmp_path):
    script = render(JobSpec("linprobe", [], tmp_path))
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in sbatch and not any("--gpus-per-node" in line for line in sbatch)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("time", "forever", "not a Slurm time"),
        ("nodes", 0, "--nodes must be"),
        ("dependency", "x:1", "dependency"),
    ],
)
def test_bad_cluster_options_are_refused(tmp_path, field, value, message):
    with pytest.raises(UserInputError, match=message):
        render(JobSpec("pretrain", [], tmp_path, **{field: value}))


def test_the_template_is_a_valid_script_on_its_own():
    template = Path(__file__).resolve().parents[2] / "slurm" / "mim.sbatch"
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    assert "#SBATCH --signal=B:USR1@" in template.read_text() and "#SBATCH --requeue" in template.read_text()
