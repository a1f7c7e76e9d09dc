"""Launched by torchrun (1 or 2 processes): the segmentation evaluation (mim.tasks.dense_eval) of
one seeded segmentation probe over a split of scene shards, in sliding windows. Rank 0 writes
OUT (JSON: the scores and the number of images).
Usage: SHARDS OUT"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mim.data.segmentation import SegmentSpec
from mim.data.shards import open_shards, with_lengths
from mim.data.streams import ViewSpec
from mim.data.transforms import normalize_on_device
from mim.distributed import init_distributed, read_dist_env, shutdown
from mim.models.backbone import create_vit
from mim.models.segmentation import SegmentationProbe
from mim.tasks.dense_eval import evaluate_segmentation

ARCH = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)


def main() -> None:
    shards, out = with_lengths(open_shards(sys.argv[1])), Path(sys.argv[2])
    env = read_dist_env()
    device = init_distributed(env)
    torch.manual_seed(0)
    model = SegmentationProbe(create_vit(ARCH, num_classes=0, global_pool="avg", fc_norm=False), 11, 2).eval()
    spec = ViewSpec(28, "L", segment=SegmentSpec("seg.png", 56, (1.0, 1.0), 11))
    with torch.no_grad():
        result = evaluate_segmentation(
            lambda windows: model(normalize_on_device(windows, [0.286], [0.353])),
            shards,
            spec,
            env,
            device,
            (7, 1),
            (28, 11),
        )
    if env.rank == 0:
        out.write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
