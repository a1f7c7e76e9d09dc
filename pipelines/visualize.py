"""`mim visualize RUN_DIR_OR_CHECKPOINT --out reconstructions.png`: rows of original | masked |
reconstruction | reconstruction with the visible patches pasted back, for the first images of
a shard set (default: the run's training shards). Norm-pix predictions are un-normalised with
each patch's own statistics, as in the MAE paper's figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mim import checkpoint
from mim.data.shards import open_shards
from mim.data.streams import ViewSpec, first_images
from mim.errors import UserInputError
from mim.export import find_checkpoint
from mim.models import create_model
from mim.visualize import reconstruction_grid, save_png
from pipelines.common import reports_user_errors


def images_to_show(shards: str, spec: ViewSpec, count: int) -> torch.Tensor:
    images = first_images(open_shards(shards), spec, count, max_shards=1)
    if not images:
        raise UserInputError(f"{shards} holds no readable images")
    return torch.stack(images)


@reports_user_errors("mim visualize")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim visualize", description=__doc__)
    parser.add_argument("source", help="a pretraining run dir (newest checkpoint) or checkpoint dir")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--data", help="shards to take the images from (default: the run's training shards)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the run's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--scale", type=int, default=4, help="pixel zoom of the picture")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.scale < 1:
        raise UserInputError(
            f"--num-images and --scale must be at least 1, got {args.num_images} and {args.scale}"
        )
    source = find_checkpoint(args.source)
    meta = checkpoint.read_meta(source)
    if meta["stage"] != "pretrain":
        raise UserInputError(
            f"{source} is a {meta['stage']} checkpoint; reconstructions need a pretraining one"
        )
    arch = meta["model"]["arch"]
    model = create_model(meta["model"]["name"], **arch)
    model.load_state_dict(checkpoint.load_weights(source))
    spec = ViewSpec(arch["img_size"], "L" if arch["in_chans"] == 1 else "RGB")
    images = images_to_show(args.data or meta["config"]["data"]["train"], spec, args.num_images)
    mask_ratio = args.mask_ratio or meta["config"]["model"]["mask_ratio"]
    picture = reconstruction_grid(model, images, meta["mean"], meta["std"], mask_ratio, args.seed)
    save_png(picture, args.out, scale=args.scale)
    print(
        f"wrote {args.out}: {len(images)} images, step {meta['step']}, mask ratio {mask_ratio}, "
        f"norm-pix {meta['norm_pix_loss']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
