"""Runs that heal themselves, through the real CLI with faults injected (MIM_FAULT): a NaN on one
rank of two and a loss spike are rolled back and the run finishes by itself; repeated divergence
stops after run.max_rollbacks with the last good checkpoint intact; a rank that stops answering
makes both ranks write their stacks and exit to be requeued. (The requeue under a real Slurm is in
test_slurm.py.)"""

from __future__ import annotations

import datetime
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from mim.engine.watchdog import EXIT_HUNG
from tests.conftest import GREY, run_cli, run_cli_ranks, start_cli_ranks

pytestmark = pytest.mark.slow


def args(run_dir, shards, *overrides):
    return [
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",  # 16 steps, a checkpoint every 4, a log line every 2
        f"data.train={shards}",
        f"run.dir={run_dir}",
        "log.recon_every=0",
        *GREY,
        *overrides,
    ]


def final_weights(run_dir):
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / checkpoint.WEIGHTS_FILE))


def rollbacks(run_dir):
    return json.loads((run_dir / "rollbacks.json").read_text())["rollbacks"]


def test_nan_on_one_rank_of_two_is_rolled_back_and_ends_as_skipping_that_data_on_purpose(
    tmp_path, fmnist_shards
):
    step = random.SystemRandom().randint(5, 13)  # a step after the first checkpoint (step 4)
    two_ranks = ("data.batch_size=4", "run.skip_window=3")
    healed = tmp_path / "healed"
    result = run_cli_ranks(
        2, *args(healed, fmnist_shards["train"], *two_ranks), MIM_FAULT=f"nan@{step}:rank1"
    )
    assert result.returncode == 0, (step, result.stderr[-3000:])
    [record] = rollbacks(healed)
    restored = record["restored_step"]
    assert record["cause"] == "non-finite" and record["first_bad_step"] == step, record
    assert restored == (step - 1) // 4 * 4 and record["skipped_steps"] == record["detected_at"] - restored + 3
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(healed))
    assert meta["step"] == 16 and meta["rollbacks"] == [record]
    assert "rollback 1 of at most 3" in result.stderr
    events = EventAccumulator(str(healed / "tb")).Reload()
    [logged] = events.Scalars("healing/rollbacks")
    assert (logged.step, logged.value) == (restored, 1.0)
    # The same data skipped from the same checkpoint on purpose: a run stopped at that checkpoint,
    # given the record, resumes and skips it (as a run requeued after its rollback does).
    on_purpose = tmp_path / "on-purpose"
    stopped = run_cli_ranks(
        2, *args(on_purpose, fmnist_shards["train"], *two_ranks, f"run.stop_after={restored}")
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    shutil.copy(healed / "rollbacks.json", on_purpose / "rollbacks.json")
    resumed = run_cli_ranks(2, *args(on_purpose, fmnist_shards["train"], *two_ranks))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping the data of {record['skipped_steps']} steps" in resumed.stderr
    expected, got = final_weights(on_purpose), final_weights(healed)
    assert all(torch.equal(expected[k], got[k]) for k in expected), step


def lr_at(run_dir, step):
    """The lr TensorBoard last recorded for `step` (a rolled-back run records a step again)."""
    return [
        e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/lr") if e.step == step
    ][-1]


def test_a_loss_spike_is_caught_at_its_step_and_a_healthy_run_never_rolls_back(tmp_path, fmnist_shards):
    watched = ("run.spike_window=3", "run.spike_threshold=2")  # the debug run's warm-up is 8 steps
    lower = ("run.rollback_lr_scale=0.5", "run.rollback_lr_steps=4")
    spiked = run_cli(
        *args(tmp_path / "spiked", fmnist_shards["train"], *watched, *lower), MIM_FAULT="spike@11"
    )
    assert spiked.returncode == 0, spiked.stderr[-3000:]
    [record] = rollbacks(tmp_path / "spiked")
    assert (record["cause"], record["first_bad_step"], record["restored_step"]) == ("spike", 11, 8), record
    assert "a loss spike at step 11" in spiked.stderr
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path / "spiked"))["step"] == 16
    healthy = run_cli(*args(tmp_path / "healthy", fmnist_shards["train"], *watched))
    assert healthy.returncode == 0, healthy.stderr[-3000:]
    assert not (tmp_path / "healthy" / "rollbacks.json").exists() and "rollback" not in healthy.stderr
    # the 4 steps after the restored one (8) ran at half the schedule's lr, and then at the schedule's
    for step, scale in ((10, 0.5), (12, 0.5), (14, 1.0)):
        assert lr_at(tmp_path / "spiked", step) == pytest.approx(scale * lr_at(tmp_path / "healthy", step))


def test_repeated_divergence_stops_after_max_rollbacks_with_the_last_good_checkpoint_intact(
    tmp_path, fmnist_shards
):
    run = tmp_path / "run"
    result = run_cli(
        *args(run, fmnist_shards["train"], "run.max_rollbacks=2", "run.stop_after=5"),
        MIM_FAULT="nan@5,nan@5,nan@5",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "stopped (run.max_rollbacks=2 reached)" in result.stderr and "last good one" in result.stderr
    assert [r["rollback"] for r in rollbacks(run)] == [1, 2]
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000004"]
    assert checkpoint.verify(checkpoint.latest_checkpoint(run))  # every file as its manifest says
    assert all(torch.isfinite(v).all() for v in final_weights(run).values())


def test_a_rank_that_stops_answering_makes_both_write_their_stacks_and_exit_to_be_requeued(
    tmp_path, fmnist_shards
):
    run, timeout = tmp_path / "run", 6
    overrides = args(run, fmnist_shards["train"], f"run.hang_timeout={timeout}")
    ranks, logs = start_cli_ranks(2, overrides, tmp_path, MIM_FAULT="hang@6:rank1")
    for process in ranks:
        process.wait(timeout=180)
    ended = datetime.datetime.now()
    text = logs[0].read_text() + logs[1].read_text()
    assert [process.returncode for process in ranks] == [EXIT_HUNG, EXIT_HUNG], text[-3000:]
    # from the start of step 6 (the hang) to the exit of both: the timeout and a few seconds
    [hung_at] = [line[:23] for line in text.splitlines() if "injecting hang at step 6" in line]
    took = (ended - datetime.datetime.strptime(hung_at, "%Y-%m-%d %H:%M:%S,%f")).total_seconds()
    assert timeout <= took < timeout + 6, (took, text[-3000:])
    stacks = {rank: (run / "stacks" / f"rank-{rank:05d}.txt").read_text() for rank in range(2)}
    assert "mim/engine/faults.py" in stacks[1] and "no step completed" in stacks[0], stacks
    assert "stacks written to" in text and "Traceback" not in text
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["step"] == 4
