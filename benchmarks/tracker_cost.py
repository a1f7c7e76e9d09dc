"""What logging to W&B and MLflow costs a run, against TensorBoard alone: short `mim pretrain` runs
of the CPU demo's model on Fashion-MNIST shards, one per variant per round, interleaved (none,
W&B offline, MLflow on a local file store, both). A run's speed is its steps after the first log
line over the time they took (the rate TensorBoard records per log window, each window holding
the previous log line's tracker calls and any pictures drawn in it); the table gives the median
over rounds and the ratio to TensorBoard alone.

    python benchmarks/tracker_cost.py                    # log.every=10, 200 steps, 3 rounds
    python benchmarks/tracker_cost.py --every 50 --steps 400 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mim.data.shards import write_shards  # noqa: E402
from mim.data.sources import fashion_mnist  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--every", type=int, default=10, help="log.every (the trackers log at each)")
    parser.add_argument("--recon-every", type=int, default=50, help="log.recon_every (pictures)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, help="shards and runs (default: a temporary dir)")
    return parser.parse_args()


def variants(root: Path) -> dict[str, list[str]]:
    wandb = ["log.wandb=mim-benchmark", "log.wandb_mode=offline"]
    mlflow = [f"log.mlflow=file:{root / 'mlruns'}"]
    return {
        "TensorBoard only": [],
        "+ W&B (offline)": wandb,
        "+ MLflow (file store)": mlflow,
        "+ both": wandb + mlflow,
    }


def steps_per_second(run_dir: Path, batch: int) -> float:
    """Steps after the first log window over their time (the harmonic mean of the windows' rates)."""
    events = sorted(
        EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/images_per_sec"), key=lambda e: e.step
    )
    later = list(zip(events[:-1], events[1:], strict=True))  # (previous log line, this one)
    steps = sum(this.step - before.step for before, this in later)
    return steps / sum((this.step - before.step) * batch / this.value for before, this in later)


def run(args: argparse.Namespace, shards: Path, run_dir: Path, extra: list[str]) -> float:
    epochs = args.steps * args.batch / 60000
    command = [
        sys.executable, "-m", "pipelines.cli", "pretrain", "--config", "pretrain/cpu_fashion_mnist",
        f"data.train={shards}", f"run.dir={run_dir}", f"data.batch_size={args.batch}",
        f"schedule.epochs={epochs}", "schedule.warmup_epochs=0", f"log.every={args.every}",
        f"log.recon_every={args.recon_every}", f"run.checkpoint_every={args.steps}", *extra,
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), MLFLOW_ALLOW_FILE_STORE="true")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0 or "training goes on without" in done.stderr:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return steps_per_second(run_dir, args.batch)


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.work_dir or Path(scratch)
        shards = root / "train"
        if not (shards / "_info.json").is_file():
            write_shards(fashion_mnist(args.data, "train"), shards, name="train", shard_size=5000)
        speeds: dict[str, list[float]] = {name: [] for name in variants(root)}
        for round_ in range(args.rounds):
            for name, extra in variants(root).items():
                speeds[name].append(
                    run(args, shards, root / f"run-{round_}-{len(speeds[name])}-{hash(name)}", extra)
                )
                print(f"round {round_ + 1}/{args.rounds}  {name}: {speeds[name][-1]:.2f} steps/s", flush=True)
    base = statistics.median(speeds["TensorBoard only"])
    print(f"\nmae_vit_demo_patch4, batch {args.batch}, {args.steps} steps, log.every={args.every}, "
          f"log.recon_every={args.recon_every}; medians of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| logging | steps/s | against TensorBoard only |\n|---|---|---|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
