"""Stop signals where no step completes: SIGTERM while the data loader waits on a server that never
answers (a real HTTP server on 127.0.0.1 that stops answering), and inside an evaluation. The
process stops within seconds; on one process it checkpoints its last completed step, and a stop
before any step writes nothing. (Stops that wait for an agreed step are in test_slurm*.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mim import checkpoint
from tests.conftest import GREY, REPO, cli_env, start_cli_ranks
from tests.http_server import FlakyServer

pytestmark = pytest.mark.slow
STOP_WITHIN = 10.0  # seconds from SIGTERM to exit


@pytest.fixture()
def server(fmnist_shards):
    with FlakyServer(fmnist_shards["train"].parent) as running:
        yield running


def start(log_path, *args, **env):
    log = open(log_path, "w")  # noqa: SIM115 - a file, not a pipe: an unread pipe would stall it
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=cli_env(**env), stdout=log, stderr=log
    )


def wait_for_line(process, log_path, text, timeout=120.0):
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {log_path.read_text()[-3000:]}"
        time.sleep(0.05)


def stop_and_time(process, log_path):
    """SIGTERM, then the seconds until the process has exited."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 60 s after SIGTERM: {log_path.read_text()[-3000:]}")
    return time.monotonic() - sent


def pretrain_args(run_dir, train, *overrides):
    return (
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={train}",
        f"run.dir={run_dir}",
        *GREY,
        "schedule.epochs=20",  # more steps than the answered shards hold
        "data.shards_per_chunk=1",
        "data.shuffle_buffer=16",
        "log.every=1",
        "log.recon_every=0",
        "data.read_retries=0",
        *overrides,
    )


def test_sigterm_while_the_loader_waits_on_a_silent_server_checkpoints_the_last_step(tmp_path, server):
    server.answered_tars = 2  # each of the 2 workers gets its first shard, then nothing ever again
    log_path = tmp_path / "out.log"
    process = start(log_path, *pretrain_args(tmp_path / "run", f"{server.url}/train/", "data.num_workers=2"))
    wait_for_line(process, log_path, "pretrain step 20/")  # 2 x 120 samples: 30 steps, then a wait
    time.sleep(2.0)
    took = stop_and_time(process, log_path)
    log = log_path.read_text()
    assert process.returncode == 0 and took < STOP_WITHIN, (took, log[-3000:])
    assert "SIGTERM received while waiting for training data" in log
    steps = [
        int(line.split("pretrain step ")[1].split("/")[0])
        for line in log.splitlines()
        if "pretrain step " in line
    ]
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert latest is not None and checkpoint.read_meta(latest)["step"] == max(steps)  # its last step


def test_sigterm_during_start_up_on_a_silent_server_exits_and_writes_nothing(tmp_path, server):
    server.answered_tars = 0
    log_path = tmp_path / "out.log"
    process = start(log_path, *pretrain_args(tmp_path / "run", f"{server.url}/train/", "data.num_workers=0"))
    wait_for_line(process, log_path, "effective batch")  # the loop has started: its first read hangs
    time.sleep(1.0)
    took = stop_and_time(process, log_path)
    log = log_path.read_text()
    assert process.returncode == 0 and took < STOP_WITHIN, (took, log[-3000:])
    assert "SIGTERM received while waiting for training data" in log
    assert "without a new checkpoint" in log
    assert checkpoint.latest_checkpoint(tmp_path / "run") is None


def test_a_stop_signal_in_the_first_second_ends_in_a_clean_exit(tmp_path, fmnist_shards):
    """Before the handlers of old were installed (while Python imports torch) SIGTERM killed the
    process outright: no requeue under Slurm."""
    log_path = tmp_path / "out.log"
    process = start(log_path, *pretrain_args(tmp_path / "run", fmnist_shards["train"]))
    time.sleep(0.3)
    took = stop_and_time(process, log_path)
    log = log_path.read_text()
    assert process.returncode == 0 and took < STOP_WITHIN + 20, (process.returncode, took, log[-3000:])
    assert "received signal SIGTERM" in log and "Traceback" not in log
    latest = checkpoint.latest_checkpoint(tmp_path / "run")  # where start-up ended within the grace
    assert latest is None or checkpoint.verify(latest)


def test_a_stop_signal_while_the_shard_index_is_fetched_exits_cleanly_and_writes_nothing(tmp_path, server):
    server.silent.add("train/_info.json")
    log_path = tmp_path / "out.log"
    process = start(log_path, *pretrain_args(tmp_path / "run", f"{server.url}/train/"))
    deadline = time.monotonic() + 120
    while not server.requests["train/_info.json"]:  # the config check waits on the index
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    took = stop_and_time(process, log_path)
    log = log_path.read_text()
    assert process.returncode == 0 and took < STOP_WITHIN, (process.returncode, took, log[-3000:])
    assert "SIGTERM received while starting up" in log and "nothing written" in log
    assert not (tmp_path / "run").exists()


def test_two_ranks_one_waiting_on_a_silent_server_both_stop_within_seconds(tmp_path, server):
    """Each rank gets the signal, as srun gives it to each task: the rank waiting on data stops
    after the grace; its peer, blocked in the step's all-reduce, sees the collective fail and stops
    too, instead of a traceback that would fail the Slurm job."""
    server.answered_tars = 1  # one rank gets a shard and waits in the all-reduce; the other waits on data
    args = pretrain_args(tmp_path / "run", f"{server.url}/train/", "data.num_workers=1")
    ranks, logs = start_cli_ranks(2, args, tmp_path)
    wait_for_line(ranks[0], logs[0], "effective batch")
    time.sleep(2.0)
    sent = time.monotonic()
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    for rank in ranks:
        rank.wait(timeout=60)
    took, text = time.monotonic() - sent, logs[0].read_text() + logs[1].read_text()
    assert [rank.returncode for rank in ranks] == [0, 0] and took < STOP_WITHIN, (took, text[-3000:])
    assert "SIGTERM received while waiting for training data" in text
    assert "a collective failed after the stop signal" in text
    assert "Traceback" not in text
    assert checkpoint.latest_checkpoint(tmp_path / "run") is None


def test_sigterm_inside_an_evaluation_stops_within_seconds(tmp_path, server, fmnist_shards):
    server.answered_tars = 0  # the validation split is behind the silent server
    log_path = tmp_path / "out.log"
    process = start(
        log_path,
        "linprobe",
        "--config",
        "configs/linprobe/debug.yaml",
        f"data.train={fmnist_shards['train']}",
        f"data.val={server.url}/val/",
        f"run.dir={tmp_path / 'run'}",
        *GREY,
        "model.name=mae_vit_debug",
        "init.from=none",
        "schedule.epochs=1",
        "probe.cache_features=false",
        "data.read_retries=0",
        "eval.holdout=0",  # every evaluation reads data.val, behind the silent server
    )
    wait_for_line(process, log_path, "linprobe step 30/")  # the last step: the evaluation follows
    time.sleep(2.0)
    took = stop_and_time(process, log_path)
    log = log_path.read_text()
    assert process.returncode == 0 and took < STOP_WITHIN, (took, log[-3000:])
    assert "SIGTERM received while evaluating" in log
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert latest is not None and checkpoint.read_meta(latest)["step"] == 30
