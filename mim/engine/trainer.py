"""The shared step-based loop of every training stage: load or resume, then
`while step < total: batch -> train_step -> log -> maybe checkpoint`.

A stage subclasses `Trainer` and says what differs: the loss of a batch (`forward_loss`), what to
do after a step (`after_step`, e.g. reconstructions or evaluation), and what describes its
checkpoints (`meta`). Host syncs (.item()) happen only at log steps and checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mim import checkpoint
from mim.config import ConfigError, to_tree, write_config
from mim.data.shards import ShardSet
from mim.data.streams import StreamPosition, TrainStream, ViewSpec, train_loader
from mim.data.transforms import normalize_on_device
from mim.distributed import DistEnv, all_reduce_sum, any_rank, barrier, gather_objects
from mim.engine import checkpointer
from mim.engine.deepspeed_engine import (
    EngineSettings,
    build_engine,
    engine_description,
    engine_param_groups,
    full_state_dict,
    input_dtype,
    is_partitioned,
    materialize,
    resolve_precision,
    skeleton,
)
from mim.engine.schedule import warmup_cosine
from mim.engine.step import StepRunner
from mim.errors import TrainingStopped
from mim.recipe import batch_split, make_plan, process_counts_for
from mim.runtime import Progress, StopSignal, StopWhileWaiting, format_duration, interruptible

log = logging.getLogger(__name__)


class NonFiniteLoss(TrainingStopped):
    pass


class TooManyBadSamples(TrainingStopped):
    pass


@dataclass
class Outcome:
    step: int
    total_steps: int
    reason: str  # finished | stop_after | signal
    last_loss: float | None


class Trainer:
    stage = "train"

    def __init__(
        self,
        config: Any,
        shards: ShardSet,
        env: DistEnv,
        device: torch.device,
        model: nn.Module,
        groups: list[dict],
        view_spec: ViewSpec,
        stop: StopSignal | None = None,
        optimizer: str = "adamw",
    ) -> None:
        self.config, self.shards, self.env, self.device = config, shards, env, device
        self.model, self.view_spec, self.stop = model, view_spec, stop
        self.run_dir = Path(config.run.dir)
        self.resume_from = self.resume_point()
        if self.resume_from is not None:
            self.keep_effective_batch(checkpoint.read_meta(self.resume_from))
        samples_per_epoch = config.data.samples_per_epoch or shards.num_usable
        self.plan = make_plan(
            config.optim, config.schedule, config.data.batch_size, env.world_size, samples_per_epoch
        )
        self.precision = resolve_precision(config.deepspeed.precision)
        self.input_dtype = input_dtype(self.precision)
        self.engine_settings = EngineSettings(
            micro_batch_size=config.data.batch_size,
            accum_steps=config.optim.accum_steps,
            world_size=env.world_size,
            zero_stage=self.zero_stage_of_run(config.deepspeed.zero_stage),
            precision=config.deepspeed.precision,
            grad_clip=config.optim.grad_clip,
            betas=tuple(config.optim.betas),
            optimizer=optimizer,
            compile=config.deepspeed.compile,
            num_params=sum(p.numel() for group in groups for p in group["params"]),
        )
        log.info(
            "ZeRO stage %d (deepspeed.zero_stage=%s, %d process(es))",
            self.engine_settings.resolved_zero_stage,
            config.deepspeed.zero_stage,
            env.world_size,
        )
        self.prepare_model(model)
        # At ZeRO 3 the engine's module holds slices; evaluation and pictures get a whole copy.
        self.frame = skeleton(model) if self.engine_settings.resolved_zero_stage == 3 else None
        self.engine = build_engine(model, groups, self.engine_settings)
        self.runner = StepRunner(self.engine, self.engine_settings, device)
        self.nodes = gather_objects(env.node)  # each rank's node, for meta.json
        self.step = self.saved_step = 0
        self.position = StreamPosition(config.data.num_workers)  # of the training stream
        self.bad_by_shard: collections.Counter[str] = collections.Counter()  # this rank's
        self.writer = None
        if env.is_main and config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    # ------------------------------------------------------------------ what a stage says

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Called once the resume point is known, before DeepSpeed takes (and at ZeRO 3 partitions)
        the model: what a stage loads into its fresh weights."""

    @contextlib.contextmanager
    def unsharded(self) -> Iterator[nn.Module]:
        """The model with whole weights, for evaluation and pictures (no gradients): the engine's
        module at ZeRO 0-2; at stage 3 a plain copy gathered from the partitions, freed after.
        Every rank enters it."""
        if not is_partitioned(self.engine):
            yield self.engine.module
            return
        state = full_state_dict(self.engine, self.env.rank, self.device, everywhere=True)
        module = materialize(self.frame, state, self.device)
        del state
        module.train(self.engine.module.training)
        try:
            yield module
        finally:
            del module

    def before_loop(self) -> None:
        """Called on every rank once the run is loaded or resumed, before the first step."""

    def after_step(self) -> None:
        """Called on every rank after each optimizer step."""

    def shared_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """State every rank holds alike, beside the model, that a checkpoint keeps (by file name)."""
        return {}

    def load_shared_state(self, checkpoint_dir: Path) -> None:
        """On resume, after the engine's state: reads what `shared_state` saved."""

    def meta(self) -> dict:
        return {
            "stage": self.stage,
            "config": to_tree(self.config),
            "world_size": self.env.world_size,
            "nodes": self.nodes,
            "samples_seen": self.step * self.plan.effective_batch,
            "effective_batch": self.plan.effective_batch,
            "engine": engine_description(self.engine_settings),
            "data": {"train": self.config.data.train, "num_samples": self.shards.num_samples},
        }

    def zero_stage_of_run(self, zero_stage: int | str) -> int | str:
        """`auto` keeps the stage a run's checkpoints were written at, so a run started when `auto`
        chose another stage still resumes; any other setting is taken as it is."""
        latest = self.resume_from if zero_stage == "auto" else None
        if latest is None:
            return zero_stage
        written = checkpoint.read_meta(latest).get("engine", {}).get("zero_stage", 1)
        log.info("deepspeed.zero_stage=auto: ZeRO stage %d, the stage %s was written at", written, latest)
        return int(written)

    def resume_point(self) -> Path | None:
        """The newest checkpoint that verifies (rank 0 checks every file and sets damaged ones
        aside); every rank gets the same answer, or the same TrainingStopped."""
        found, failure = None, None
        if self.env.is_main:
            try:
                found = checkpoint.newest_intact(self.run_dir)
            except TrainingStopped as error:
                failure = str(error)
        found, failure = gather_objects((found, failure))[0]
        if failure is not None:
            raise TrainingStopped(failure)
        return found

    def keep_effective_batch(self, meta: dict) -> None:
        """The effective batch is the run's: on another number of processes the micro-batch and
        accumulation per process are re-derived from it (so the plan, its lr and its steps stay
        the run's), or the run is refused naming process counts that work."""
        written = meta.get("effective_batch")
        if written is None:  # checkpoints from before this key
            config = meta.get("config", {})
            written = (
                config.get("data", {}).get("batch_size", 0)
                * config.get("optim", {}).get("accum_steps", 1)
                * meta.get("world_size", 1)
            )
        data, optim, world = self.config.data, self.config.optim, self.env.world_size
        if not written or data.batch_size * optim.accum_steps * world == written:
            return
        split = batch_split(written, world, data.batch_size)
        if split is None:
            counts = ", ".join(map(str, process_counts_for(written)[:12]))
            raise ConfigError(
                f"cannot resume {self.run_dir} on {world} process(es): its effective batch of {written} "
                f"(written by {meta.get('world_size')} process(es)) cannot be split evenly over {world}; "
                f"use a process count that divides it ({counts}, ...) or a new run.dir"
            )
        log.warning(
            "effective batch %d kept on %d process(es) (written by %s): data.batch_size %d -> %d, "
            "optim.accum_steps %d -> %d; the schedule and its steps are the run's",
            written,
            world,
            meta.get("world_size"),
            data.batch_size,
            split[0],
            optim.accum_steps,
            split[1],
        )
        data.batch_size, optim.accum_steps = split
        if self.env.is_main:
            write_config(self.config, self.run_dir / "config.yaml")

    def check_resumable(self, meta: dict, path: Path) -> None:
        if meta.get("stage") != self.stage:
            raise ConfigError(
                f"cannot resume from {path}: it was written by stage {meta.get('stage')!r}, "
                f"this is {self.stage!r}; use a new run.dir"
            )

    # ------------------------------------------------------------------ checkpoints

    def save(self, last_loss: float | None) -> Path:
        with interruptible(None):  # a stop never cuts a checkpoint short
            return self._save(last_loss)

    def _save(self, last_loss: float | None) -> Path:
        rank_state = {
            "rng": checkpoint.rng_state(),
            "stream": self.position.state_dict(),
        }
        path = checkpointer.save(
            self.engine,
            self.run_dir,
            self.step,
            self.env.rank,
            rank_state,
            dict(self.meta(), last_loss=last_loss),
            self.config.run.keep_last,
            barrier,
            gather_objects,
            shared=self.shared_state() if self.env.is_main else None,
        )
        self.saved_step = self.step
        log.info("checkpoint %s written", path)
        return path

    def resume(self) -> bool:
        latest = self.resume_from
        if latest is None:
            return False
        meta = checkpoint.read_meta(latest)
        self.check_resumable(meta, latest)
        checkpointer.restore(
            self.engine, latest, meta, self.engine_settings.resolved_zero_stage, self.env.world_size
        )
        self.step = self.saved_step = int(meta["step"])
        self.load_shared_state(latest)
        rank_state = checkpoint.load_rank_state(latest, self.env.rank)
        if rank_state is None:
            log.warning(
                "%s has no stream position for rank %d (written by %s process(es)): this rank's stream "
                "starts at its first chunk; ranks that were there continue theirs",
                latest,
                self.env.rank,
                meta.get("world_size"),
            )
        else:
            stream = rank_state.get("stream", rank_state)  # older checkpoints: at the top level
            position = StreamPosition.from_state(stream, self.config.data.num_workers)
            if position is None:
                log.warning(
                    "data.num_workers changed from %d to %d: data stream positions cannot be kept",
                    stream["num_workers"],
                    self.config.data.num_workers,
                )
            else:
                checkpoint.set_rng_state(rank_state["rng"])
                self.position = position
        log.info("resumed from %s at step %d", latest, self.step)
        return True

    # ------------------------------------------------------------------ data

    def batches(self):
        stream = TrainStream(
            self.shards,
            self.view_spec,
            self.config.data.batch_size,
            self.config.run.seed,
            self.env.rank,
            self.config.data.shards_per_chunk,
            self.position,
            self.config.data.shuffle_buffer,
        )
        return iter(train_loader(stream, self.config.data.num_workers))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_on_device(
            images.to(self.device, non_blocking=True),
            self.config.data.mean,
            self.config.data.std,
            self.input_dtype,
        )

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over accum_steps micro-batches; returns the summed loss (on device)."""
        lr = warmup_cosine(
            self.step, self.plan.total_steps, self.plan.warmup_steps, self.plan.lr, self.config.optim.min_lr
        )

        position = self.position.copy()

        def micro_loss(micro: int) -> torch.Tensor:
            batch = next(batches)
            position.advance(batch)
            self.bad_by_shard.update(batch["bad"])
            labels = batch["labels"].to(self.device, non_blocking=True)
            return self.forward_loss(self.normalize(batch["images"]), labels, micro)

        loss = self.runner.run(self.step + 1, lr, micro_loss, want_norm=self.logs_at(self.step + 1))
        # The stream's position moves with completed steps only: a step cut short by a stop leaves
        # its batches unconsumed, to be read again on resume.
        self.position = position
        return loss

    def logs_at(self, step: int) -> bool:
        return step % self.config.log.every == 0 or step in (
            self.plan.total_steps,
            self.config.run.stop_after,
        )

    def check_health(self, samples_seen: int, before_checkpoint: bool = False) -> None:
        """Raises before anything is written when a loss, gradient or weight went non-finite or
        too much data was bad."""
        local_step, what = self.runner.first_bad(), "the loss or the gradient norm"
        if local_step < 0 and before_checkpoint and not self.runner.weights_are_finite():
            local_step, what = self.step, "the weights"  # a non-finite gradient on a step not logged
        totals = all_reduce_sum(
            torch.tensor([float(self.bad_by_shard.total()), float(local_step >= 0)], device=self.device)
        )
        if totals[1].item() > 0:
            where = (
                f"{what} became NaN/inf at step {local_step}"
                if local_step >= 0
                else "another rank went NaN/inf"
            )
            raise NonFiniteLoss(
                f"{where}; stopped without writing a checkpoint (last good one: "
                f"{checkpoint.latest_checkpoint(self.run_dir)}). Lower the lr, set optim.grad_clip, or check the data"
            )
        total_bad = totals[0].item()
        if total_bad > 0 and total_bad > self.config.data.max_bad_fraction * (samples_seen + total_bad):
            worst = sum(gather_objects(self.bad_by_shard), collections.Counter()).most_common(5)
            raise TooManyBadSamples(
                f"{int(total_bad)} bad samples out of {int(samples_seen + total_bad)} read, more than "
                f"data.max_bad_fraction={self.config.data.max_bad_fraction}; worst shards: "
                + ", ".join(f"{name} ({count})" for name, count in worst)
                + "; the warnings above say what was wrong with each sample"
            )

    # ------------------------------------------------------------------ logging

    def scalar(self, name: str, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, self.step)

    def describe_loss(self, loss: float, micro_losses: int) -> str:
        """The loss as the step's log line shows it; `micro_losses`: micro-batches over all ranks."""
        return f"loss {loss:.4f}"

    def log_step(self, loss_sum: torch.Tensor, num_steps: int, progress: Progress) -> float:
        micro_losses = num_steps * self.config.optim.accum_steps * self.env.world_size
        loss = all_reduce_sum(loss_sum.clone()).item() / micro_losses
        rate, eta = progress.update(self.step, self.plan.effective_batch)
        lr = max(group["lr"] for group in engine_param_groups(self.engine))
        grad_norm = float(self.runner.grad_norm) if self.runner.grad_norm is not None else float("nan")
        samples = self.step * self.plan.effective_batch
        log.info(
            "%s step %d/%d  %s  lr %.3e  grad_norm %.3f  %.1f img/s  samples %d  eta %s",
            self.stage,
            self.step,
            self.plan.total_steps,
            self.describe_loss(loss, micro_losses),
            lr,
            grad_norm,
            rate,
            samples,
            format_duration(eta),
        )
        for name, value in (
            ("loss", loss),
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("images_per_sec", rate),
            ("samples_seen", samples),
            ("bad_samples", self.bad_by_shard.total()),
        ):
            self.scalar(f"train/{name}", value)
        for shard, count in self.bad_by_shard.items():
            self.scalar(f"bad_samples/{shard}", count)
        if self.bad_by_shard:
            log.info(
                "bad samples so far on this rank: %d (%s)",
                self.bad_by_shard.total(),
                ", ".join(f"{name} {count}" for name, count in self.bad_by_shard.most_common(3)),
            )
        if self.writer is not None:
            self.writer.flush()
        return loss

    # ------------------------------------------------------------------ the loop

    def run(self) -> Outcome:
        self.resume()
        self.before_loop()
        config, plan = self.config, self.plan
        log.info(
            "%s: %d steps (%d per epoch of %d samples), effective batch %d, lr %.3e, %s, %d process(es)",
            self.stage,
            plan.total_steps,
            plan.steps_per_epoch,
            plan.samples_per_epoch,
            plan.effective_batch,
            plan.lr,
            self.precision,
            self.env.world_size,
        )
        batches = self.batches()
        progress = Progress(plan.total_steps, start=self.step)
        loss_sum, steps_since_log, last_loss, reason = (
            torch.zeros((), device=self.device),
            0,
            None,
            "finished",
        )
        self.engine.train()
        try:
            with interruptible(None):  # from here a stop waits for a step the ranks agree on
                while self.step < plan.total_steps:
                    loss_sum += self.train_step(batches)
                    self.step += 1
                    steps_since_log += 1
                    at_end = self.step in (plan.total_steps, config.run.stop_after)
                    if self.logs_at(self.step):
                        self.check_health(self.step * plan.effective_batch)
                        last_loss = self.log_step(loss_sum, steps_since_log, progress)
                        loss_sum.zero_()
                        steps_since_log = 0
                    self.after_step()
                    stop_requested = (
                        self.stop is not None
                        and self.step % config.run.stop_check_every == 0
                        and any_rank(self.stop.requested, self.device)
                    )
                    if self.step % config.run.checkpoint_every == 0 or at_end or stop_requested:
                        self.check_health(self.step * plan.effective_batch, before_checkpoint=True)
                        self.save(last_loss)
                    if stop_requested or self.step == config.run.stop_after:
                        reason = "signal" if stop_requested else "stop_after"
                        break
        except StopWhileWaiting as stopped:
            batches.close()  # its workers may be blocked on a read that never ends
            reason = self.stopped_waiting(str(stopped), last_loss)
        except RuntimeError as error:  # a collective with a rank that is gone
            if not (self.stop is not None and self.stop.requested and self.env.world_size > 1):
                raise
            batches.close()
            reason = self.stopped_waiting(f"a collective failed after the stop signal ({error})", None)
        if self.writer is not None:
            self.writer.flush()
        if is_partitioned(self.engine):
            # ZeRO 3's hooks and prefetching hold collectives of their own: released before the
            # process group goes (each rank, once the last checkpoint is written).
            self.engine.destroy()
        return Outcome(self.step, plan.total_steps, reason, last_loss)

    def stopped_waiting(self, why: str, last_loss: float | None) -> str:
        """A stop that could not wait for an agreed step. One process checkpoints its last completed
        step; many cannot agree on anything (a rank may be blocked or gone), so they stop without
        touching the last checkpoint."""
        log.warning("%s", why)
        if self.env.world_size == 1 and self.step > self.saved_step:
            self.check_health(self.step * self.plan.effective_batch, before_checkpoint=True)
            self.save(last_loss)
        else:
            log.warning(
                "stopping at step %d without a new checkpoint; the run resumes from %s",
                self.step,
                checkpoint.latest_checkpoint(self.run_dir) or "the start",
            )
        return "signal"
