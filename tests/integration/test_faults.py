"""Fault injection through the real CLI on small runs: kill -9 (also mid-checkpoint), a loss that
goes non-finite, a full disk, a second process on the same run dir, a checkpoint of another
model; each must leave a run that resumes from its newest complete checkpoint and loses nothing."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from mim import checkpoint
from tests.conftest import GREY, REPO, cli_env, run_cli

pytestmark = pytest.mark.slow


def args(run_dir, shards, *overrides):
    return [
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={shards}",
        f"run.dir={run_dir}",
        *GREY,
        *overrides,
    ]


def start(run_dir, shards, *overrides, **env):
    """A pretraining process in the background (ENV added to its environment); its output goes to a
    file (an unread pipe would fill up and stall it)."""
    log_file = open(run_dir.parent / f"{run_dir.name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args(run_dir, shards, *overrides)],
        cwd=REPO,
        env=cli_env(**env),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )


def weights(run_dir):
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / checkpoint.WEIGHTS_FILE))


def wait_for(condition, timeout=120.0, interval=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met")


def wait_for_checkpoint(run_dir, newer_than=None):
    wait_for(lambda: checkpoint.latest_checkpoint(run_dir) not in (None, newer_than), interval=0.02)


def test_kill_9_at_random_moments_then_resume_gives_identical_weights(tmp_path, fmnist_shards):
    common = (
        "schedule.epochs=8",
        "run.checkpoint_every=1",
        "log.every=4",
        "data.num_workers=1",
        "run.keep_last=2",
    )
    straight = run_cli(*args(tmp_path / "straight", fmnist_shards["train"], *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run, rng, killed_mid_write = tmp_path / "killed", random.Random(0), 0
    for attempt in range(4):
        process = start(run, fmnist_shards["train"], *common)
        before = checkpoint.latest_checkpoint(run)
        wait_for_checkpoint(run, newer_than=before)
        if attempt % 2:  # at a random moment
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # while a checkpoint is being written: its temporary directory exists
            wait_for(lambda: list((run / "checkpoints").glob(".tmp-step-*")))
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_mid_write += bool(list((run / "checkpoints").glob(".tmp-step-*")))
        latest = checkpoint.latest_checkpoint(run)
        assert latest is not None and (before is None or latest.name >= before.name)
        checkpoint.read_meta(latest)  # the newest complete checkpoint is whole
    resumed = run_cli(*args(run, fmnist_shards["train"], *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert killed_mid_write >= 1  # at least one kill landed while a checkpoint was being written
    expected, got = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    result = run_cli(
        *args(
            run,
            fmnist_shards["train"],
            "optim.lr=1.0e+12",
            "schedule.warmup_epochs=0",
            "run.checkpoint_every=1",
            "log.every=1",
            "model.norm_pix_loss=false",
            "run.on_divergence=stop",
        )
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert (
        "the loss or the gradient norm became NaN/inf at step" in result.stderr
        and "last good one" in result.stderr
    )
    last_good = checkpoint.latest_checkpoint(run)
    assert last_good is not None
    assert all(torch.isfinite(v).all() for v in load_file(str(last_good / checkpoint.WEIGHTS_FILE)).values())


def with_junk_shard(folder, fmnist_shards, good, junk):
    """`good` real training shards and junk-000000.tar: `junk` samples that are not images."""
    folder.mkdir()
    for tar in sorted(fmnist_shards["train"].glob("*.tar"))[:good]:
        (folder / tar.name).write_bytes(tar.read_bytes())
    with wds.TarWriter(str(folder / "junk-000000.tar"), encoder=False) as writer:
        for index in range(junk):
            writer.write({"__key__": f"{index:06d}", "png": b"\x89PNG not really", "cls": b"0"})
    return folder


def test_too_many_bad_samples_stops_naming_the_worst_shards(tmp_path, fmnist_shards):
    """Good shards plus one of corrupt images: past data.max_bad_fraction the run stops (exit 3)
    with an error naming that shard, after writing nothing from the bad stretch."""
    shards = with_junk_shard(tmp_path / "shards", fmnist_shards, good=3, junk=60)
    run = tmp_path / "run"
    result = run_cli(*args(run, shards, "data.max_bad_fraction=0.05", "data.shards_per_chunk=1"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "bad samples out of" in result.stderr and "worst shards: junk-000000.tar (" in result.stderr
    assert "train-00000" not in result.stderr.split("worst shards:")[1].split(";")[0]


def test_bad_sample_counts_travel_in_the_checkpoint_across_a_resume(tmp_path, fmnist_shards):
    """The bad samples of each shard are a rank part of the checkpoint: a run stopped and resumed
    ends with the same counts as a straight run (so data.max_bad_fraction is of everything read)."""
    shards = with_junk_shard(tmp_path / "shards", fmnist_shards, good=1, junk=20)

    def bad_counts(run):
        state = torch.load(checkpoint.latest_checkpoint(run) / "rank-00000.pt", weights_only=False)
        return state["bad_samples"]["by_shard"]

    lenient = ("data.max_bad_fraction=0.9", "data.shards_per_chunk=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*args(straight, shards, *lenient)).returncode == 0
    first = run_cli(*args(resumed, shards, *lenient, "run.stop_after=8"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert run_cli(*args(resumed, shards, *lenient)).returncode == 0
    assert bad_counts(straight) == bad_counts(resumed) and bad_counts(straight).get("junk-000000.tar", 0) > 0


def _file_size_limit(limit_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_full_disk_while_checkpointing_is_a_clear_error_and_the_previous_checkpoint_loads(
    tmp_path, fmnist_shards
):
    run = tmp_path / "run"
    first = run_cli(*args(run, fmnist_shards["train"], "run.stop_after=4", "run.checkpoint_every=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    good = checkpoint.latest_checkpoint(run)
    before = {p.name: p.stat().st_mtime_ns for p in good.iterdir()}
    # A file-size limit below the checkpoint's size: writes fail with EFBIG, as on a full disk.
    full = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args(run, fmnist_shards["train"], "run.checkpoint_every=4")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(60_000),
    )
    assert full.returncode == 3, full.stderr[-3000:]
    assert "could not write the checkpoint of step 8" in full.stderr and "is untouched" in full.stderr
    assert checkpoint.latest_checkpoint(run) == good
    assert {p.name: p.stat().st_mtime_ns for p in good.iterdir()} == before
    assert not list((run / "checkpoints").glob(".tmp-step-*"))
    again = run_cli(*args(run, fmnist_shards["train"]))
    assert again.returncode == 0 and "at step 4" in again.stderr


def test_second_process_on_the_same_run_dir_is_refused(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    first = start(run, fmnist_shards["train"], "schedule.epochs=200", "run.checkpoint_every=1000")
    try:
        wait_for_lock_holder(run)
        second = run_cli(*args(run, fmnist_shards["train"]))
        assert second.returncode == 2
        assert "in use by another process" in second.stderr and f'"pid": {first.pid}' in second.stderr
    finally:
        first.kill()
        first.wait()
    after_death = run_cli(
        *args(run, fmnist_shards["train"], "schedule.epochs=1")
    )  # a killed holder frees the lock
    assert after_death.returncode == 0, after_death.stderr[-3000:]


def wait_for_lock_holder(run_dir, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run_dir / ".lock"
        if lock.is_file() and lock.read_text().strip():
            return
        time.sleep(0.1)
    raise TimeoutError("the first process never took the lock")


def test_resuming_with_another_architecture_is_refused(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    assert run_cli(*args(run, fmnist_shards["train"], "run.stop_after=2")).returncode == 0
    listing = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = run_cli(*args(run, fmnist_shards["train"], "model.depth=3"))
    assert (
        result.returncode == 2
        and "cannot resume from" in result.stderr
        and "use a new run.dir" in result.stderr
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == listing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("optim.blrr=1",), "did you mean 'optim.blr'"),
        (("data.batch_size=[1]",), "expects int"),
        (("optim.accum_steps=0",), "'optim.accum_steps' must be >= 1, got 0"),
        (("model.img_size=30",), "not a multiple of model.patch_size"),
        (("data.train=/nonexistent/train-{000000..000009}.tar",), "missing file"),
        (("init.from=/etc/hostname",), "not a weights file that loads safely"),
        (("data.shuffle_buffer=0",), "'data.shuffle_buffer' must be >= 1, got 0"),
        (("data.read_retries=-1",), "'data.read_retries' must be >= 0, got -1"),
        (
            ("run.stop_check_every=0",),
            "'run.stop_check_every' must be >= 1, got 0",
        ),  # was a ZeroDivisionError
        (
            ("data.train=http://127.0.0.1:9/shards/_info.json", "data.read_retries=0"),
            "cannot read the shard index",
        ),
        (("run.keep_last=1",), "run.on_divergence=rollback needs run.keep_last >= 2"),
        (("MIM_FAULT=nan@soon",), "MIM_FAULT: cannot read 'nan@soon'"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, fmnist_shards, overrides, message):
    env = dict(o.split("=", 1) for o in overrides if o.startswith("MIM_"))
    overrides = [o for o in overrides if not o.startswith("MIM_")]
    result = run_cli(*args(tmp_path / "run", fmnist_shards["train"], *overrides), **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_paths(tmp_path, fmnist_shards):
    (tmp_path / "file").write_text("not a directory")
    result = run_cli(*args(tmp_path / "file", fmnist_shards["train"]))
    assert result.returncode == 2 and "exists and is not a directory" in result.stderr
    result = run_cli("pretrain", "--config", str(tmp_path), f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "does not exist" in result.stderr
    fifo = tmp_path / "not-readable"
    os.mkfifo(fifo)
    result = run_cli(*args(tmp_path / "run", fifo))
    assert result.returncode == 2 and "not-readable" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["run.checkpoint_every=0", "log.every=0"])
def test_a_probe_checks_the_loops_cadences_before_any_work(tmp_path, fmnist_shards, override):
    result = run_cli(
        "linprobe",
        "--config",
        "linprobe/debug",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        f"run.dir={tmp_path / 'run'}",
        "init.from=none",
        "model.name=mae_vit_debug",
        *GREY,
        override,
    )
    name = override.split("=")[0]
    assert result.returncode == 2 and f"{name!r} must be >= 1, got 0" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
