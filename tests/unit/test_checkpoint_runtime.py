"""Checkpoint discovery and retention, the run-dir lock, and reading the launcher's environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mim import checkpoint
from mim.distributed import read_dist_env
from mim.runtime import RunDirBusy, RunLock


def _fake_checkpoint(run_dir, step, complete=True):
    directory = run_dir / "checkpoints" / checkpoint.step_name(step)
    directory.mkdir(parents=True)
    if complete:
        (directory / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    return directory


def test_latest_ignores_incomplete_and_temporary(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "checkpoints" / checkpoint.temporary_name(40)).mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000010"


def test_prune_keeps_last_k_and_removes_leftovers(tmp_path):
    for step in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / checkpoint.temporary_name(25)).mkdir()
    checkpoint.prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000015", "step-00000020"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_read_meta_of_a_non_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a complete mim checkpoint"):
        checkpoint.read_meta(tmp_path)


def test_run_lock_refuses_a_second_holder_and_frees_on_death(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; sys.path.insert(0, '.'); from mim.runtime import RunLock; "
                f"lock = RunLock(__import__('pathlib').Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirBusy, match=f'in use by another process .*"pid": {holder.pid}'):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_dist_env_from_slurm_and_torchrun():
    slurm = read_dist_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "SLURM_JOB_ID": "1234",
            "SLURM_JOB_NODELIST": "gpu-a",
            "SLURM_JOB_NUM_NODES": "4",
            "SLURM_NODEID": "2",
            "SLURMD_NODENAME": "gpu-c",
            "MASTER_ADDR": "10.0.0.9",  # left over in the submitting shell: not this job's
            "MASTER_PORT": "1234",
        }
    )
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.launcher) == (5, 1, 8, "slurm")
    assert (slurm.node, slurm.node_rank, slurm.num_nodes) == ("gpu-c", 2, 4)
    assert slurm.master_port == 20000 + 1234 and slurm.master_addr == "gpu-a"
    torchrun = read_dist_env(
        {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1111"}
    )
    across_nodes = read_dist_env(
        {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1"}
    )
    assert (across_nodes.node_rank, across_nodes.num_nodes) == (1, 2)
    assert (torchrun.rank, torchrun.world_size, torchrun.master_port, torchrun.launcher) == (
        1,
        2,
        1111,
        "torchrun",
    )
    single = read_dist_env({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")
