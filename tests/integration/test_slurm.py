"""Against a real Slurm (munged, slurmctld, slurmd on localhost, started by the fixture): submit,
preemption by USR1 and by requeue, chained stages, and a 2-task job through srun."""

from __future__ import annotations

import json
import re
import time

import pytest

from mim import checkpoint
from tests.conftest import run_cli
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
GREY = (
    "data.mean=[0.286]",
    "data.std=[0.353]",
    "model.img_size=28",
    "model.patch_size=7",
    "model.in_chans=1",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmUnavailable, OSError) as error:
        cluster.stop()
        pytest.skip(f"no Slurm here: {error}")
    yield cluster
    cluster.stop()


def submit(slurm, *args):
    result = run_cli("submit", *args, "--cpus-per-task=1", "--time=10", SLURM_CONF=str(slurm.conf))
    assert result.returncode == 0, result.stderr[-3000:]
    return re.findall(r"submitted \w+ as job (\d+)", result.stdout)


def pretrain_job(slurm, run_dir, shards, *overrides, tasks=1):
    return submit(
        slurm,
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={shards}",
        f"run.dir={run_dir}",
        f"--tasks-per-node={tasks}",
        *GREY,
        *overrides,
    )[0]


def job_log(run_dir, job_id):
    return (run_dir / f"slurm-{job_id}.out").read_text()


def wait_for_step(run_dir, job_id, step, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / f"slurm-{job_id}.out"
        steps = (
            [int(s) for s in re.findall(r"pretrain step (\d+)/", path.read_text())] if path.exists() else []
        )
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not reach step {step}")


def expedite_requeued(slurm, job_id, timeout=120):
    """Slurm makes a requeued job wait about two minutes before it is eligible again; the test
    brings its start forward once it is pending again (requeue and resume are unchanged). Not to
    `now`: slurmd refuses a batch launch within the second its credential was revoked by the
    requeue ("Job credential revoked"), and the job then ends FAILED; a few seconds later is safe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if slurm.job_state(job_id) == "PENDING" and int(slurm.job_field(job_id, "Restarts") or 0) >= 1:
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3", check=False)
            return
        time.sleep(0.5)


def test_submitted_pretraining_runs_to_the_end(slurm, tmp_path, fmnist_shards):
    run = tmp_path / "run"
    job = pretrain_job(slurm, run, fmnist_shards["train"])
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert final == "COMPLETED", job_log(run, job) + slurm.log_tail()
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["step"] == 16
    assert list((run / "tb").glob("events.out.tfevents.*"))
    log = job_log(run, job)
    assert f"[mim] job {job} stage pretrain start" in log and "status 0" in log and "eta" in log


@pytest.mark.parametrize("how", ["usr1", "requeue"])
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path, fmnist_shards, how):
    run = tmp_path / "run"
    long_run = (
        "schedule.epochs=25",
        "log.every=5",
        "run.checkpoint_every=40",
        "run.stop_check_every=1",
        "log.recon_every=0",
    )  # 200 steps of 8 samples: preempted well before the end
    job = pretrain_job(slurm, run, fmnist_shards["train"], *long_run)
    reached = wait_for_step(run, job, 60)
    if how == "usr1":
        slurm.run("scancel", "--signal=USR1", "--batch", job)
    else:
        slurm.run("scontrol", "requeue", job)
    expedite_requeued(slurm, job)
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    assert final == "COMPLETED", job_log(run, job) + slurm.log_tail()
    log = job_log(run, job)
    assert int(slurm.job_field(job, "Restarts")) >= 1
    stopped = [int(s) for s in re.findall(r"stopped at step (\d+) of 200 \(signal\)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from .* at step (\d+)", log)]
    assert resumed, log[-3000:]
    if how == "usr1":  # nothing lost: the run resumes exactly where the signal stopped it
        assert stopped and stopped[0] >= reached and resumed[0] == stopped[0]
    else:  # nothing lost beyond the last periodic checkpoint before the requeue
        assert resumed[0] >= (reached // 40) * 40
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["step"] == 200


def test_chain_pretrain_export_linprobe(slurm, tmp_path, fmnist_shards):
    root = tmp_path / "chain"
    jobs = submit(
        slurm,
        "chain",
        "--config",
        "configs/pretrain/debug.yaml",
        "--linprobe-config",
        "configs/linprobe/debug.yaml",
        f"--run-root={root}",
        f"pretrain.data.train={fmnist_shards['train']}",
        *(f"pretrain.{o}" for o in GREY),
        f"linprobe.data.train={fmnist_shards['train']}",
        f"linprobe.data.val={fmnist_shards['val']}",
        "linprobe.data.mean=[0.286]",
        "linprobe.data.std=[0.353]",
        "linprobe.schedule.epochs=1",
    )
    assert len(jobs) == 3
    for job in jobs:
        assert slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED", slurm.log_tail()
    assert (root / "export" / "model.safetensors").is_file()
    metrics = json.loads((root / "linprobe" / "metrics.json").read_text())
    assert metrics["final"]["num_samples"] == 250 and "mim export" in metrics["backbone"]


def test_two_tasks_pretrain_through_srun(slurm, tmp_path, fmnist_shards):
    run = tmp_path / "run"
    job = pretrain_job(slurm, run, fmnist_shards["train"], "deepspeed.zero_stage=2", tasks=2)
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert final == "COMPLETED", job_log(run, job) + slurm.log_tail()
    assert "2 process(es)" in job_log(run, job)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["world_size"] == 2 and meta["step"] == 8  # 64 samples/epoch, 2 x 8 per step, 2 epochs


def test_second_job_on_the_same_run_dir_fails_fast(slurm, tmp_path, fmnist_shards):
    run = tmp_path / "run"
    first = pretrain_job(slurm, run, fmnist_shards["train"], "schedule.epochs=100", "log.every=5")
    wait_for_step(run, first, 5)
    result = run_cli(
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={fmnist_shards['train']}",
        f"run.dir={run}",
        *GREY,
    )
    assert result.returncode == 2 and "is in use by another process" in result.stderr
    assert f'"slurm_job_id": "{first}"' in result.stderr
    slurm.run("scancel", first)
