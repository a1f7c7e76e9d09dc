"""`mim shards`: an image corpus -> WebDataset tar shards + _info.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tqdm import tqdm

from mim.data.foreign import webdataset_source
from mim.data.members import DEFAULT_IMAGE_KEY, DEFAULT_LABEL_KEY
from mim.data.shards import write_shards
from mim.data.sources import Source, open_source
from mim.data.stats import add_to_index, pixel_stats
from mim.errors import UserInputError
from pipelines.common import reports_user_errors

WDS_PREFIX = "wds:"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mim shards", description=__doc__)
    parser.add_argument(
        "--source",
        required=True,
        help="imagefolder:DIR | csv:FILE | tsv:FILE | fashion-mnist:DIR[:train|test] | wds:SHARDS "
        "(existing local WebDataset shards: a directory, an index or a brace pattern, SHARDS::SPLIT); "
        "segmentation: segfolder:IMAGES,MASKS[,LIST] (images and PNG masks paired by name; LIST: "
        "the names to take, as VOC's ImageSets/Segmentation/train.txt) | "
        "fashion-mnist-scenes:DIR[:train|val] (canvases of several Fashion-MNIST items, labelled per pixel)",
    )
    parser.add_argument(
        "--image-key",
        default=DEFAULT_IMAGE_KEY,
        help=f"wds: the image member, the first present of ;-separated extensions (default {DEFAULT_IMAGE_KEY})",
    )
    parser.add_argument(
        "--label-key",
        default=DEFAULT_LABEL_KEY,
        help="wds: the label, a member or json:FIELD of the sample's .json (default cls)",
    )
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        help="segfolder: the mask value no class counts for (default 255, Pascal VOC's border; "
        "ADE20K's annotations mark unlabelled pixels 0: --ignore-index 0)",
    )
    parser.add_argument(
        "--classes", type=Path, help="segfolder: a text file of class names, one per line, in label order"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--name",
        default=None,
        help="split name, the shards' prefix (default: train, or the Fashion-MNIST (scenes) split)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file-to-shard assignment")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order in the shards")
    parser.add_argument("--writers", type=int, default=4, help="shards written in parallel")
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="downscale images whose shorter side is larger to this many pixels (JPEG q90); "
        "smaller shards that decode faster, e.g. 256 or 320 for 224 training",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="write only this many samples: a seeded random subset (the first ones with --no-shuffle)",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="also compute the per-band mean and std of the pixels into _info.json (the stages' "
        "normalisation when data.mean/data.std are null); refuses a split of mixed band counts",
    )
    return parser.parse_args(argv)


def with_segmentation_options(source: Source, args: argparse.Namespace) -> Source:
    if source.ignore_index is None:
        if args.ignore_index is not None or args.classes is not None:
            raise UserInputError("--ignore-index and --classes are for segmentation sources (segfolder:)")
        return source
    if args.ignore_index is not None:
        if not 0 <= args.ignore_index <= 255:
            raise UserInputError(f"--ignore-index must be a mask value 0..255, got {args.ignore_index}")
        source = dataclasses.replace(source, ignore_index=args.ignore_index)
    if args.classes is not None:
        if not args.classes.is_file():
            raise UserInputError(f"--classes {args.classes} does not exist")
        names = [line.strip() for line in args.classes.read_text().splitlines() if line.strip()]
        if not names:
            raise UserInputError(f"--classes {args.classes} names no class")
        source = dataclasses.replace(source, classes=names)
    return source


@reports_user_errors("mim shards")
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.source.startswith(WDS_PREFIX):
        with tqdm(unit="shard", desc="indexing", file=sys.stderr) as bar:
            source = webdataset_source(
                args.source[len(WDS_PREFIX) :], args.image_key, args.label_key, bar.update
            )
    else:
        source = open_source(args.source)
    source = with_segmentation_options(source, args)
    name = args.name or (
        args.source.rsplit(":", 1)[-1]
        if args.source.startswith(("fashion-mnist:", "fashion-mnist-scenes:")) and args.source.count(":") == 2
        else "train"
    )
    total = min(len(source.records), args.limit or len(source.records))
    with tqdm(total=total, unit="img", desc=f"shards {name}", file=sys.stderr) as bar:
        info = write_shards(
            source,
            args.out,
            name=name,
            shard_size=args.shard_size,
            shuffle_seed=None if args.no_shuffle else args.seed,
            num_writers=args.writers,
            on_shard_done=bar.update,
            max_size=args.max_size,
            limit=args.limit,
        )
    print(f"wrote {total} samples in {-(-total // args.shard_size)} shards: {info}")
    if args.stats:
        urls = [str(args.out / entry["name"]) for entry in json.loads(info.read_text())["shards"]]
        with tqdm(total=total, unit="img", desc="stats", file=sys.stderr) as bar:
            pixels = pixel_stats(urls, DEFAULT_IMAGE_KEY, bar.update)
        add_to_index(info, pixels)
        print(f"{pixels['bands']} band(s): mean {pixels['mean']}, std {pixels['std']} -> {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
