"""The data path's images/s for images that are not 8-bit RGB, against 8-bit RGB at the same pixel
count: what one data worker does per sample (decode, RandomResizedCrop(224, scale=(0.2, 1.0)),
flip), in one process with one thread, interleaved over rounds, on synthetic images with
structure (smooth gradients plus noise, so that PNG compresses as on real data).

Rows: 8-bit RGB as JPEG (q90) and as PNG, 16-bit grey PNG, and 4-band (and 13-band) 16-bit .npy
arrays, all H x W; the bytes per image each takes in a shard; and the batch bytes per image that
cross to the training process (uint8 for 8-bit images, float32 for the others).

    python benchmarks/band_throughput.py                          # 256 images of 320 x 320, 5 rounds
    python benchmarks/band_throughput.py --size 512 --count 128 --rounds 7
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.pixels import mode_for  # noqa: E402
from mim.data.transforms import train_view  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=320, help="images are SIZE x SIZE")
    parser.add_argument("--count", type=int, default=256, help="images per kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--view", type=int, default=224, help="the training view's size")
    return parser.parse_args()


def structured(rng: np.random.Generator, size: int, bands: int) -> np.ndarray:
    """(size, size, bands) in [0, 1]: a smooth random field per band plus a little noise."""
    coarse = rng.random((8, 8, bands))
    field = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(coarse).permute(2, 0, 1)[None],
            size=(size, size),
            mode="bicubic",
            align_corners=False,
        )[0].permute(1, 2, 0)
    )
    return np.clip(field + rng.normal(0, 0.02, field.shape), 0, 1)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def payloads(size: int, count: int) -> dict[str, tuple[str, list[bytes]]]:
    """kind -> (view mode, encoded images)."""
    rng = np.random.default_rng(0)
    kinds: dict[str, tuple[str, list[bytes]]] = {
        "8-bit RGB, JPEG q90": ("RGB", []),
        "8-bit RGB, PNG": ("RGB", []),
        "16-bit grey, PNG": ("L", []),
        "16-bit 4 bands, .npy": (mode_for(4), []),
        "16-bit 13 bands, .npy": (mode_for(13), []),
    }
    for _ in range(count):
        rgb = Image.fromarray((structured(rng, size, 3) * 255).round().astype(np.uint8))
        kinds["8-bit RGB, JPEG q90"][1].append(encoded(rgb, "JPEG", quality=90))
        kinds["8-bit RGB, PNG"][1].append(encoded(rgb, "PNG"))
        grey = (structured(rng, size, 1)[:, :, 0] * 65535).round().astype(np.uint16)
        kinds["16-bit grey, PNG"][1].append(encoded(Image.fromarray(grey), "PNG"))
        for bands in (4, 13):
            array = (structured(rng, size, bands) * 65535).round().astype(np.uint16)
            kinds[f"16-bit {bands} bands, .npy"][1].append(npy(array))
    return kinds


def images_per_second(mode: str, images: list[bytes], view: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    began = time.perf_counter()
    for payload in images:
        out = train_view(payload, mode, view, rng, (0.2, 1.0), True)
    return len(images) / (time.perf_counter() - began), out.element_size() * out.numel()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    kinds = payloads(args.size, args.count)
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    batch_bytes: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name, (mode, images) in kinds.items():
            rate, batch_bytes[name] = images_per_second(mode, images, args.view, round_)
            rates[name].append(rate)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    base = statistics.median(rates["8-bit RGB, JPEG q90"])
    print(f"\n{args.count} images of {args.size} x {args.size} per kind, train view {args.view}, one thread; "
          f"medians of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| images | img/s | against 8-bit RGB JPEG | KiB per image in a shard | KiB per image in a batch |")
    print("|---|---|---|---|---|")
    for name, (_, images) in kinds.items():
        rate = statistics.median(rates[name])
        stored = statistics.mean(len(p) for p in images) / 1024
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {stored:.0f} | {batch_bytes[name] / 1024:.0f} |")


if __name__ == "__main__":
    main()
