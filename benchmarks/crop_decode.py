"""Does decoding only the crop's region pay, with the libjpeg-turbo this machine has? Per image, one
thread, on the data benchmark's ImageNet-like JPEGs (500x375, q90) with RandomResizedCrop boxes
(scale 0.2-1, ratio 3/4-4/3), each path ending in the same 224x224 bilinear resize of the box:

- Pillow: decode the whole image (PIL, libjpeg-turbo), resize the box;
- turbo, full: TurboJPEG decode of the whole image, resize the box;
- turbo, lossless crop + decode: TurboJPEG's lossless crop to the box's MCU-aligned cover
  (tjTransform, libjpeg-turbo 2.x), then decode only that.

With libjpeg-turbo >= 3.0 a true partial decode (tj3SetCroppingRegion) would be the fourth path;
Debian bookworm ships 2.1.5. Needs PyTurboJPEG 1.x and the library:
    apt-get install libturbojpeg0 && pip install "pyturbojpeg<2"
    python benchmarks/crop_decode.py [--work-dir DIR]   # DIR from data_throughput.py --work-dir
"""

from __future__ import annotations

import argparse
import io
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_throughput import imagenet_like, photographs  # noqa: E402

MCU = 16  # 4:2:0 JPEGs: 16x16-pixel MCUs


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, help="holds images/ (built here when missing)")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are shown")
    return parser.parse_args()


def crop_box(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    area = width * height * rng.uniform(0.2, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, round(math.sqrt(area * ratio)))
    h = min(height, round(math.sqrt(area / ratio)))
    return rng.randint(0, width - w), rng.randint(0, height - h), w, h


def main() -> int:
    args = parse()
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()
    except (ImportError, OSError, RuntimeError) as error:
        raise SystemExit(
            f"needs PyTurboJPEG 1.x and libturbojpeg ({error}): "
            'apt-get install libturbojpeg0 && pip install "pyturbojpeg<2"'
        ) from None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mim-crop-bench-"))
    folder = work / "images"
    if not folder.is_dir():
        imagenet_like(photographs(None), args.count, folder)
    payloads = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[: args.count]]
    rng = random.Random(0)
    boxes = [crop_box(rng, *Image.open(io.BytesIO(p)).size) for p in payloads]

    def resized(image: Image.Image, x: int, y: int, w: int, h: int) -> Image.Image:
        x1, y1 = min(image.width, x + w), min(image.height, y + h)
        return image.resize((224, 224), Image.BILINEAR, box=(x, y, x1, y1))

    def pillow(payload: bytes, box) -> Image.Image:
        return resized(Image.open(io.BytesIO(payload)).convert("RGB"), *box)

    def turbo_full(payload: bytes, box) -> Image.Image:
        return resized(Image.fromarray(turbo.decode(payload, pixel_format=TJPF_RGB)), *box)

    def turbo_cropped(payload: bytes, box) -> Image.Image:
        x, y, w, h = box
        x0, y0 = x // MCU * MCU, y // MCU * MCU
        part = turbo.crop(payload, x0, y0, w + x - x0, h + y - y0)
        return resized(Image.fromarray(turbo.decode(part, pixel_format=TJPF_RGB)), x - x0, y - y0, w, h)

    paths = {"Pillow": pillow, "turbo, full": turbo_full, "turbo, lossless crop + decode": turbo_cropped}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, path in paths.items():
            started = time.perf_counter()
            for payload, box in zip(payloads, boxes, strict=True):
                path(payload, box)
            times[name].append((time.perf_counter() - started) / len(payloads) * 1000)
    print(
        f"\nms per image (decode + 224 resize of a RandomResizedCrop box), {len(payloads)} JPEGs, one thread,"
    )
    print(f"medians of {args.rounds} interleaved rounds")
    print("| path | ms per image |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {sorted(values)[len(values) // 2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
