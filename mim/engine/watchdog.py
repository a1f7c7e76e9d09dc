"""The progress watchdog (run.hang_timeout): a thread beside the training loop. When no step has
completed for `timeout` seconds, outside the phases known to be long (start-up and the first
step, evaluations and other callbacks, checkpoints, a rollback: the loop marks them `paused`),
this rank writes every thread's Python stack to RUN_DIR/stacks/rank-NNNNN.txt, asks Slurm to
requeue the job (when it runs under one), and exits with EXIT_HUNG. Every rank has its own and they
fire within moments of each other, since a rank that stops answering holds the others in the next
collective; each waits EXIT_DELAY seconds after its stacks are written, so that a peer's exit does not
cut its own report short. The requeued job resumes from the newest verified checkpoint.

A process whose main thread holds the interpreter's lock forever (stuck in C code that does not
release it) starves this thread too: for that, faulthandler's own timer, which needs no lock,
writes the stacks to stderr (the job's log) and ends the process up to BACKSTOP seconds later.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mim.slurm import requeue_job

log = logging.getLogger(__name__)
EXIT_HUNG = 75  # EX_TEMPFAIL: try again
EXIT_DELAY = 2.0
BACKSTOP = 60.0


class Watchdog:
    def __init__(self, timeout: float, run_dir: Path, rank: int) -> None:
        self.timeout, self.rank = timeout, rank
        self.path = Path(run_dir) / "stacks" / f"rank-{rank:05d}.txt"
        self.last_step = 0
        self.last_beat: float | None = None  # None: not watching (before the first step, or paused)
        self.paused_in: list[str] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.backstop_armed = -BACKSTOP

    def beat(self, step: int) -> None:
        """Step `step` has completed (the first beat starts the watch)."""
        with self.lock:
            self.last_step = step
            if not self.paused_in:
                self.last_beat = time.monotonic()
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="mim-watchdog", daemon=True)
            self.thread.start()
        self._arm_backstop()

    @contextlib.contextmanager
    def paused(self, phase: str) -> Iterator[None]:
        """A phase known to take long: not watched; the clock restarts when it ends."""
        with self.lock:
            self.paused_in.append(phase)
            self.last_beat = None
        faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            with self.lock:
                self.paused_in.pop()
                if not self.paused_in and self.thread is not None:
                    self.last_beat = time.monotonic()
            if self.thread is not None and not self.paused_in:
                self._arm_backstop(force=True)

    def stop(self) -> None:
        self.stopped.set()
        faulthandler.cancel_dump_traceback_later()

    def _arm_backstop(self, force: bool = False) -> None:
        """faulthandler's timer starts a thread each time it is set: set at most every BACKSTOP / 2
        seconds, it fires between BACKSTOP / 2 and BACKSTOP after the watch's own limit."""
        now = time.monotonic()
        if (
            self.paused_in
            or self.stopped.is_set()
            or (not force and now - self.backstop_armed < BACKSTOP / 2)
        ):
            return
        self.backstop_armed = now
        faulthandler.dump_traceback_later(self.timeout + BACKSTOP, exit=True, file=sys.stderr)

    def _watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.timeout / 10)):
            with self.lock:
                beat = self.last_beat
            if beat is not None and time.monotonic() - beat > self.timeout:
                self._fire(time.monotonic() - beat)

    def _fire(self, silent: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as report:
            report.write(
                f"rank {self.rank} (pid {os.getpid()}): no step completed for {silent:.0f} s after step "
                f"{self.last_step} (run.hang_timeout={self.timeout:g}); the stacks of every thread:\n\n"
            )
            report.flush()
            faulthandler.dump_traceback(report, all_threads=True)
        log.error(
            "no step completed for %.0f s after step %d (run.hang_timeout=%g): a rank stopped answering; "
            "stacks written to %s; exiting with %d to be requeued (the run resumes from its newest checkpoint)",
            silent,
            self.last_step,
            self.timeout,
            self.path,
            EXIT_HUNG,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        time.sleep(EXIT_DELAY)
        requeue_job(f"rank {self.rank}: no step completed for {silent:.0f} s")
        os._exit(EXIT_HUNG)
