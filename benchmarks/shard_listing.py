"""Peak memory of listing a large corpus for `mim shards`: a CSV of N rows (default a million)
read by the same source code `mim shards --source csv:FILE` uses; no image is read.

    python benchmarks/shard_listing.py --rows 1000000
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.sources import csv_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        table = Path(work) / "list.csv"
        with open(table, "w") as handle:
            handle.write("path,label\n")
            for index in range(args.rows):
                handle.write(
                    f"/data/imagenet/train/n{index % 1000:08d}/image_{index:08d}.JPEG,{index % 1000}\n"
                )
        started = time.perf_counter()
        source = csv_table(table)
        seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("| rows | listing time | peak RSS (whole process) |\n|---|---|---|")
    print(f"| {len(source.records)} | {seconds:.1f} s | {peak_mb:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
