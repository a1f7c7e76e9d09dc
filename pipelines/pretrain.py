"""`mim pretrain --config F key=value ...`: MAE pretraining; resumes from the newest complete
checkpoint in run.dir; on SIGUSR1/SIGTERM checkpoints, stops, and under Slurm requeues itself."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mim.config import PretrainConfig, load_config
from mim.engine.pretrainer import Pretrainer
from mim.recipe import check_init, check_monitor, check_pretrain
from mim.weights import load_weights
from pipelines.common import config_parser, reports_user_errors, started_run
from pipelines.requeue import requeue_if_stopped

log = logging.getLogger("mim.pretrain")


@reports_user_errors("mim pretrain")
def main(argv: list[str] | None = None) -> int:
    args = config_parser("mim pretrain", __doc__, "pretrain").parse_args(argv)
    config = load_config(PretrainConfig, args.config, args.overrides)
    arch, shards = check_pretrain(config)  # everything is checked before any work
    init_weights = check_init(config.init.from_, arch)
    teacher = load_weights(config.target.teacher) if config.target.teacher else None
    monitor_splits = check_monitor(config.monitor, config.data)
    with started_run(Path(config.run.dir), config) as (env, device, stop):
        pretrainer = Pretrainer(
            config,
            arch,
            shards,
            env,
            device,
            stop,
            init_weights=init_weights,
            monitor_splits=monitor_splits,
            teacher_weights=teacher,
        )
        outcome = pretrainer.run()
        log.info("stopped at step %d of %d (%s)", outcome.step, outcome.total_steps, outcome.reason)
    return requeue_if_stopped(outcome.reason, env)


if __name__ == "__main__":
    sys.exit(main())
