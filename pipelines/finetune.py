"""`mim finetune --config F init.from=RUN_OR_CHECKPOINT key=value ...`: supervised fine-tuning
(MAE's protocol): average pool + fc_norm + head, layer-wise lr decay, drop path, mixup/cutmix,
label smoothing, RandAugment, random erasing; init.from=none trains the same ViT from scratch."""

from __future__ import annotations

import sys

from pipelines.common import reports_user_errors
from pipelines.train import run_task


@reports_user_errors("mim finetune")
def main(argv: list[str] | None = None) -> int:
    return run_task("finetune", argv, "mim finetune", __doc__)


if __name__ == "__main__":
    sys.exit(main())
