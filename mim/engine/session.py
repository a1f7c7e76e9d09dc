"""The engine side of one training run. First what is derived from the config (where it resumes
from, the effective batch split over this run's processes, the plan: lr, steps; the precision
and ZeRO stage), decided once and written to config.yaml before any engine exists, never changed
after. Then the DeepSpeed engine and the step (`start`), and whole weights on demand
(`unsharded`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mim import checkpoint
from mim.config import ConfigError, to_tree, write_config
from mim.distributed import DistEnv, gather_objects
from mim.engine.deepspeed_engine import (
    EngineSettings,
    build_engine,
    engine_description,
    full_state_dict,
    input_dtype,
    is_partitioned,
    materialize,
    resolve_precision,
    skeleton,
)
from mim.engine.state import CheckpointManager
from mim.engine.step import StepRunner
from mim.meta import CheckpointMeta
from mim.recipe import batch_split, make_plan, process_counts_for

log = logging.getLogger(__name__)


class Session:
    def __init__(
        self,
        config: Any,
        env: DistEnv,
        device: torch.device,
        checkpoints: CheckpointManager,
        samples_per_epoch: int,
    ) -> None:
        self.config, self.env, self.device = config, env, device
        self.run_dir = Path(config.run.dir)
        self.resume_from = checkpoints.newest()
        self.resume_meta = checkpoint.load_meta(self.resume_from) if self.resume_from is not None else None
        if self.resume_meta is not None:
            keep_effective_batch(config, self.resume_meta, env.world_size, self.run_dir)
        self.plan = make_plan(
            config.optim, config.schedule, config.data.batch_size, env.world_size, samples_per_epoch
        )
        self.precision = resolve_precision(config.deepspeed.precision)
        self.input_dtype = input_dtype(self.precision)
        self.zero_stage = self._zero_stage_of_run(config.deepspeed.zero_stage)
        if env.is_main:
            write_config(config, self.run_dir / "config.yaml")
        self.nodes = gather_objects(env.node)  # each rank's node, for meta.json
        self.engine: Any = None
        self.runner: StepRunner | None = None
        self.settings: EngineSettings | None = None
        self.frame: nn.Module | None = None

    def engine_settings(self, groups: list[dict], optimizer: str) -> EngineSettings:
        config = self.config
        return EngineSettings(
            micro_batch_size=config.data.batch_size,
            accum_steps=config.optim.accum_steps,
            world_size=self.env.world_size,
            zero_stage=self.zero_stage,
            precision=config.deepspeed.precision,
            grad_clip=config.optim.grad_clip,
            betas=tuple(config.optim.betas),
            optimizer=optimizer,
            compile=config.deepspeed.compile,
            num_params=sum(p.numel() for group in groups for p in group["params"]),
        )

    def start(self, model: nn.Module, groups: list[dict], settings: EngineSettings) -> None:
        """DeepSpeed takes the model (at ZeRO 3 it partitions it)."""
        log.info(
            "ZeRO stage %d (deepspeed.zero_stage=%s, %d process(es))",
            settings.resolved_zero_stage,
            self.config.deepspeed.zero_stage,
            self.env.world_size,
        )
        self.settings = settings
        # At ZeRO 3 the engine's module holds slices; evaluation and pictures get a whole copy.
        self.frame = skeleton(model) if settings.resolved_zero_stage == 3 else None
        self.engine = build_engine(model, groups, settings)
        self.runner = StepRunner(self.engine, settings, self.device)

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

    def meta(self, stage: str, step: int) -> CheckpointMeta:
        """What meta.json says about the run at `step`, before its task and data add theirs."""
        engine = engine_description(self.settings)
        return CheckpointMeta(
            stage=stage,
            config=to_tree(self.config),
            world_size=self.env.world_size,
            effective_batch=self.plan.effective_batch,
            zero_stage=engine["zero_stage"],
            precision=engine["precision"],
            samples_seen=step * self.plan.effective_batch,
            nodes=self.nodes,
            step=step,
        )

    def _zero_stage_of_run(self, zero_stage: int | str) -> int | str:
        """`auto` keeps the stage a run's checkpoints were written at, so a run started when `auto`
        chose another stage still resumes; any other setting is taken as it is."""
        if zero_stage != "auto" or self.resume_meta is None:
            return zero_stage
        written = self.resume_meta.zero_stage
        log.info(
            "deepspeed.zero_stage=auto: ZeRO stage %d, the stage %s was written at", written, self.resume_from
        )
        return written


def keep_effective_batch(config: Any, meta: CheckpointMeta, world: int, run_dir: Path) -> None:
    """The effective batch is the run's: on another number of processes the micro-batch and
    accumulation per process are re-derived from it (so the plan, its lr and its steps stay the
    run's), or the run is refused naming process counts that work."""
    written = meta.effective_batch
    data, optim = config.data, config.optim
    if not written or data.batch_size * optim.accum_steps * world == written:
        return
    split = batch_split(written, world, data.batch_size)
    if split is None:
        counts = ", ".join(map(str, process_counts_for(written)[:12]))
        raise ConfigError(
            f"cannot resume {run_dir} on {world} process(es): its effective batch of {written} "
            f"(written by {meta.world_size} process(es)) cannot be split evenly over {world}; "
            f"use a process count that divides it ({counts}, ...) or a new run.dir"
        )
    log.warning(
        "effective batch %d kept on %d process(es) (written by %s): data.batch_size %d -> %d, "
        "optim.accum_steps %d -> %d; the schedule and its steps are the run's",
        written,
        world,
        meta.world_size,
        data.batch_size,
        split[0],
        optim.accum_steps,
        split[1],
    )
    data.batch_size, optim.accum_steps = split
