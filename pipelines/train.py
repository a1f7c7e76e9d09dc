"""`mim train --task NAME --config F key=value ...`: any task (mim.tasks): the registered ones
(pretrain, linprobe, finetune; `mim pretrain` and the others are this with their task) or your own
as `--task package.module:Class` (docs/extending.md). Resumes from the newest complete checkpoint
in run.dir; on SIGUSR1/SIGTERM checkpoints, stops, and under Slurm requeues itself."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mim.config import load_config
from mim.engine.faults import requested_faults
from mim.engine.train import train
from mim.runtime import StopSignal
from mim.tasks.registry import TASKS, task_class
from pipelines.common import config_parser, reports_user_errors, started_run
from pipelines.requeue import requeue_if_stopped


def run_task(spec: str, argv: list[str] | None, prog: str, description: str) -> int:
    """Parses the task's config, checks it (and reads what it names) before any work, then runs
    the task's loop."""
    stop = StopSignal()  # from here a stop signal ends start-up within seconds (exit 0, requeued)
    task_type = task_class(spec)
    log = logging.getLogger(f"mim.{task_type.schema.STAGE or 'train'}")
    args = config_parser(prog, description, task_type.schema.STAGE).parse_args(argv)
    config = load_config(task_type.schema, args.config, args.overrides)
    inputs = task_type.check(config)  # everything is checked, and the weights read, before any work
    requested_faults()  # a MIM_FAULT that cannot be read, too
    with started_run(Path(config.run.dir)) as (env, device):
        task = task_type(config, inputs, env, device)
        outcome = train(task, env, device, stop)
        log.info(
            "%s stopped at step %d of %d (%s)%s",
            task.stage,
            outcome.step,
            outcome.total_steps,
            outcome.reason,
            task.summary(),
        )
    return requeue_if_stopped(outcome.reason, env)


@reports_user_errors("mim train")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mim train", description=__doc__, add_help=False)
    parser.add_argument("--task", help="a registered task or package.module:Class")
    known, rest = parser.parse_known_args(argv)
    if known.task is None:
        task_class("pretrain")  # the built-in tasks register themselves on import
        usage = (
            "usage: mim train --task NAME_OR_PATH [--config CONFIG] [--help-config] [key=value ...]\n"
            f"registered tasks: {', '.join(TASKS.names())}; your own: --task package.module:Class\n"
            "(mim train --task NAME --help: that task's options)"
        )
        asked = any(arg in ("-h", "--help") for arg in rest)
        print(usage, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return run_task(known.task, rest, f"mim train --task {known.task}", __doc__)


if __name__ == "__main__":
    sys.exit(main())
