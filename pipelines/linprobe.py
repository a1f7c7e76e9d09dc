"""`mim linprobe --config F init.from=RUN_OR_CHECKPOINT key=value ...`: linear probing (MAE's
protocol): frozen backbone in eval mode, BatchNorm+Linear heads, one per base lr in probe.blrs,
trained together in one pass; top-1/top-5 of each and the best in RUN_DIR/metrics.json."""

from __future__ import annotations

import sys

from pipelines.common import reports_user_errors
from pipelines.train import run_task


@reports_user_errors("mim linprobe")
def main(argv: list[str] | None = None) -> int:
    return run_task("linprobe", argv, "mim linprobe", __doc__)


if __name__ == "__main__":
    sys.exit(main())
