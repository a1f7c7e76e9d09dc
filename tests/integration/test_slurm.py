"""Against a real Slurm (munged, slurmctld, slurmd on localhost, started by the fixture): submit,
preemption by USR1 and by requeue, chained stages, and a 2-task job through srun."""

from __future__ import annotations

import json
import re
import time

import pytest

from mim import checkpoint
from mim.data.scenes import fashion_mnist_scenes
from mim.data.shards import write_shards
from tests.conftest import FASHION_MNIST, GREY, run_cli
from tests.slurm_cluster import chain_arguments, job_log, running_cluster, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def pretrain_job(slurm, run_dir, shards, *overrides, tasks=1):
    return slurm.submit(
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={shards}",
        f"run.dir={run_dir}",
        f"--tasks-per-node={tasks}",
        *GREY,
        *overrides,
    )[0]


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
    slurm.expedite_requeued(job)
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


def test_a_hung_job_is_requeued_by_its_watchdog_and_finishes(slurm, tmp_path, fmnist_shards):
    run = tmp_path / "run"
    [job] = slurm.submit(
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={fmnist_shards['train']}",
        f"run.dir={run}",
        *GREY,
        "run.hang_timeout=5",
        MIM_FAULT="hang@6",  # fires once in the run: the requeued job passes step 6
    )
    slurm.expedite_requeued(job, timeout=180)
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    log = job_log(run, job)
    assert final == "COMPLETED", log[-3000:] + slurm.log_tail()
    assert int(slurm.job_field(job, "Restarts")) >= 1
    assert "no step completed for" in log and "requeued Slurm job" in log
    assert "mim/engine/faults.py" in (run / "stacks" / "rank-00000.txt").read_text()
    assert re.search(r"resumed from .*step-00000004 at step 4", log), log[-3000:]
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["step"] == 16


@pytest.fixture(scope="module")
def scene_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    for split, count in (("train", 96), ("val", 24)):
        write_shards(
            fashion_mnist_scenes(FASHION_MNIST, split), root / split, name=split, shard_size=48, limit=count
        )
    return {split: root / split for split in ("train", "val")}


def test_chain_pretrain_export_linprobe_segprobe(slurm, tmp_path, fmnist_shards, scene_shards):
    root = tmp_path / "chain"
    jobs = slurm.submit("chain", *chain_arguments(root, fmnist_shards, scene_shards))
    assert len(jobs) == 4
    for job in jobs:
        assert slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED", slurm.log_tail()
    assert (root / "export" / "model.safetensors").is_file()
    metrics = json.loads((root / "linprobe" / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 250 and "mim export" in metrics["backbone"]
    dense = json.loads((root / "segprobe" / "metrics.json").read_text())
    assert dense["test"]["num_samples"] == 24 and "mim export" in dense["backbone"]
    assert len(dense["test"]["iou"]) == 11 and (root / "segprobe" / "segmentation.png").is_file()


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


def test_a_requeued_job_whose_newest_checkpoint_is_damaged_resumes_from_the_one_before(
    slurm, tmp_path, fmnist_shards
):
    """The checkpoint written at the preemption signal is damaged while the job waits to be
    requeued (a node dying mid-write, a flaky filesystem): the requeued job sets it aside and
    resumes from the previous one, instead of crash-looping or training on garbage."""
    run = tmp_path / "run"
    long_run = (
        "schedule.epochs=250",
        "log.every=5",
        "run.checkpoint_every=40",
        "run.stop_check_every=1",
        "log.recon_every=0",
    )
    job = pretrain_job(slurm, run, fmnist_shards["train"], *long_run)
    wait_for_step(run, job, 45)  # checkpoint 40 written; 2000 steps: far from the end
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 120
    while not re.search(r"stopped at step \d+ of 2000 \(signal\)", job_log(run, job)):
        assert time.monotonic() < deadline, job_log(run, job)[-3000:]
        time.sleep(0.2)
    stopped = int(re.search(r"stopped at step (\d+) of 2000 \(signal\)", job_log(run, job)).group(1))
    *_, previous, newest = checkpoint.complete_checkpoints(run)
    assert newest.name == checkpoint.step_name(stopped)
    target = newest / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # cut short
    slurm.expedite_requeued(job)
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    log = job_log(run, job)
    assert final == "COMPLETED", log[-3000:] + slurm.log_tail()
    assert f"checkpoint {newest} is damaged: {target} is " in log and "set aside as damaged-" in log
    assert f"resumed from {previous} at step {int(previous.name[5:])}" in log, log[-3000:]
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["step"] == 2000
