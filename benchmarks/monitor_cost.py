"""What the online kNN monitor costs, on the demo's data and model (Fashion-MNIST in shards of
2000, the 4-block demo ViT): reading a subset of a split (the monitor's: the first samples of every
shard; a random subset of the whole split; the whole split), and one evaluation (bank + val through
the encoder, kNN) against one training step of a plain PyTorch loop on the same model at the
demo's batch. Rounds are interleaved; the table gives the median of each.

    python benchmarks/monitor_cost.py                        # bank 5000 of 60k, val 1000 of 10k
    python benchmarks/monitor_cost.py --bank 1000 --val 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.loaders import eval_loader  # noqa: E402
from mim.data.shards import ShardSet, open_shards, with_lengths, write_shards  # noqa: E402
from mim.data.sources import fashion_mnist  # noqa: E402
from mim.data.streams import EvalStream, ViewSpec, spread_subset  # noqa: E402
from mim.data.transforms import normalize_on_device  # noqa: E402
from mim.distributed import read_dist_env  # noqa: E402
from mim.engine.evaluate import KnnSplits, knn_evaluate  # noqa: E402
from mim.models import create_model  # noqa: E402

MEAN, STD = [0.286], [0.353]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--bank", type=int, default=5000, help="monitor.bank_samples")
    parser.add_argument("--val", type=int, default=1000, help="monitor.val_samples")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="monitor.num_workers")
    parser.add_argument("--work-dir", type=Path, help="where the shards go (default: a temporary dir)")
    return parser.parse_args()


def shards_of(data: Path, split: str, root: Path) -> ShardSet:
    if not (root / split / "_info.json").is_file():
        write_shards(fashion_mnist(data, split), root / split, name=split, shard_size=2000)
    return with_lengths(open_shards(str(root / split)))


def read_seconds(shards: ShardSet, subset: tuple[int, ...] | None, workers: int) -> float:
    spec = ViewSpec(28, "L", needs_label=True)
    started, count = time.monotonic(), 0
    for _, labels, _ in eval_loader(EvalStream(shards, spec, 0, 1, 1.0, subset), 256, workers):
        count += len(labels)
    return time.monotonic() - started


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    started = time.monotonic()
    loss, _, _ = model(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.monotonic() - started


def main() -> None:
    args = parse()
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="monitor-cost-"))
    bank, val = shards_of(args.data, "train", root), shards_of(args.data, "test", root)
    spread = spread_subset(bank.lengths, args.bank)
    scattered = tuple(sorted(random.Random(0).sample(range(bank.num_samples), args.bank)))
    torch.manual_seed(0)
    model = create_model("mae_vit_demo_patch7", img_size=28, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = normalize_on_device((torch.rand(256, 1, 28, 28) * 255).to(torch.uint8), MEAN, STD)
    splits = KnnSplits(bank, val, len(bank.classes), spread, spread_subset(val.lengths, args.val))

    def features_of(images: torch.Tensor) -> torch.Tensor:
        return model.forward_features(normalize_on_device(images, MEAN, STD))[:, 1:].mean(1)

    def evaluation() -> float:
        started = time.monotonic()
        model.eval()
        knn_evaluate(
            features_of, splits, splits_spec, env, torch.device("cpu"), (256, args.workers, 1.0), 20, 0.07
        )
        model.train()
        return time.monotonic() - started

    env, splits_spec = read_dist_env(), ViewSpec(28, "L", needs_label=True)
    step_seconds(model, optimizer, batch)  # warm-up
    times: dict[str, list[float]] = {}
    for round_number in range(args.rounds):
        for name, measure in (
            (
                "read: the monitor's subset (first samples of every shard)",
                lambda: read_seconds(bank, spread, args.workers),
            ),
            ("read: a random subset of the whole split", lambda: read_seconds(bank, scattered, args.workers)),
            ("read: the whole split", lambda: read_seconds(bank, None, args.workers)),
            ("one monitor evaluation (bank + val, encoder, kNN)", evaluation),
            (
                "one training step, batch 256 (plain PyTorch)",
                lambda: statistics.median(step_seconds(model, optimizer, batch) for _ in range(5)),
            ),
        ):
            times.setdefault(name, []).append(measure())
        print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians["one training step, batch 256 (plain PyTorch)"]
    print(
        f"\nbank {args.bank} of {bank.num_samples}, val {args.val} of {val.num_samples}, {args.workers} worker(s), "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds\n"
    )
    print("| what | seconds | training steps |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {seconds / step:.1f} |")


if __name__ == "__main__":
    main()
