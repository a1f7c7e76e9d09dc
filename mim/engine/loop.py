"""The one training loop of every task. It is handed its parts (the session with its engine, the
task, the data, the checkpoint manager, the callbacks) and does the same with each:

    resume; while step < total: one step over accum_steps micro-batches -> log -> callbacks ->
    maybe checkpoint; stop at the end, at run.stop_after, or at a stop signal the ranks agree on.

The health check before each log line and each checkpoint finds a divergence (mim.engine.health)
and rolls the run back (mim.engine.rollback); the progress watchdog (mim.engine.watchdog) times
the steps; MIM_FAULT injects faults (mim.engine.faults).

Host syncs (.item()) happen only at log steps and checkpoints. The data position moves with
completed steps only, so a step cut short by a stop is read again on resume.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from mim.distributed import all_reduce_sum, any_rank, gather_objects
from mim.engine.callbacks import Callback
from mim.engine.data import BadSamples
from mim.engine.deepspeed_engine import engine_param_groups, is_partitioned
from mim.engine.faults import injected_faults
from mim.engine.health import Anomaly
from mim.engine.rollback import Rollbacks, roll_back
from mim.engine.schedule import warmup_cosine
from mim.engine.session import Session
from mim.engine.state import CheckpointManager
from mim.engine.task import Task
from mim.engine.watchdog import Watchdog
from mim.errors import TrainingStopped
from mim.meta import CheckpointMeta
from mim.runtime import Progress, StopSignal, StopWhileWaiting, format_duration, interruptible

log = logging.getLogger(__name__)


class TooManyBadSamples(TrainingStopped):
    pass


@dataclass
class LogWindow:
    """The steps since the last log line: their summed loss (on device) and the rate's clock."""

    progress: Progress
    loss_sum: torch.Tensor
    steps: int = 0


@dataclass
class Outcome:
    step: int
    total_steps: int
    reason: str  # finished | stop_after | signal
    last_loss: float | None


class Loop:
    def __init__(
        self,
        session: Session,
        task: Task,
        data: Any,
        checkpoints: CheckpointManager,
        callbacks: list[Callback],
        stop: StopSignal | None = None,
    ) -> None:
        self.session, self.task, self.data, self.checkpoints = session, task, data, checkpoints
        self.callbacks, self.stop = callbacks, stop
        self.config, self.plan, self.env = session.config, session.plan, session.env
        self.device, self.engine, self.runner = session.device, session.engine, session.runner
        self.step_seconds = float("nan")  # of the steps since the last log line
        self.step = self.saved_step = 0
        self.last_loss: float | None = None
        self.reason = ""  # why the loop stopped (Outcome.reason), once it has
        self.bad_by_shard = BadSamples()  # this rank's, per shard file
        run = self.config.run
        self.rollbacks = Rollbacks(session.run_dir, self.env.is_main)
        self.pending_skip = 0  # steps of data a recorded rollback skipped after the resumed checkpoint
        self.faults = injected_faults(session.run_dir, self.env.rank)
        self.watchdog = (
            Watchdog(run.hang_timeout, session.run_dir, self.env.rank) if run.hang_timeout else None
        )

    # ------------------------------------------------------------------ the loop

    def run(self) -> Outcome:
        self.resume()
        for callback in self.callbacks:
            callback.before_loop(self)
        plan = self.plan
        log.info(
            "%s: %d steps (%d per epoch of %d samples), effective batch %d, lr %.3e, %s, %d process(es)",
            self.task.stage,
            plan.total_steps,
            plan.steps_per_epoch,
            plan.samples_per_epoch,
            plan.effective_batch,
            plan.lr,
            self.session.precision,
            self.env.world_size,
        )
        batches = self.data.batches()
        reason = "finished"
        self.engine.train()
        try:
            with interruptible(None):  # from here a stop waits for a step the ranks agree on
                reason = self.steps(batches)
        except StopWhileWaiting as stopped:
            batches.close()  # its workers may be blocked on a read that never ends
            reason = self.stopped_waiting(str(stopped))
        except RuntimeError as error:  # a collective with a rank that is gone
            if not (self.stop is not None and self.stop.requested and self.env.world_size > 1):
                raise
            batches.close()
            self.last_loss = None
            reason = self.stopped_waiting(f"a collective failed after the stop signal ({error})")
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if self.stop is not None:
                self.stop.settle()
        self.reason = reason
        for callback in self.callbacks:
            callback.after_loop(self)
        if is_partitioned(self.engine):
            # ZeRO 3's hooks and prefetching hold collectives of their own: released before the
            # process group goes (each rank, once the last checkpoint is written).
            self.engine.destroy()
        return Outcome(self.step, plan.total_steps, reason, self.last_loss)

    def steps(self, batches) -> str:
        """Steps until the end, run.stop_after or an agreed stop; returns why it stopped. A step
        whose health check finds a divergence rolls the run back (mim.engine.rollback) and goes on."""
        config, plan = self.config, self.plan
        self.skip(batches, self.pending_skip)
        window = self.log_window()
        while self.step < plan.total_steps:
            window.loss_sum += self.train_step(batches)
            self.step += 1
            window.steps += 1
            if self.watchdog is not None:
                self.watchdog.beat(self.step)
            if self.logs_at(self.step):
                if self.healed(batches):
                    window = self.log_window()
                    continue
                self.last_loss = self.log_step(window)
                window = self.log_window(window.progress)  # the ETA's clock runs on
            self.task.after_step(self.step, plan.total_steps)
            with self.paused("callbacks"):
                for callback in self.callbacks:
                    callback.after_step(self)
            stop_requested = (
                self.stop is not None
                and self.step % config.run.stop_check_every == 0
                and any_rank(self.stop.requested, self.device)
            )
            at_end = self.step in (plan.total_steps, config.run.stop_after)
            if self.step % config.run.checkpoint_every == 0 or at_end or stop_requested:
                if self.healed(batches, before_checkpoint=True):
                    window = self.log_window()
                    continue
                self.save()
            if stop_requested or self.step == config.run.stop_after:
                return "signal" if stop_requested else "stop_after"
        return "finished"

    def log_window(self, progress: Progress | None = None) -> LogWindow:
        """A new window of steps to log; a new clock for the rate and ETA at the start and after a
        rollback (the step count went back)."""
        progress = progress or Progress(self.plan.total_steps, start=self.step)
        return LogWindow(progress, torch.zeros((), device=self.device))

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over accum_steps micro-batches; returns the summed loss (on device)."""
        plan, run = self.plan, self.config.run
        lr = warmup_cosine(self.step, plan.total_steps, plan.warmup_steps, plan.lr, self.config.optim.min_lr)
        lr *= self.rollbacks.lr_scale(self.step + 1, run.rollback_lr_scale)
        position = self.data.position.copy()

        def micro_loss(micro: int) -> torch.Tensor:
            batch = next(batches)
            position.advance(batch)
            self.bad_by_shard.update(batch.bad)
            labels = batch.labels.to(self.device, non_blocking=True)
            loss = self.task.loss(self.engine, self.data.inputs(batch.images), labels, self.step, micro)
            return loss if self.faults is None else self.faults.loss(self.step + 1, micro, loss)

        loss = self.runner.run(self.step + 1, lr, micro_loss, want_norm=self.logs_at(self.step + 1))
        self.data.position = position  # the step is complete
        return loss

    def consume(self, batch) -> None:
        """A batch read and not trained on (skipped by a rollback): the stream moves past it."""
        self.data.position.advance(batch)
        self.bad_by_shard.update(batch.bad)

    def skip(self, batches, steps: int) -> None:
        if steps:
            log.warning(
                "skipping the data of %d steps, as a recorded rollback did (%s)", steps, self.rollbacks.path
            )
            for _ in range(steps * self.config.optim.accum_steps):
                self.consume(next(batches))

    def paused(self, phase: str) -> contextlib.AbstractContextManager:
        """A phase the progress watchdog does not time (an evaluation, a checkpoint, a rollback)."""
        return self.watchdog.paused(phase) if self.watchdog is not None else contextlib.nullcontext()

    def logs_at(self, step: int) -> bool:
        return step % self.config.log.every == 0 or step in (
            self.plan.total_steps,
            self.config.run.stop_after,
        )

    # ------------------------------------------------------------------ reporting

    def report(self, scalars: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_scalars(self.step, scalars)

    def image(self, name: str, image: torch.Tensor) -> None:
        for callback in self.callbacks:
            callback.on_image(self.step, name, image)

    def flush(self) -> None:
        for callback in self.callbacks:
            callback.flush()

    def log_step(self, window: LogWindow) -> float:
        micro_losses = window.steps * self.config.optim.accum_steps * self.env.world_size
        loss = all_reduce_sum(window.loss_sum.clone()).item() / micro_losses
        rate, eta = window.progress.update(self.step, self.plan.effective_batch)
        self.step_seconds = self.plan.effective_batch / rate if rate > 0 else float("nan")
        lr = max(group["lr"] for group in engine_param_groups(self.engine))
        grad_norm = float(self.runner.grad_norm) if self.runner.grad_norm is not None else float("nan")
        samples = self.step * self.plan.effective_batch
        log.info(
            "%s step %d/%d  %s  lr %.3e  grad_norm %.3f  %.1f img/s  samples %d  eta %s",
            self.task.stage,
            self.step,
            self.plan.total_steps,
            self.task.describe_loss(loss, micro_losses, self.report),
            lr,
            grad_norm,
            rate,
            samples,
            format_duration(eta),
        )
        scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_sec": rate}
        scalars.update(samples_seen=samples, bad_samples=self.bad_by_shard.total())
        self.report({f"train/{name}": value for name, value in scalars.items()})
        self.report({f"bad_samples/{shard}": count for shard, count in self.bad_by_shard.items()})
        if self.bad_by_shard:
            log.info(
                "bad samples so far on this rank: %d (%s)",
                self.bad_by_shard.total(),
                ", ".join(f"{name} {count}" for name, count in self.bad_by_shard.most_common(3)),
            )
        self.flush()
        return loss

    # ------------------------------------------------------------------ health

    def healed(self, batches, before_checkpoint: bool = False) -> bool:
        """The health check; True where it found a divergence and the run was rolled back (the
        loop goes on from the restored step)."""
        anomaly = self.check_health(before_checkpoint)
        if anomaly is None:
            return False
        with self.paused("rollback"):
            roll_back(self, anomaly, batches)
        return True

    def check_health(self, before_checkpoint: bool = False) -> Anomaly | None:
        """The first anomaly of any rank (non-finite loss, gradient or weights, a loss spike) since
        the last rollback, alike on every rank; raises where too much data was bad."""
        samples_seen = self.step * self.plan.effective_batch
        local = self.runner.watch.anomaly()
        if local is None and before_checkpoint and not self.runner.weights_are_finite():
            local = Anomaly(self.step, "weights", float("nan"), float("nan"))  # a step not logged
        totals = all_reduce_sum(
            torch.tensor([float(self.bad_by_shard.total()), float(local is not None)], device=self.device)
        )
        total_bad, limit = totals[0].item(), self.config.data.max_bad_fraction
        if total_bad > 0 and total_bad > limit * (samples_seen + total_bad):
            worst = sum(gather_objects(self.bad_by_shard), collections.Counter()).most_common(5)
            raise TooManyBadSamples(
                f"{int(total_bad)} bad samples out of {int(samples_seen + total_bad)} read, more than "
                f"data.max_bad_fraction={limit}; worst shards: "
                + ", ".join(f"{name} ({count})" for name, count in worst)
                + "; the warnings above say what was wrong with each sample"
            )
        if totals[1].item() == 0:
            return None
        found = [anomaly for anomaly in gather_objects(local) if anomaly is not None]
        return min(found, key=lambda anomaly: anomaly.step)

    # ------------------------------------------------------------------ checkpoints

    def meta(self) -> CheckpointMeta:
        task = dict(self.task.meta())
        return self.session.meta(self.task.stage, self.step).replace(
            data=self.data.describe(),
            last_loss=self.last_loss,
            model=task.pop("model", None),
            backbone=task.pop("backbone", None),
            trained_only=self.task.trained_only,
            rollbacks=list(self.rollbacks.records),
            extra=task,
        )

    def save(self) -> None:
        with self.paused("checkpoint"):
            self.checkpoints.save(self.engine, self.step, self.meta())
        self.saved_step = self.step

    def resume(self) -> None:
        latest, meta = self.session.resume_from, self.session.resume_meta
        if latest is None:
            return
        self.checkpoints.restore(self.engine, latest, meta, self.session.settings.resolved_zero_stage)
        self.step = self.saved_step = meta.step
        self.pending_skip = self.rollbacks.pending_skip(meta)
        log.info("resumed from %s at step %d", latest, self.step)

    def stopped_waiting(self, why: str) -> str:
        """A stop that could not wait for an agreed step. One process checkpoints its last completed
        step; many cannot agree on anything (a rank may be blocked or gone), so they stop without
        touching the last checkpoint."""
        log.warning("%s", why)
        anomaly = None
        if self.env.world_size == 1 and self.step > self.saved_step:
            anomaly = self.check_health(before_checkpoint=True)
        if anomaly is None and self.env.world_size == 1 and self.step > self.saved_step:
            self.save()
        else:
            log.warning(
                "stopping at step %d without a new checkpoint; the run resumes from %s",
                self.step,
                self.checkpoints.latest() or "the start",
            )
        return "signal"
