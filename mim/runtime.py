"""Process-level plumbing for a stage: logging with rank-0 filtering, the run-dir lock, stop
signals (Slurm preemption), and progress lines with rate and ETA."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def setup_logging(rank: int, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors (prefixed with their rank)."""
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING, format=fmt, handlers=handlers, force=True
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RunDirBusy(RuntimeError):
    pass


class RunLock:
    """An exclusive lock on a run dir. A POSIX record lock (lockf), not flock: the kernel releases
    it when the holding process dies, and forked children (DataLoader workers, which outlive a
    SIGKILLed parent for a few seconds) do not inherit it, so a killed job never blocks its own
    restart. The lock file names the holder for the error message."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: held by another process
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirBusy(
                f"run dir {self.path.parent} is in use by another process ({holder}); "
                "wait for it to finish or choose another run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                }
            )
        )
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.lockf(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


STOP_GRACE_SECONDS = 3.0  # how long a wait may go on after a stop signal before it is cut short


class StopWhileWaiting(BaseException):
    """A stop signal arrived while the process was waiting (on data, in start-up, in an evaluation)
    and the wait did not end within STOP_GRACE_SECONDS. A BaseException, like KeyboardInterrupt, so
    that no retry loop or bad-sample handler on the way takes it for a failed read."""


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_held: int | None = None  # a stop signal that arrived before the StopSignal was made


def hold_stop_signals() -> None:
    """From the process's first moments (before torch is imported): a stop signal is recorded, not
    fatal, and the StopSignal made later acts on it, so that a stop that lands during start-up
    still ends in a requeue. Only for the training stages, which make a StopSignal."""

    def hold(number: int, frame) -> None:
        global _held
        _held = number

    for number in STOP_SIGNALS:
        signal.signal(number, hold)


class StopSignal:
    """Records SIGUSR1 (Slurm's warning before a time limit or preemption) and SIGTERM.

    In the training loop a stop waits for a step: the loop polls `requested`, the ranks agree on a
    common step, checkpoint and stop. Where nothing steps (start-up, waiting for data, an
    evaluation: the blocks marked `interruptible(activity)`), a wait that goes on STOP_GRACE_SECONDS
    after the signal is cut short by raising StopWhileWaiting (through SIGALRM), so a job stops within
    seconds even when a server never answers. Everything before the training loop is "starting up".
    The process has one of these: signal handlers are the process's."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        global _installed
        self.received: int | None = None
        self.settled = False
        self.activities: list[str | None] = ["starting up"]  # innermost last; None: a stop waits for a step
        for number in signals:
            signal.signal(number, self._handle)
        signal.signal(signal.SIGALRM, self._cut_short)
        _installed = self
        if _held is not None:  # it came while the process was importing
            self._handle(_held, None)

    def _handle(self, number: int, frame) -> None:
        if self.received is None:
            log.warning("received signal %s: will checkpoint and stop", signal.Signals(number).name)
        self.received = number
        self._arm()

    def _arm(self) -> None:
        if self.received is not None and not self.settled and self.activities[-1] is not None:
            signal.setitimer(signal.ITIMER_REAL, STOP_GRACE_SECONDS)

    def settle(self) -> None:
        """The training loop has ended (on this signal or not): the process only finishes now, so
        no wait is cut short any more (a timer left armed could fire as the interpreter exits)."""
        self.settled = True
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _cut_short(self, number: int, frame) -> None:
        activity = self.activities[-1]
        if self.received is not None and activity is not None:
            raise StopWhileWaiting(
                f"{signal.Signals(self.received).name} received while {activity}, which had not ended "
                f"{STOP_GRACE_SECONDS:g} s later: stopping now"
            )

    @contextlib.contextmanager
    def interruptible(self, activity: str | None) -> Iterator[None]:
        """Within the block a stop signal cuts the wait short (`activity` says what the process is
        doing); with None, a stop waits for the loop's next agreed step."""
        self.activities.append(activity)
        self._arm()
        try:
            yield
        finally:
            self.activities.pop()
            if self.activities[-1] is None:
                signal.setitimer(signal.ITIMER_REAL, 0)
            else:
                self._arm()

    @property
    def requested(self) -> bool:
        return self.received is not None


_installed: StopSignal | None = None


def interruptible(activity: str | None) -> contextlib.AbstractContextManager:
    """The installed StopSignal's `interruptible`; nothing where the process has none (a library
    caller, a test)."""
    return _installed.interruptible(activity) if _installed is not None else contextlib.nullcontext()


class Progress:
    """Rate and ETA between calls of `update`."""

    def __init__(self, total: int, start: int = 0) -> None:
        self.total, self.start = total, start
        self.started_at = self.last_time = time.monotonic()
        self.last_count = start

    def update(self, count: int, items_per_count: int) -> tuple[float, float]:
        """Returns (items per second since the last update, seconds left)."""
        now = time.monotonic()
        rate = (count - self.last_count) * items_per_count / max(now - self.last_time, 1e-9)
        overall = (count - self.start) / max(now - self.started_at, 1e-9)
        eta = (self.total - count) / overall if overall > 0 else float("inf")
        self.last_time, self.last_count = now, count
        return rate, eta


def peak_memory(device: Any) -> dict[str, Any]:
    """This process's peak memory so far: what torch's CUDA allocator held at most on a GPU, the
    resident peak of the process (VmHWM, which includes the Python heap) on the CPU."""
    if device.type == "cuda":
        import torch

        return {
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "measured": "max_memory_allocated",
        }
    return {
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "measured": "resident peak",
    }


def format_duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
