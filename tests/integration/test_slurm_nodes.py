"""Many nodes against a real two-node Slurm cluster on this machine: slurmctld and two slurmd
daemons (`slurmd -N n1`, `slurmd -N n2`, node addresses 127.0.0.2 and 127.0.0.3), started by the
fixture. A job with `mim submit --nodes 2` runs one task per node, so rank 1 lives on another
Slurm node than rank 0 and finds the rendezvous through the node list, as on a real cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch

from mim import checkpoint
from mim.distributed import rendezvous_host
from tests.conftest import GREY, run_cli_ranks
from tests.slurm_cluster import chain_arguments, job_log, running_cluster, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TOTAL_STEPS = 100
# 2 ranks x 8 samples per step, 64 samples per epoch: 4 steps per epoch, 25 epochs
LONG_RUN = (
    "configs/pretrain/debug.yaml",
    *GREY,
    "schedule.epochs=25",
    "log.every=5",
    "log.recon_every=0",
    "run.checkpoint_every=20",
    "run.stop_check_every=1",
)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster


def pretrain_on_two_nodes(cluster, run_dir, shards):
    config, *overrides = LONG_RUN
    return cluster.submit(
        "pretrain",
        "--nodes=2",
        "--config",
        config,
        f"data.train={shards}",
        f"run.dir={run_dir}",
        *overrides,
        # left over in the submitting shell (sbatch passes it on): not an address of this job
        MASTER_ADDR="192.0.2.1",
        MASTER_PORT="9",
    )[0]


def finish(cluster, run_dir, job):
    final = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"), timeout=600)
    assert final == "COMPLETED", job_log(run_dir, job)[-4000:] + cluster.log_tail()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_weights(checkpoint.latest_checkpoint(run_dir))


def assert_same_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(two_nodes, tmp_path_factory, fmnist_shards):
    """The reference: the long run on two nodes, never stopped."""
    run = tmp_path_factory.mktemp("two-nodes") / "run"
    job = pretrain_on_two_nodes(two_nodes, run, fmnist_shards["train"])
    finish(two_nodes, run, job)
    return run, job


def test_rendezvous_is_the_first_node_by_its_slurm_address_when_its_name_does_not_resolve(
    two_nodes, monkeypatch
):
    monkeypatch.setenv("SLURM_CONF", str(two_nodes.conf))
    assert rendezvous_host("n[1-2]") == "127.0.0.2"  # n1 is not a host name here: its NodeAddr
    assert rendezvous_host("n2,n1") == "127.0.0.3"
    assert rendezvous_host("localhost") == "localhost"  # a name that resolves is kept


def test_pretraining_on_two_nodes_equals_two_ranks_on_one_node(uninterrupted, tmp_path, fmnist_shards):
    run, job = uninterrupted
    log = job_log(run, job)
    assert f"[mim] job {job} stage pretrain start" in log and "nodes n[1-2]" in log
    assert "2 process(es) on 2 node(s) (slurm), rendezvous 127.0.0.2:" in log
    latest = checkpoint.latest_checkpoint(run)
    meta = checkpoint.read_meta(latest)
    assert meta["step"] == TOTAL_STEPS and meta["world_size"] == 2 and meta["nodes"] == ["n1", "n2"]
    # zero_stage auto: the debug model fits, so stage 0 (mim's overlapped all-reduce across the
    # nodes); each node wrote its own rank state, rank 0 the weights and the optimizer state
    assert meta["engine"]["zero_stage"] == 0
    assert {p.name for p in latest.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    assert (latest / "mp_rank_00_model_states.pt").is_file()
    assert not list(latest.glob("zero_pp_rank_*_optim_states.pt"))

    config, *overrides = LONG_RUN
    one_node = tmp_path / "one-node"
    result = run_cli_ranks(
        2,
        "pretrain",
        "--config",
        config,
        f"data.train={fmnist_shards['train']}",
        f"run.dir={one_node}",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    host = socket.gethostname().split(".")[0]
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(one_node))["nodes"] == [host, host]
    assert_same_weights(final_weights(one_node), final_weights(run))


@pytest.mark.parametrize(
    "to",
    [
        "tasks",  # `scancel --signal=USR1 JOB`: Slurm delivers it to every task, on both nodes
        "batch",  # the time-limit warning (--signal=B:USR1): the batch shell on n1, then srun
    ],
)
def test_usr1_on_both_nodes_checkpoints_once_requeues_and_ends_with_the_same_weights(
    two_nodes, uninterrupted, tmp_path, fmnist_shards, to
):
    run = tmp_path / "run"
    job = pretrain_on_two_nodes(two_nodes, run, fmnist_shards["train"])
    reached = wait_for_step(run, job, 30)
    two_nodes.run("scancel", "--signal=USR1", *(["--batch"] if to == "batch" else []), job)
    two_nodes.expedite_requeued(job)
    finish(two_nodes, run, job)
    log = job_log(run, job)
    assert "[rank 0] WARNING mim.runtime: received signal SIGUSR1" in log
    assert "[rank 1] WARNING mim.runtime: received signal SIGUSR1" in log
    stopped = [int(s) for s in re.findall(rf"stopped at step (\d+) of {TOTAL_STEPS} \(signal\)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from .* at step (\d+)", log)]
    assert len(stopped) == 1 and stopped[0] >= reached and resumed == stopped  # one agreed checkpoint
    assert log.count("nodes n[1-2]") == 2  # the requeued job ran on both nodes again
    assert int(two_nodes.job_field(job, "Restarts")) == 1
    assert_same_weights(final_weights(uninterrupted[0]), final_weights(run))


def task_pids(job: str, node: str) -> list[int]:
    """The processes of `job` that Slurm started on `node` (all nodes share this host), and the
    slurmstepd above each."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"SLURMD_NODENAME={node}".encode() in environ:
            pids.append(int(proc.name))
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"slurmstepd" in Path(f"/proc/{parent}/cmdline").read_bytes():
                pids.append(parent)
    return pids


def test_a_node_that_dies_leaves_the_last_checkpoint_and_the_requeued_job_resumes_from_it(
    two_nodes, uninterrupted, tmp_path, fmnist_shards
):
    run = tmp_path / "run"
    job = pretrain_on_two_nodes(two_nodes, run, fmnist_shards["train"])
    wait_for_step(run, job, 50)
    victims = task_pids(job, "n2")
    assert victims, "no task of the job found on n2"
    for pid in [two_nodes.slurmd_pid("n2"), *victims]:  # n2 dies: its slurmd, slurmstepd and rank 1
        os.kill(pid, signal.SIGKILL)
    # Slurm notices the silent node (SlurmdTimeout), marks it down and requeues the job.
    assert two_nodes.wait_for(job, ("PENDING", "FAILED", "NODE_FAIL", "COMPLETED"), timeout=300) == "PENDING"
    assert two_nodes.node_states()["n2"].startswith("down")
    survivor = checkpoint.latest_checkpoint(run)
    meta = checkpoint.read_meta(survivor)  # complete: the one before the death
    assert 40 <= meta["step"] < TOTAL_STEPS
    two_nodes.start_node("n2")  # the node comes back (ReturnToService=2)
    two_nodes.wait_until_idle(timeout=120)
    two_nodes.expedite_requeued(job)
    finish(two_nodes, run, job)
    log = job_log(run, job)
    assert f"resumed from {survivor} at step {meta['step']}" in log
    assert_same_weights(final_weights(uninterrupted[0]), final_weights(run))


def test_chain_pretrain_export_linprobe_across_two_nodes(two_nodes, tmp_path, fmnist_shards):
    root = tmp_path / "chain"
    pretrain, export, linprobe = two_nodes.submit("chain", "--nodes=2", *chain_arguments(root, fmnist_shards))
    for job in (pretrain, export, linprobe):
        state = two_nodes.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
        assert state == "COMPLETED", two_nodes.log_tail()
    assert [two_nodes.job_field(job, "NumNodes") for job in (pretrain, export, linprobe)] == ["2", "1", "2"]
    for stage in ("pretrain", "linprobe"):
        meta = checkpoint.read_meta(checkpoint.latest_checkpoint(root / stage))
        assert meta["nodes"] == ["n1", "n2"], stage
    assert (root / "export" / "model.safetensors").is_file()
    metrics = json.loads((root / "linprobe" / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 250  # every val sample once across the two nodes


def test_resubmitted_on_one_node_the_run_continues_with_its_effective_batch(
    two_nodes, tmp_path, fmnist_shards
):
    """A user drops from 2 nodes to 1 to get through the queue: the same `mim submit` with
    another --nodes on the run dir continues the run, with the effective batch it was started with."""
    run = tmp_path / "run"
    config, *overrides = LONG_RUN
    common = ("--config", config, f"data.train={fmnist_shards['train']}", f"run.dir={run}", *overrides)
    first = two_nodes.submit("pretrain", "--nodes=2", *common, "run.stop_after=20")[0]
    finish(two_nodes, run, first)
    second = two_nodes.submit("pretrain", "--nodes=1", *common)[0]
    finish(two_nodes, run, second)
    log = job_log(run, second)
    assert "1 process(es) on 1 node(s) (slurm)" in log
    assert (
        "effective batch 16 kept on 1 process(es) (written by 2): data.batch_size 8 -> 8, optim.accum_steps 1 -> 2"
        in log
    )
    assert "resumed from" in log and "at step 20" in log
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["step"] == TOTAL_STEPS and meta["world_size"] == 1 and meta["effective_batch"] == 16
