"""What logging to W&B and MLflow costs a run, against TensorBoard alone, in one process.

1. Per call: the real callbacks (TensorBoard, W&B in offline mode, MLflow on a local file store)
   are given what the loop gives them at a log line (the train/* scalars, then a flush) and at a
   picture step (a 3 x 512 x 1024 reconstruction grid), interleaved over rounds; the table gives
   the medians and their share of a training step at log.every=50 and log.recon_every=5000.
2. Whole steps: training steps of the CPU demo's model with no tracker started, against the same
   steps with W&B and MLflow started and logging the scalars after every step (their background
   work, W&B's service process included, runs beside the steps), interleaved over rounds.

    python benchmarks/tracker_cost.py                     # 5 rounds
    python benchmarks/tracker_cost.py --rounds 9 --batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.config import PretrainConfig, load_config  # noqa: E402
from mim.engine.callbacks import TensorBoard  # noqa: E402
from mim.engine.trackers import MlflowTracker, WandbTracker  # noqa: E402
from mim.models import create_model  # noqa: E402

SCALARS = ("loss", "lr", "grad_norm", "images_per_sec", "samples_seen", "bad_samples")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=200, help="log lines per round")
    parser.add_argument("--pictures", type=int, default=20, help="pictures per round")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round and variant")
    parser.add_argument("--batch", type=int, default=32, help="the demo model's batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=int, default=50, help="log.every the share is given for")
    parser.add_argument(
        "--recon-every", type=int, default=5000, help="log.recon_every the share is given for"
    )
    return parser.parse_args()


def sinks(root: Path, only_trackers: bool = False) -> dict[str, object]:
    overrides = [
        f"run.dir={root / 'run'}", "log.wandb=mim-benchmark", "log.wandb_mode=offline",
        f"log.mlflow=file:{root / 'mlruns'}",
    ]  # fmt: skip
    config = load_config(PretrainConfig, "pretrain/cpu_fashion_mnist", overrides)
    made = {
        **({} if only_trackers else {"TensorBoard": TensorBoard(root / "run")}),
        "W&B (offline)": WandbTracker(config, root / "run"),
        "MLflow (file store)": MlflowTracker(config, root / "run"),
    }
    for name, sink in made.items():
        if hasattr(sink, "start"):
            sink.start("pretrain")
            assert sink.live, f"{name} did not start"
    return made


def log_lines(sink, lines: int, start: int) -> float:
    began = time.perf_counter()
    for line in range(lines):
        step = start + line
        sink.on_scalars(step, {f"train/{name}": 1.0 / (step + 1) for name in SCALARS})
        sink.flush()
    return (time.perf_counter() - began) / lines


def pictures(sink, count: int, start: int) -> float:
    grid = torch.rand(3, 512, 1024)
    began = time.perf_counter()
    for number in range(count):
        sink.on_image(start + number, "reconstructions", grid)
    sink.flush()
    return (time.perf_counter() - began) / count


def training_steps(model, optimizer, images: torch.Tensor, steps: int, trackers=()) -> float:
    began = time.perf_counter()
    for step in range(steps):
        loss, _, _ = model(images, mask_ratio=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for tracker in trackers:
            tracker.on_scalars(step, {f"train/{name}": float(loss) for name in SCALARS})
    return (time.perf_counter() - began) / steps


def steps_with_and_without(model, optimizer, images, args, root: Path) -> tuple[list[float], list[float]]:
    without, with_trackers = [], []
    for round_ in range(args.rounds):
        without.append(training_steps(model, optimizer, images, args.steps))
        trackers = sinks(root / f"steps-{round_}", only_trackers=True)
        with_trackers.append(training_steps(model, optimizer, images, args.steps, trackers.values()))
        for tracker in trackers.values():
            tracker.after_loop(SimpleNamespace(reason="finished"))
        print(f"steps round {round_ + 1}/{args.rounds}: {with_trackers[-1] / without[-1]:.3f}", flush=True)
    return without, with_trackers


def main() -> None:
    args = parse()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it on a file store
    torch.manual_seed(0)
    model = create_model("mae_vit_demo_patch4")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 1, 28, 28)
    with tempfile.TemporaryDirectory() as scratch:
        made = sinks(Path(scratch))
        line_s = {name: [] for name in made}
        picture_s = {name: [] for name in made}
        step_s = []
        for round_ in range(args.rounds):
            step_s.append(training_steps(model, optimizer, images, args.steps))
            for name, sink in made.items():
                line_s[name].append(log_lines(sink, args.lines, round_ * args.lines))
                picture_s[name].append(pictures(sink, args.pictures, round_ * args.pictures))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        for sink in made.values():
            sink.after_loop(SimpleNamespace(reason="finished"))
        without, with_trackers = steps_with_and_without(model, optimizer, images, args, Path(scratch))
    step = statistics.median(step_s)
    print(f"\nmae_vit_demo_patch4, batch {args.batch}, plain training step {step * 1e3:.1f} ms; medians of "
          f"{args.rounds} interleaved rounds; share of a step at log.every={args.every}, "
          f"log.recon_every={args.recon_every}\n")  # fmt: skip
    print("| sink | ms per log line | ms per picture | per step, share of the step |\n|---|---|---|---|")
    for name in made:
        line, picture = statistics.median(line_s[name]), statistics.median(picture_s[name])
        per_step = line / args.every + picture / args.recon_every
        print(f"| {name} | {line * 1e3:.2f} | {picture * 1e3:.1f} | {per_step / step:.3%} |")
    ratios = [w / o for w, o in zip(with_trackers, without, strict=True)]
    print(f"\nwhole steps, {args.steps} per variant per round: none {statistics.median(without) * 1e3:.1f} ms, "
          f"W&B + MLflow logging every step {statistics.median(with_trackers) * 1e3:.1f} ms; "
          f"ratio median {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
