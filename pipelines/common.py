"""What every stage's entry point does the same way: parse `--config F key=value ...`, turn a
user's mistake into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mim.config_help import console_page
from mim.distributed import DistEnv, any_rank, init_distributed, read_dist_env, shutdown
from mim.errors import TrainingStopped, UserInputError
from mim.runtime import RunDirBusy, RunLock, StopWhileWaiting, setup_logging
from pipelines.requeue import requeue_if_stopped

USER_ERRORS = (UserInputError, FileNotFoundError, NotADirectoryError, PermissionError, RunDirBusy)
EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3


class HelpConfig(argparse.Action):
    """`--help-config`: the stage's config keys (name, type, default, allowed values, description)."""

    def __init__(self, option_strings, dest, stage: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.stage = stage

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            print(console_page(self.stage), flush=True)
        except BrokenPipeError:  # `mim pretrain --help-config | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit()


def add_help_config(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument(
        "--help-config", action=HelpConfig, stage=stage, help="list this stage's config keys and exit"
    )


def config_parser(prog: str, description: str, stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", help="a YAML file, or a recipe name such as pretrain/mae_vit_base_p16 (mim configs)"
    )
    add_help_config(parser, stage)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.batch_size=32"
    )
    return parser


def reports_user_errors(prog: str) -> Callable:
    """Wraps a stage's main: a user's mistake prints `prog: error: ...` and exits 2; training that
    cannot go on prints `prog: stopped: ...` and exits 3; a stop signal that cut start-up short
    exits as a stop does (0, requeued under Slurm); anything else keeps its traceback."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except USER_ERRORS as error:
                logging.getLogger(prog).debug("user error", exc_info=True)
                print(f"{prog}: error: {error}", file=sys.stderr)
                return EXIT_USER_ERROR
            except TrainingStopped as error:
                print(f"{prog}: stopped: {error}", file=sys.stderr)
                return EXIT_TRAINING_STOPPED
            except StopWhileWaiting as stopped:  # before the training loop: nothing was written
                logging.getLogger(prog).warning("%s; nothing written", stopped)
                return requeue_if_stopped("signal", read_dist_env())

        return wrapped

    return wrap


@contextlib.contextmanager
def started_run(run_dir: Path) -> Iterator[tuple[DistEnv, torch.device]]:
    """Logging, the process group, and the run-dir lock (held by rank 0; every rank fails fast when
    another job holds it). The run's session writes the resolved config; the stop signals were set
    up before the config was read (mim.runtime.StopSignal)."""
    env = read_dist_env()
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(env.rank, run_dir / "log.txt")
    device = init_distributed(env)
    lock, busy = RunLock(run_dir), None
    if env.is_main:
        try:
            lock.acquire()
        except RunDirBusy as error:
            busy = error
    if any_rank(busy is not None, device):
        shutdown()
        raise busy or RunDirBusy(f"run dir {run_dir} is in use by another job")
    try:
        yield env, device
    finally:
        lock.release()
        shutdown()
