"""A run's rollbacks (run.on_divergence=rollback): what the training loop does when a step's loss
or gradient went non-finite or its loss spiked (mim.engine.health), and the record that makes it
last across restarts.

A rollback, on every rank, in the same process: the newest checkpoint that verifies (it is older
than the anomalous step: a checkpoint is written only after the health check) is restored, the
model, optimizer, RNG and the loss history, but not the data stream, which goes on from where it
is after a further `run.skip_window` steps of batches are read and dropped. So the data of the
steps since the checkpoint and of the window after them is skipped, and no batch is trained on
twice. For `run.rollback_lr_steps` steps after the restored one the lr is multiplied by
`run.rollback_lr_scale`.

Each rollback is a record in RUN_DIR/rollbacks.json (written by rank 0 before the restore) and in
`meta.json` of every checkpoint after it; `skipped_total` counts the steps of data skipped in the
run so far. A run restarted from a checkpoint that precedes a recorded rollback (it was requeued
before its next checkpoint) skips that data again on resume (`pending_skip`), so what a rollback
skipped is never trained on, and the count of rollbacks is the run's, not the process's.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

from mim import checkpoint
from mim.errors import TrainingStopped
from mim.files import atomic_write_text
from mim.meta import CheckpointMeta

log = logging.getLogger(__name__)
ROLLBACKS_FILE = "rollbacks.json"


class Diverged(TrainingStopped):
    pass


class Rollbacks:
    """RUN_DIR/rollbacks.json: the run's rollbacks, oldest first."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path, self.is_main = Path(run_dir) / ROLLBACKS_FILE, is_main
        self.records: list[dict[str, Any]] = (
            json.loads(self.path.read_text())["rollbacks"] if self.path.is_file() else []
        )

    @property
    def skipped_total(self) -> int:
        return self.records[-1]["skipped_total"] if self.records else 0

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.is_main:
            atomic_write_text(self.path, json.dumps({"rollbacks": self.records}, indent=1))

    def lr_scale(self, step: int, scale: float) -> float:
        """`scale` for a step within run.rollback_lr_steps after a restored one, else 1."""
        for record in self.records:
            if record["restored_step"] < step <= record["restored_step"] + record["lr_steps"]:
                return scale
        return 1.0

    def pending_skip(self, meta: CheckpointMeta) -> int:
        """Steps of data to skip after resuming from the checkpoint `meta` describes: those of the
        rollbacks recorded after it was written that restored it."""
        written = meta.rollbacks
        later = [r for r in self.records[len(written) :] if r["restored_step"] == meta.step]
        if not later:
            return 0
        return later[-1]["skipped_total"] - (written[-1]["skipped_total"] if written else 0)


def roll_back(loop, anomaly, batches) -> None:
    """Restores the newest checkpoint before `anomaly` and skips the data since it (every rank
    calls it, with the same anomaly); raises Diverged where the run is to stop instead."""
    run = loop.config.run
    refuse_beyond_limits(loop, anomaly)
    target = loop.checkpoints.newest()
    if target is None:
        raise Diverged(f"{anomaly.describe()}, before any checkpoint: there is nothing to roll back to")
    meta = checkpoint.load_meta(target)
    if meta.step >= anomaly.step:  # cannot happen: checkpoints follow a health check
        raise Diverged(f"{anomaly.describe()}, but the newest checkpoint {target} is not older than it")
    window_batches = run.skip_window * loop.config.optim.accum_steps
    for _ in range(window_batches):
        loop.consume(next(batches))
    skipped = loop.step - meta.step + run.skip_window
    record = {
        "rollback": len(loop.rollbacks.records) + 1,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cause": anomaly.cause,
        "what": anomaly.describe(),
        "first_bad_step": anomaly.step,
        "detected_at": loop.step,
        "restored": target.name,
        "restored_step": meta.step,
        "skipped_steps": skipped,  # of data: those of steps restored+1 .. detected_at, then the window
        "skipped_total": loop.rollbacks.skipped_total + skipped,
        "lr_scale": run.rollback_lr_scale,
        "lr_steps": run.rollback_lr_steps,
    }
    loop.rollbacks.add(record)
    loop.checkpoints.restore(
        loop.engine, target, meta, loop.session.settings.resolved_zero_stage, keep=("stream", "bad_samples")
    )
    loop.runner.watch.clear()
    announce(record, run, target, loop.step)
    loop.step = loop.saved_step = meta.step
    loop.report(
        {
            "healing/rollbacks": float(record["rollback"]),
            "healing/skipped_steps": float(record["skipped_total"]),
        }
    )
    loop.flush()


def refuse_beyond_limits(loop, anomaly) -> None:
    """Diverged where the run is not to roll back: run.on_divergence=stop, or no rollback left."""
    run = loop.config.run
    if run.on_divergence == "stop":
        stop = "run.on_divergence=stop"
    elif len(loop.rollbacks.records) >= run.max_rollbacks:
        stop = f"run.max_rollbacks={run.max_rollbacks} reached"
    else:
        return
    raise Diverged(
        f"{anomaly.describe()}; stopped ({stop}) without writing a checkpoint (last good one: "
        f"{loop.checkpoints.latest()}). Lower the lr, set optim.grad_clip, or check the data"
    )


def announce(record: dict[str, Any], run, target: Path, detected_at: int) -> None:
    lr = (
        f"lr x{run.rollback_lr_scale:g} for {run.rollback_lr_steps} steps"
        if run.rollback_lr_steps and run.rollback_lr_scale != 1
        else "the lr unchanged"
    )
    log.warning(
        "rollback %d of at most %d: %s; restored %s, skipping the data of steps %d-%d and %d more; %s",
        record["rollback"],
        run.max_rollbacks,
        record["what"],
        target,
        record["restored_step"] + 1,
        detected_at,
        run.skip_window,
        lr,
    )
