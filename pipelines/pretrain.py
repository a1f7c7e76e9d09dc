"""`mim pretrain --config F key=value ...`: MAE pretraining; resumes from the newest complete
checkpoint in run.dir; on SIGUSR1/SIGTERM checkpoints, stops, and under Slurm requeues itself."""

from __future__ import annotations

import sys

from pipelines.common import reports_user_errors
from pipelines.train import run_task


@reports_user_errors("mim pretrain")
def main(argv: list[str] | None = None) -> int:
    return run_task("pretrain", argv, "mim pretrain", __doc__)


if __name__ == "__main__":
    sys.exit(main())
