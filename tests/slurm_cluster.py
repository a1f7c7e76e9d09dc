"""A real Slurm cluster on localhost for the tests: munged, slurmctld and one slurmd per node,
started from a temporary directory (own munge key and socket, own slurm.conf through SLURM_CONF),
so no system configuration is changed; stopped by pid afterwards.

One node (`LocalSlurm(root)`) is this host under its own name. Several nodes
(`LocalSlurm(root, nodes=2)`) are slurmd daemons side by side on this host, `slurmd -N n1`,
`slurmd -N n2`, each with its own port, spool dir, pid file and log, and each node's address a
loopback address of its own (n1 127.0.0.2, n2 127.0.0.3). The names n1, n2 do not resolve on
this host, as on clusters whose DNS does not know the Slurm node names: the node address comes
from Slurm (`scontrol show node`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GREY, run_cli

PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            "Slurm is not installed and this is not root (apt-get install slurm-wlm munge)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        capture_output=True,
    )


SLURM_CONF = """\
ClusterName=mimtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
FirstJobId={first_job_id}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=10
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _first_job_id() -> int:
    """Job ids of their own for the clusters of each pytest-xdist worker: mim derives a job's
    rendezvous port from its id, and two test clusters running side by side on this machine would
    otherwise both start at job 1 and collide on the same port (EADDRINUSE)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return 1 + 1000 * (int(worker) if worker.isdigit() else 0)


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 1) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # node name -> its address (None: this host under its own name)
        self.nodes: dict[str, str | None] = (
            {self.host: None} if nodes == 1 else {f"n{i}": f"127.0.0.{i + 1}" for i in range(1, nodes + 1)}
        )

    def _node_lines(self) -> str:
        lines = []
        for name, address in self.nodes.items():
            if address is None:
                lines.append(f"NodeName={name} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN")
            else:  # one CPU each: a job gets whole nodes only by asking for several
                lines.append(
                    f"NodeName={name} NodeHostname={self.host} NodeAddr={address} "
                    f"Port={_free_port()} CPUs=1 RealMemory=4000 State=UNKNOWN"
                )
        return "\n".join(lines)

    def start(self) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd and munged needs root")
        ensure_installed()
        for sub in ("munge", "state", *(f"spool-{name}" for name in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = self.root / "munge"
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ],
            check=True,
            capture_output=True,
        )
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                root=self.root,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                node_lines=self._node_lines(),
                node_names=",".join(self.nodes),
                first_job_id=_first_job_id(),
            )
        )
        subprocess.run(["slurmctld"], check=True, env=self.env, capture_output=True)
        for name in self.nodes:
            self.start_node(name)
        self.wait_until_idle()
        return self

    def start_node(self, name: str) -> None:
        command = ["slurmd"] if self.nodes[name] is None else ["slurmd", "-N", name]
        subprocess.run(command, check=True, env=self.env, capture_output=True)

    def node_states(self) -> dict[str, str]:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)

    def wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if set(states) == set(self.nodes) and all(s in ("idle", "mix", "alloc") for s in states.values()):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the Slurm nodes did not come up ({self.node_states()}): {self.log_tail()}")

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in self.nodes)):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def slurmd_pid(self, name: str) -> int | None:
        path = self.root / f"slurmd-{name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pids = [self.slurmd_pid(name) for name in self.nodes]
        for pid_file in ("slurmctld.pid", "munge/munged.pid"):
            try:
                pids.append(int((self.root / pid_file).read_text().strip()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            if pid is not None:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ job helpers

    def submit(self, *args: str, **env: str) -> list[str]:
        """`mim submit ARGS` against this cluster, from a shell with `env`; returns the job ids it
        printed."""
        result = run_cli("submit", *args, "--cpus-per-task=1", "--time=10", SLURM_CONF=str(self.conf), **env)
        assert result.returncode == 0, result.stderr[-3000:]
        return re.findall(r"submitted \w+ as job (\d+)", result.stdout)

    def expedite_requeued(self, job_id: str, timeout: float = 120) -> None:
        """Slurm makes a requeued job wait about two minutes before it is eligible again; the test
        brings its start forward once it is pending again (requeue and resume are unchanged). Not
        to `now`: slurmd refuses a batch launch within the second its credential was revoked by
        the requeue ("Job credential revoked"), and the job then ends FAILED; a few seconds later
        is safe."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.job_state(job_id) == "PENDING" and int(self.job_field(job_id, "Restarts") or 0) >= 1:
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3", check=False)
                return
            time.sleep(0.5)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=check)

    def job_state(self, job_id: str) -> str:
        result = self.run("scontrol", "show", "job", job_id, "-o", check=False)
        for field in result.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str:
        result = self.run("scontrol", "show", "job", job_id, "-o", check=False)
        for field in result.stdout.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return ""

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(
            f"job {job_id} did not reach {states} (state {self.job_state(job_id)}): {self.log_tail()}"
        )


@contextlib.contextmanager
def running_cluster(root: Path, nodes: int = 1) -> Iterator[LocalSlurm]:
    """A started cluster for a test module (skipped where Slurm cannot run), stopped afterwards."""
    cluster = LocalSlurm(root, nodes)
    try:
        cluster.start()
    except (SlurmUnavailable, OSError) as error:
        cluster.stop()
        pytest.skip(f"no {nodes}-node Slurm here: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


def chain_arguments(root: Path, shards: dict[str, Path], scenes: dict[str, Path] | None = None) -> list[str]:
    """`mim submit chain` arguments: pretrain -> export -> linprobe (-> segprobe, given segmentation
    shards) of the debug model under `root`."""
    segprobe = (
        [
            "--segprobe-config",
            "configs/segprobe/debug.yaml",
            f"segprobe.data.train={scenes['train']}",
            f"segprobe.data.val={scenes['val']}",
            "segprobe.schedule.epochs=1",
        ]
        if scenes
        else []
    )
    return [
        "--config",
        "configs/pretrain/debug.yaml",
        "--linprobe-config",
        "configs/linprobe/debug.yaml",
        f"--run-root={root}",
        f"pretrain.data.train={shards['train']}",
        *(f"pretrain.{o}" for o in GREY),
        f"linprobe.data.train={shards['train']}",
        f"linprobe.data.val={shards['val']}",
        "linprobe.data.mean=[0.286]",
        "linprobe.data.std=[0.353]",
        "linprobe.schedule.epochs=1",
    ] + segprobe


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / f"slurm-{job_id}.out").read_text()


def wait_for_step(run_dir: Path, job_id: str, step: int, timeout: float = 300) -> int:
    """Waits until the job's log shows pretraining step `step` or later; returns the step seen."""
    deadline = time.monotonic() + timeout
    path = run_dir / f"slurm-{job_id}.out"
    while time.monotonic() < deadline:
        steps = (
            [int(s) for s in re.findall(r"pretrain step (\d+)/", path.read_text())] if path.exists() else []
        )
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not reach step {step}")
