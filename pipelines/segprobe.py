"""`mim segprobe --config F init.from=RUN_OR_CHECKPOINT data.train=SEG_SHARDS data.val=SEG_SHARDS
key=value ...`: the segmentation probe (DINOv2's linear protocol): frozen backbone, a head on the
patch tokens of its last blocks, joint scale/crop/flip of image and mask, sliding-window
evaluation; mIoU, IoU per class and pixel accuracy in RUN_DIR/metrics.json, a picture of the
prediction in RUN_DIR/segmentation.png (docs/evaluation.md)."""

from __future__ import annotations

import sys

from pipelines.common import reports_user_errors
from pipelines.train import run_task


@reports_user_errors("mim segprobe")
def main(argv: list[str] | None = None) -> int:
    return run_task("segprobe", argv, "mim segprobe", __doc__)


if __name__ == "__main__":
    sys.exit(main())
