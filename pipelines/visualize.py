"""`mim visualize SOURCE --out reconstructions.png`: rows of original | masked | reconstruction |
reconstruction with the visible patches pasted back, for the first images of a shard set
(default: the run's training shards). Norm-pix predictions are un-normalised with each patch's
own statistics, as in the MAE paper's figures. SOURCE: a pretraining run dir or checkpoint.

`mim visualize SOURCE --attention [--block N] --out attention.png`: rows of image | the cls
token's attention to the patches in the last block (or block N, counted from 1; -1 is the last,
-2 the one before), one map per head | their mean. SOURCE: any mim run dir or checkpoint (pretraining, linear probe,
fine-tuning), a mim export, an official MAE .pth or timm ViT weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mim import checkpoint
from mim.config import DEFAULT_IMAGE_KEY
from mim.data.shards import open_shards
from mim.data.streams import ViewSpec, first_images
from mim.errors import UserInputError
from mim.models import create_model
from mim.models.attention import check_block
from mim.models.backbone import create_vit, load_encoder
from mim.models.target_kinds import TARGETS
from mim.pictures import save_png
from mim.registry import UnknownPart
from mim.visualize import attention_grid, reconstruction_grid
from mim.weights import load_weights
from pipelines.common import reports_user_errors

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def images_to_show(shards: str, spec: ViewSpec, count: int) -> torch.Tensor:
    images = first_images(open_shards(shards), spec, count, max_shards=1)
    if not images:
        raise UserInputError(f"{shards} holds no readable images")
    return torch.stack(images)


def shown_name(source: Path) -> str:
    """What a picture's heading calls its source: the run of a checkpoint dir, else the name."""
    source = Path(source).resolve()
    return source.parents[1].name if source.parent.name == "checkpoints" else source.name


def image_key(args: argparse.Namespace, meta: dict) -> str:
    """--image-key, else the run's data.image_key, else the default."""
    return args.image_key or meta.get("config", {}).get("data", {}).get("image_key") or DEFAULT_IMAGE_KEY


def predicts_pixels(kind: str) -> bool:
    """Whether a checkpoint's target.kind predicts pixels (a plug-in target that does not import
    here is taken as not)."""
    try:
        return TARGETS.get(kind).predicts_pixels
    except UnknownPart:
        return False


def reconstructions(args: argparse.Namespace) -> str:
    source = checkpoint.resolve(args.source)
    meta = checkpoint.read_meta(source)
    if not checkpoint.load_meta(source).holds_mae:
        raise UserInputError(
            f"{source} is a {meta['stage']} checkpoint; reconstructions need a pretraining one "
            "(--attention works on any checkpoint)"
        )
    kind = meta.get("target", {}).get("kind", "pixels")
    if not predicts_pixels(kind):
        raise UserInputError(
            f"{source} was pretrained with target.kind={kind}: its decoder predicts {kind} features, "
            "not pixels, so there are no reconstructions to draw (--attention works on it)"
        )
    arch = meta["model"]["arch"]
    model = create_model(meta["model"]["name"], **arch)
    model.load_state_dict(checkpoint.load_weights(source))
    spec = ViewSpec(
        arch["img_size"], "L" if arch["in_chans"] == 1 else "RGB", image_key=image_key(args, meta)
    )
    images = images_to_show(args.data or meta["config"]["data"]["train"], spec, args.num_images)
    mask_ratio = args.mask_ratio or meta["config"]["model"]["mask_ratio"]
    what = f"{shown_name(source)}, step {meta['step']}"
    grid = reconstruction_grid(model, images, meta["mean"], meta["std"], mask_ratio, args.seed, what)
    save_png(grid, args.out)
    return f"{len(images)} images, step {meta['step']}, mask ratio {mask_ratio}, norm-pix {meta['norm_pix_loss']}"


def attention(args: argparse.Namespace) -> str:
    if not Path(args.source).exists():
        raise FileNotFoundError(
            f"{args.source} does not exist (expected a mim run dir, checkpoint or export, or a weights file)"
        )
    weights = load_weights(args.source)
    encoder = create_vit(weights.arch, num_classes=0, global_pool="token", fc_norm=False)
    # A fine-tuned model brings its head (and fc_norm instead of the final norm): neither
    # touches the attention of any block.
    load_encoder(
        encoder,
        weights,
        allowed_missing={"norm.weight", "norm.bias"},
        allowed_unexpected={"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"},
    )
    depth = len(encoder.blocks)
    if args.block == 0 or not -depth <= args.block <= depth:
        raise UserInputError(
            f"--block {args.block} does not exist: this encoder has {depth} blocks, counted from 1 "
            f"(1..{depth}, or -1..-{depth} from the end)"
        )
    block = check_block(encoder, args.block - 1 if args.block > 0 else args.block)
    meta = weights.meta
    data_config = meta.get("config", {}).get("data", {})
    normalization = meta.get("pretrained_cfg", data_config)  # an export's config.json, or a run's data
    mean, std = normalization.get("mean", IMAGENET[0]), normalization.get("std", IMAGENET[1])
    shards = args.data or data_config.get("train")
    if not shards:
        raise UserInputError(f"{weights.source} does not say which images it saw: pass --data SHARDS")
    mode = "L" if weights.arch["in_chans"] == 1 else "RGB"
    spec = ViewSpec(weights.arch["img_size"], mode, image_key=image_key(args, meta))
    images = images_to_show(shards, spec, args.num_images)
    what = shown_name(Path(args.source)) + (f", step {meta['step']}" if "step" in meta else "")
    save_png(attention_grid(encoder, images, mean, std, block, what), args.out)
    return f"{len(images)} images, block {block + 1} of {depth}, {weights.arch['num_heads']} heads"


@reports_user_errors("mim visualize")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim visualize", description=__doc__)
    parser.add_argument(
        "source", help="a run dir (newest checkpoint), checkpoint dir, export or weights file"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--attention", action="store_true", help="cls-token attention maps per head")
    parser.add_argument(
        "--block",
        type=int,
        default=-1,
        help="--attention: the block, counted from 1; -1 the last (the default)",
    )
    parser.add_argument("--data", help="shards to take the images from (default: the run's training shards)")
    parser.add_argument(
        "--image-key", help="the image member(s), ;-separated (default: the run's data.image_key)"
    )
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the run's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        raise UserInputError(f"--num-images must be at least 1, got {args.num_images}")
    described = attention(args) if args.attention else reconstructions(args)
    print(f"wrote {args.out}: {described}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
