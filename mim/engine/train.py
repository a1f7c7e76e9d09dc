"""A task's run, from its checked config to the loop's outcome: the parts are made in order and
handed to the loop (mim.engine.loop); nothing here depends on which task it is."""

from __future__ import annotations

import torch

from mim import rng
from mim.distributed import DistEnv
from mim.engine.callbacks import Callback, TensorBoard
from mim.engine.health import LossWatch
from mim.engine.loop import Loop, Outcome
from mim.engine.session import Session
from mim.engine.state import CheckpointManager, RngState
from mim.engine.task import Task
from mim.engine.trackers import trackers
from mim.runtime import StopSignal


def train(task: Task, env: DistEnv, device: torch.device, stop: StopSignal | None = None) -> Outcome:
    config = task.config
    checkpoints = CheckpointManager(config.run.dir, env, config.run.keep_last)
    session = Session(config, env, device, checkpoints, task.samples_per_epoch())
    if session.resume_from is not None:  # refused before any engine exists
        task.check_resumable(session.resume_meta, session.resume_from)
    rng.seed_rngs(config.run.seed)
    model, groups = task.build()
    settings = session.engine_settings(groups, task.optimizer)
    task.prepare(session.resume_from, settings)
    session.start(model, groups, settings)
    data = task.data(session)
    checkpoints.add_rank_part("stream", data)  # before the RNG: a stream that cannot be kept keeps neither
    checkpoints.add_rank_part("rng", RngState())
    run = config.run
    session.runner.watch = LossWatch(device, run.spike_threshold, run.spike_window, session.plan.warmup_steps)
    checkpoints.add_rank_part("loss_watch", session.runner.watch)
    task.attach(session, checkpoints)
    callbacks: list[Callback] = []
    if env.is_main and config.log.tensorboard:
        callbacks.append(TensorBoard(session.run_dir))
    if env.is_main:
        callbacks += trackers(config, session.run_dir)
    callbacks += task.callbacks(session)
    loop = Loop(session, task, data, checkpoints, callbacks, stop)
    checkpoints.add_rank_part("bad_samples", loop.bad_by_shard)
    return loop.run()
