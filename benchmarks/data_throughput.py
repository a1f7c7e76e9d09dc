"""Input-pipeline images/s per worker: the official MAE pipeline (image folder, PIL decode,
RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), flip, ToTensor, Normalize) against mim's shard
pipeline with the same crop distribution, on ImageNet-like JPEGs (about 500x375, quality 90) cut
from real photographs: scikit-image's sample photos (`pip install -e .[bench]`) or `--images DIR`.

    python benchmarks/data_throughput.py                      # 1000 JPEGs, 1 worker, then 2 workers
    python benchmarks/data_throughput.py --images ~/photos --count 2000 --workers 1 4 8

Rows: train and eval views in one process with one thread (what one DataLoader worker does), the
ratio to the official pipeline, the same on shards written with `mim shards --max-size 256`, and
the same shards read from a loopback HTTP server (Python's http.server, a separate process); then
end to end: N DataLoader workers feeding a consumer that normalises the batches as a training
process does, timed at steady state (after the first 2 x N batches; the time to those first
batches, worker start-up included, is a table of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.loaders import train_loader  # noqa: E402
from mim.data.shards import open_shards, write_shards  # noqa: E402
from mim.data.sources import IMAGE_EXTENSIONS, image_folder  # noqa: E402
from mim.data.streams import EvalStream, TrainStream, ViewSpec  # noqa: E402
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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are shown")
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


def mim_train_stream(shards: str, batch: int, rank: int = 0) -> TrainStream:
    spec = ViewSpec(224, "RGB", crop_scale=(0.2, 1.0), hflip=True)
    return TrainStream(open_shards(shards), spec, batch, seed=0, rank=rank, shards_per_chunk=2)


def mim_per_worker(shards: str, train: bool, count: int) -> float:
    if train:
        stream = mim_train_stream(shards, 16)
        return rate((batch.images for batch in stream), count)
    stream = EvalStream(open_shards(shards), ViewSpec(224, "RGB"), 0, 1, crop_fraction=224 / 256)
    return rate((image for image, _, _ in stream), count)


def steady_state(batches: Iterator[torch.Tensor], warm: int, count: int) -> tuple[float, float]:
    """(seconds to the first `warm` batches, images/s over the next `count` images)."""
    started = time.perf_counter()
    for _ in range(warm):
        next(batches)
    warmed = time.perf_counter()
    seen = 0
    for images in batches:
        seen += len(images)
        if seen >= count:
            break
    return warmed - started, seen / (time.perf_counter() - warmed)


def end_to_end_official(folder: Path, workers: int, batch: int, count: int) -> tuple[float, float]:
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
    return steady_state((images for images, _ in _forever(loader)), 2 * workers, count)


def end_to_end_mim(shards: str, workers: int, batch: int, count: int) -> tuple[float, float]:
    loader = train_loader(mim_train_stream(shards, batch), workers)
    batches = (normalize_on_device(b.images, MEAN, STD) for b in loader)
    return steady_state(batches, 2 * workers, count)


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """`python -m http.server` on 127.0.0.1 serving `root`, in its own process."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(root),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def interleaved(measures: dict[str, Callable[[], Any]], rounds: int) -> dict[str, Any]:
    """Each measure `rounds` times, in turns (so that the machine's drift hits all alike); the
    median of each (of each component, for tuples)."""
    results: dict[str, list] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return {
        name: tuple(map(statistics.median, zip(*values, strict=True)))
        if isinstance(values[0], tuple)
        else statistics.median(values)
        for name, values in results.items()
    }


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
    with http_server(work) as url:
        sources = {"local": str(shards), "small": str(small), "http": f"{url}/shards/_info.json"}
        rows, startup = [], []
        for view, train in (
            ("train (RandomResizedCrop 224, flip)", True),
            ("eval (resize 256, centre 224)", False),
        ):
            measures = {"official": functools.partial(official_per_worker, folder, train, count)}
            measures |= {
                name: functools.partial(mim_per_worker, spec, train, count) for name, spec in sources.items()
            }
            rates = interleaved(measures, args.rounds)
            rows.append((f"{view}, 1 worker", rates.pop("official"), rates))
        for workers in args.workers:
            total = min(args.count * 2, 40 * args.batch)
            measures = {
                "official": functools.partial(end_to_end_official, folder, workers, args.batch, total)
            }
            measures |= {
                name: functools.partial(end_to_end_mim, spec, workers, args.batch, total)
                for name, spec in sources.items()
            }
            timed = interleaved(measures, args.rounds)
            official_start, official = timed.pop("official")
            rows.append(
                (
                    f"end to end, {workers} worker(s), batch {args.batch}, steady state",
                    official,
                    {name: rate for name, (_, rate) in timed.items()},
                )
            )
            startup.append((workers, official_start, {name: start for name, (start, _) in timed.items()}))
    print(
        f"\nimages/s on {os.cpu_count()} CPUs (torch {torch.__version__}), medians of {args.rounds} interleaved rounds"
    )
    header = (
        "",
        "official MAE",
        "mim",
        "ratio",
        f"mim, --max-size {args.max_size}",
        "ratio",
        "mim over HTTP",
        "HTTP / local",
    )
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, official, ours in rows:
        local, small_rate, remote = ours["local"], ours["small"], ours["http"]
        print(
            f"| {name} | {official:.0f} | {local:.0f} | {local / official:.2f}x | {small_rate:.0f} | "
            f"{small_rate / official:.2f}x | {remote:.0f} | {remote / local:.2f} |"
        )
    print(
        f"\nseconds to the first 2 x N batches of {args.batch} (worker start-up, first shards, first decodes)"
    )
    print("| workers | official MAE | mim | mim, --max-size | mim over HTTP |\n|---|---|---|---|---|")
    for workers, official_start, ours in startup:
        print(
            f"| {workers} | {official_start:.2f} | {ours['local']:.2f} | {ours['small']:.2f} | {ours['http']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
