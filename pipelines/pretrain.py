"""`mim pretrain --config F key=value ...`: MAE pretraining; resumes from the newest complete
checkpoint in run.dir; on SIGUSR1/SIGTERM checkpoints, stops, and under Slurm requeues itself."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mim.config import PretrainConfig, load_config, write_config
from mim.distributed import any_rank, init_distributed, read_dist_env, shutdown
from mim.engine.pretrainer import Pretrainer
from mim.recipe import check_pretrain
from mim.runtime import RunDirBusy, RunLock, StopSignal, setup_logging
from pipelines.common import config_parser, reports_user_errors
from pipelines.requeue import requeue_if_stopped

log = logging.getLogger("mim.pretrain")


@reports_user_errors("mim pretrain")
def main(argv: list[str] | None = None) -> int:
    args = config_parser("mim pretrain", __doc__).parse_args(argv)
    config = load_config(PretrainConfig, args.config, args.overrides)
    arch, shards = check_pretrain(config)  # everything is checked before any work
    env = read_dist_env()
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(env.rank, run_dir / "log.txt")
    stop = StopSignal()
    device = init_distributed(env)
    lock = RunLock(run_dir)
    busy = None
    if env.is_main:
        try:
            lock.acquire()
        except RunDirBusy as error:
            busy = error
    if any_rank(busy is not None, device):
        shutdown()
        raise busy or RunDirBusy(f"run dir {run_dir} is in use by another job")
    try:
        if env.is_main:
            write_config(config, run_dir / "config.yaml")
        outcome = Pretrainer(config, arch, shards, env, device, stop).run()
    finally:
        lock.release()
    log.info("stopped at step %d of %d (%s)", outcome.step, outcome.total_steps, outcome.reason)
    shutdown()
    return requeue_if_stopped(outcome.reason, env)


if __name__ == "__main__":
    sys.exit(main())
