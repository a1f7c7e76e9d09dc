"""Input-pipeline images/s per worker: the official MAE pipeline (image folder, PIL decode,
RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), flip, ToTensor, Normalize) against mim's shard
pipeline with the same crop distribution, on ImageNet-like JPEGs (about 500x375, quality 90) cut
from real photographs: scikit-image's sample photos (`pip install -e .[bench]`) or `--images DIR`.

    python benchmarks/data_throughput.py                      # 1000 JPEGs, 1 worker, then 2 workers
    python benchmarks/data_throughput.py --images ~/photos --count 2000 --workers 1 4 8

Rows: train and eval views in one process with one thread (what one DataLoader worker does), the
ratio to the official pipeline, the same on shards written with `mim shards --max-size 256`, and
end to end: N DataLoader workers feeding a consumer that normalises the batches as a training
process does (images/s over the whole loader).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.shards import open_shards, write_shards  # noqa: E402
from mim.data.sources import IMAGE_EXTENSIONS, image_folder  # noqa: E402
from mim.data.streams import EvalStream, TrainStream, ViewSpec, train_loader  # noqa: E402
from mim.data.transforms import normalize_on_device  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SKIMAGE_PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, help="a folder of photographs (default: scikit-image's)")
    parser.add_argument("--count", type=int, default=1000, help="JPEGs to build")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="end-to-end loader workers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=256, help="the pre-downscaled shards' shorter side")
    parser.add_argument("--work-dir", type=Path, help="where to build the data (default: a temp dir)")
    return parser.parse_args()


def photographs(folder: Path | None) -> list[Image.Image]:
    if folder is not None:
        paths = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    else:
        try:
            import skimage
        except ImportError:
            raise SystemExit(
                "no photographs: pip install -e .[bench] (scikit-image's sample photos) or pass --images DIR"
            ) from None
        paths = [Path(skimage.__file__).parent / "data" / name for name in SKIMAGE_PHOTOS]
    photos = [Image.open(p).convert("RGB") for p in paths if p.is_file()]
    if not photos:
        raise SystemExit(f"no readable photographs in {folder or 'scikit-image data'}")
    return photos


def imagenet_like(photos: list[Image.Image], count: int, folder: Path) -> None:
    """`count` JPEGs of 500x375 (a quarter portrait 375x500), quality 90, each a random crop of a
    photograph, in folder/<class>/ (10 classes) as an image folder."""
    rng = random.Random(0)
    for index in range(count):
        photo = rng.choice(photos)
        size = (375, 500) if rng.random() < 0.25 else (500, 375)
        aspect = size[0] / size[1]
        scale = rng.uniform(0.3, 1.0) ** 0.5
        width = min(photo.width, round(photo.width * scale))
        height = min(photo.height, round(width / aspect))
        width = round(height * aspect)
        left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
        image = photo.resize(size, Image.BICUBIC, box=(left, top, left + width, top + height))
        target = folder / f"class{index % 10}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="JPEG", quality=90)


def official_transforms(train: bool):
    from torchvision import transforms

    if train:
        steps = [
            transforms.RandomResizedCrop(
                224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
        ]
    else:  # the MAE linear-probe / fine-tune evaluation view
        steps = [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
        ]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def rate(items, count: int) -> float:
    started = time.perf_counter()
    seen = 0
    for item in items:
        seen += len(item) if isinstance(item, torch.Tensor) and item.dim() == 4 else 1
        if seen >= count:
            break
    return seen / (time.perf_counter() - started)


def official_per_worker(folder: Path, train: bool, count: int) -> float:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=official_transforms(train))
    order = list(range(len(dataset)))
    random.Random(1).shuffle(order)
    return rate((dataset[i][0] for i in order), count)


def mim_train_stream(shards: Path, batch: int, rank: int = 0) -> TrainStream:
    spec = ViewSpec(224, "RGB", crop_scale=(0.2, 1.0), hflip=True)
    return TrainStream(open_shards(str(shards)), spec, batch, seed=0, rank=rank, shards_per_chunk=2)


def mim_per_worker(shards: Path, train: bool, count: int) -> float:
    if train:
        stream = mim_train_stream(shards, 16)
        return rate((batch["images"] for batch in stream), count)
    stream = EvalStream(open_shards(str(shards)), ViewSpec(224, "RGB"), 0, 1, crop_fraction=224 / 256)
    return rate((image for image, _, _ in stream), count)


def end_to_end_official(folder: Path, workers: int, batch: int, count: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=official_transforms(True))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=4,
    )
    return rate((images for images, _ in _forever(loader)), count)


def end_to_end_mim(shards: Path, workers: int, batch: int, count: int) -> float:
    loader = train_loader(mim_train_stream(shards, batch), workers)
    batches = (normalize_on_device(b["images"], MEAN, STD) for b in loader)
    return rate(batches, count)


def median_of_3(measure, *arguments) -> float:
    return sorted(measure(*arguments) for _ in range(3))[1]


def _forever(loader):
    while True:
        yield from loader


def main() -> int:
    args = parse()
    torch.set_num_threads(1)  # one worker process does its work on one thread
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mim-data-bench-"))
    folder, shards, small = work / "images", work / "shards", work / "shards-max256"
    if not folder.is_dir():
        print(f"building {args.count} ImageNet-like JPEGs in {folder} ...", flush=True)
        imagenet_like(photographs(args.images), args.count, folder)
    if not (shards / "_info.json").is_file():
        write_shards(image_folder(folder), shards, shard_size=250)
    if not (small / "_info.json").is_file():
        write_shards(image_folder(folder), small, shard_size=250, max_size=args.max_size)
    sizes = [Image.open(io.BytesIO(p.read_bytes())).size for p in sorted(folder.rglob("*.jpg"))[:50]]
    mean_bytes = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / args.count
    print(f"data: {args.count} JPEGs, e.g. {sizes[0]}, mean {mean_bytes / 1024:.0f} KiB; shards in {work}")
    count = min(args.count, 1000)
    rows = []
    for view, train in (
        ("train (RandomResizedCrop 224, flip)", True),
        ("eval (resize 256, centre 224)", False),
    ):
        official = median_of_3(official_per_worker, folder, train, count)
        ours = median_of_3(mim_per_worker, shards, train, count)
        ours_small = median_of_3(mim_per_worker, small, train, count)
        rows.append((f"{view}, 1 worker, median of 3", official, ours, ours_small))
    for workers in args.workers:
        total = min(args.count * 2, 40 * args.batch)
        official = end_to_end_official(folder, workers, args.batch, total)
        ours = end_to_end_mim(shards, workers, args.batch, total)
        ours_small = end_to_end_mim(small, workers, args.batch, total)
        rows.append((f"end to end, {workers} worker(s), batch {args.batch}", official, ours, ours_small))
    print(f"\nimages/s on {os.cpu_count()} CPUs (torch {torch.__version__})")
    header = ("", "official MAE", "mim", "ratio", f"mim, --max-size {args.max_size}", "ratio")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, official, ours, ours_small in rows:
        print(
            f"| {name} | {official:.0f} | {ours:.0f} | {ours / official:.2f}x | {ours_small:.0f} | "
            f"{ours_small / official:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
