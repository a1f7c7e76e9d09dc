"""Peak memory of one data worker against shard size: a training stream (one worker's work:
read, shuffle, decode, crop) over shards of 100, 1000 and 10000 samples, each run in a fresh
process that reports its peak RSS (ru_maxrss). mim streams shards through a bounded shuffle buffer
(`data.shuffle_buffer` samples), so the peak should not follow the shard size; the "whole shards"
column loads each chunk's shards into memory first, as mim did before, for comparison.

    python benchmarks/data_memory.py                       # 100 / 1000 / 10000 samples per shard
    python benchmarks/data_memory.py --sizes 1000 10000 --sample-kib 100 --buffer 1000
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.shards import open_shards, write_shards  # noqa: E402
from mim.data.sources import Record, Source  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="samples per shard")
    parser.add_argument("--sample-kib", type=int, default=64, help="about this many KiB per JPEG")
    parser.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    parser.add_argument("--batches", type=int, default=40, help="batches of 32 each worker produces")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--measure", nargs=3, metavar=("SHARDS", "MODE", "BUFFER"), help=argparse.SUPPRESS)
    return parser.parse_args()


def noisy_jpeg(rng: np.random.Generator, kib: int) -> bytes:
    """A 384x384 JPEG whose size is about `kib` KiB (noise compresses badly; the quality sets it)."""
    pixels = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(pixels).resize((48, 48)).resize((384, 384), Image.BICUBIC))
    mixed = (0.8 * smooth + 0.2 * pixels).astype(np.uint8)
    for quality in (95, 85, 75, 60, 45, 30):
        buffer = io.BytesIO()
        Image.fromarray(mixed).save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= kib * 1024:
            break
    return buffer.getvalue()


def build(folder: Path, samples_per_shard: int, kib: int) -> None:
    """Two shards of `samples_per_shard` samples (a chunk's worth), 32 distinct images repeated."""
    rng = np.random.default_rng(0)
    payloads = [noisy_jpeg(rng, kib) for _ in range(32)]
    records = [
        Record(f"s{i}", i % 10, lambda p=payloads[i % 32]: (p, "jpg")) for i in range(2 * samples_per_shard)
    ]
    write_shards(
        Source(records, [str(c) for c in range(10)]), folder, name="train", shard_size=samples_per_shard
    )


def measure(shards: str, mode: str, buffer: int, batches: int) -> dict:
    """Runs in the child: one worker's stream, then its peak RSS."""
    from mim.data import streams
    from mim.data.streams import TrainStream, ViewSpec

    if mode == "whole":  # the former reader: each chunk's shards read into memory, then shuffled
        original = streams.shuffled

        def whole(samples, rng, size):
            return original(list(samples), rng, 1 << 30)

        streams.shuffled = whole
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stream = TrainStream(open_shards(shards), ViewSpec(224, "RGB"), 32, seed=0, rank=0, shuffle_buffer=buffer)
    for _, _ in zip(range(batches), stream, strict=False):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak / 1024, "startup_mib": base / 1024}


def main() -> int:
    args = parse()
    if args.measure:
        shards, mode, buffer = args.measure
        print(json.dumps(measure(shards, mode, int(buffer), args.batches)))
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mim-memory-bench-"))
    rows = []
    for size in args.sizes:
        folder = work / f"shards-{size}"
        if not (folder / "_info.json").is_file():
            print(f"building 2 shards of {size} samples in {folder} ...", flush=True)
            build(folder, size, args.sample_kib)
        shard_mib = sum(p.stat().st_size for p in folder.glob("*.tar")) / 2 / 2**20
        peaks = {}
        for mode in ("stream", "whole"):
            command = [
                sys.executable,
                __file__,
                "--batches",
                str(args.batches),
                "--measure",
                str(folder),
                mode,
                str(args.buffer),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(
            (
                size,
                shard_mib,
                peaks["stream"]["peak_mib"],
                peaks["whole"]["peak_mib"],
                peaks["stream"]["startup_mib"],
            )
        )
    print(
        f"\npeak RSS of one data worker's stream, {args.batches} batches of 32 at 224 px, shuffle buffer {args.buffer}"
    )
    print(
        "| samples per shard | shard MiB | mim (streamed) peak MiB | whole shards peak MiB | before reading MiB |"
    )
    print("|---|---|---|---|---|")
    for size, shard_mib, stream, whole, startup in rows:
        print(f"| {size} | {shard_mib:.0f} | {stream:.0f} | {whole:.0f} | {startup:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
