"""Where mim's training view spends its time, per image, in one thread: the header parse, the
libjpeg-turbo decode, the crop + antialiased bicubic resize, and the whole view, on the same
ImageNet-like JPEGs as benchmarks/data_throughput.py (about 500x375, quality 90).

    python benchmarks/train_view_steps.py               # 300 JPEGs from scikit-image's photos
    python benchmarks/train_view_steps.py --images ~/photos --count 1000
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_throughput import imagenet_like, photographs  # noqa: E402

from mim.data.transforms import open_image, random_resized_crop_box, resize_region, train_view  # noqa: E402


def per_image_ms(step, items: list) -> float:
    started = time.perf_counter()
    for item in items:
        step(item)
    return (time.perf_counter() - started) / len(items) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, help="a folder of photographs (default: scikit-image's)")
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what one DataLoader worker has
    with tempfile.TemporaryDirectory() as work:
        imagenet_like(photographs(args.images), args.count, Path(work))
        payloads = [path.read_bytes() for path in sorted(Path(work).rglob("*.jpg"))]
    rng = random.Random(0)
    decoded = [decode_jpeg(torch.frombuffer(bytearray(p), dtype=torch.uint8)) for p in payloads]
    crops = [(d, random_resized_crop_box(d.shape[2], d.shape[1], rng, (0.2, 1.0))) for d in decoded]
    rows = [
        ("header (PIL open, bomb check)", per_image_ms(open_image, payloads)),
        (
            "decode (libjpeg-turbo, full size)",
            per_image_ms(lambda p: decode_jpeg(torch.frombuffer(bytearray(p), dtype=torch.uint8)), payloads),
        ),
        (
            "crop + resize to 224 (uint8 bicubic AA)",
            per_image_ms(lambda c: resize_region(c[0], c[1], 224), crops),
        ),
        (
            "whole train view (RRC 0.2-1, flip)",
            per_image_ms(lambda p: train_view(p, "RGB", 224, rng, (0.2, 1.0), True), payloads),
        ),
    ]
    print(f"| step, {len(payloads)} JPEGs, one thread | ms per image |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
