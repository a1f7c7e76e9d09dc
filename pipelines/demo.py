"""`mim demo [--out runs/demo]`: the whole product on CPU on real images (Fashion-MNIST from
Debian's dataset-fashion-mnist): shards -> MAE pretraining -> linear probe (MAE and a random
encoder of the same shape) -> fine-tuning -> export -> knn.png (the online kNN monitor's curve),
reconstructions.png, attention.png, results.md/.json.
Every stage runs through the same CLI and code paths as production; rerunning resumes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mim.engine.monitor import knn_chart
from mim.errors import UserInputError
from mim.runtime import format_duration
from pipelines.common import reports_user_errors

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
QUICK_SAMPLES = {"train": 6000, "test": 1000}  # --quick: a seeded tenth of Fashion-MNIST
_EPOCH = f"data.samples_per_epoch={QUICK_SAMPLES['train']}"
# --quick: the same chain in about two and a half minutes. Pretraining gets most of the budget: an
# MAE needs a few hundred steps before its features beat a random encoder's (smaller batches
# give it more steps for the same images); the probes' heads train on cached features, so their
# 100 epochs cost seconds; fine-tuning is a short smoke run.
QUICK = {
    "pretrain": [
        _EPOCH,
        "data.batch_size=128",
        "optim.blr=1.5e-3",
        "schedule.epochs=8",
        "log.recon_every=92",
        "monitor.every=92",
        "monitor.bank_samples=1000",
        "monitor.val_samples=1000",
    ],
    "linprobe": [],
    "finetune": ["data.batch_size=128", "schedule.epochs=1", "eval.every_epochs=1", "log.every=10"],
}


def find_data(data: Path | None) -> Path:
    path = data or DEFAULT_DATA
    if (path / "train-images-idx3-ubyte.gz").is_file() or (path / "train-images-idx3-ubyte").is_file():
        return path
    if data is None and os.geteuid() == 0:
        print("[demo] installing Debian's dataset-fashion-mnist", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], env=env, check=False)
        if (path / "train-images-idx3-ubyte.gz").is_file():
            return path
    raise UserInputError(
        f"Fashion-MNIST idx files not found in {path}: apt-get install dataset-fashion-mnist, "
        "or pass --data DIR holding train-images-idx3-ubyte[.gz] and the three other idx files"
    )


def stage(name: str, *arguments: str) -> float:
    """Runs `mim NAME ARGUMENTS` as a user would, streaming its output; returns seconds taken."""
    print(f"\n[demo] mim {name} {' '.join(arguments)}", flush=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", name, *arguments])
    if result.returncode != 0:
        raise SystemExit(f"[demo] mim {name} failed with exit code {result.returncode}")
    return time.monotonic() - started


def test_top1(run_dir: Path) -> float:
    """The stage's reported figure: the head and epoch chosen on its held-out training images,
    evaluated on the test split."""
    return json.loads((run_dir / "metrics.json").read_text())["test"]["top1"]


def write_results(
    out: Path, accuracy: dict[str, float], seconds: dict[str, float], curve: list[dict], quick: bool
) -> str:
    test_set = f"{QUICK_SAMPLES['test'] // 1000}k" if quick else "10k"
    rows = [
        ("Linear probe top-1, MAE encoder", f"{accuracy['linprobe_mae']:.2f} %"),
        ("Linear probe top-1, random encoder (same shape)", f"{accuracy['linprobe_random']:.2f} %"),
        ("Fine-tune top-1, from MAE", f"{accuracy['finetune_mae']:.2f} %"),
        (
            "kNN top-1 during pretraining (monitor)",
            f"{curve[0]['top1']:.2f} % at step 0 -> {curve[-1]['top1']:.2f} % at step {curve[-1]['step']}",
        ),
    ] + [(f"Time: {name}", format_duration(value)) for name, value in seconds.items()]
    table = "\n".join(
        [f"| Fashion-MNIST test set ({test_set}) | |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]]
    )
    chosen = (
        "The probes' head and epoch, and the fine-tune's epoch, are chosen on 10 % of the training "
        "images held out (eval.holdout); the test split is evaluated for the choice only."
    )
    note = " (--quick: a first look, not the figures of the full demo)" if quick else ""
    pictures = "\n\n".join(f"![{name}]({name}.png)" for name in ("knn", "reconstructions", "attention"))
    (out / "results.md").write_text(f"# mim demo results{note}\n\n{table}\n\n{chosen}\n\n{pictures}\n")
    (out / "results.json").write_text(
        json.dumps({"accuracy": accuracy, "seconds": seconds, "knn_curve": curve, "quick": quick}, indent=1)
    )
    return table


def machine_overrides() -> list[str]:
    """The demo's configs are sized for 2 CPU cores (one data worker). On a GPU machine the data
    workers come from the cores this process may use; the engine is already the GPU's (bf16)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"data.num_workers={max(1, min(8, len(os.sched_getaffinity(0)) - 2))}"]


@reports_user_errors("mim demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim demo", description=__doc__)
    parser.add_argument("--out", type=Path, help="the run dir (default runs/demo, or runs/demo-quick)")
    parser.add_argument(
        "--data", type=Path, help=f"the four Fashion-MNIST idx files (default {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a first look: the same chain on a tenth of the data (about two and a half minutes)",
    )
    args = parser.parse_args(argv)
    # --quick gets its own default: a rerun resumes, and a quick run's shards and checkpoints
    # must not be taken up by the full demo
    out = (args.out or Path("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    data = find_data(args.data)
    machine = machine_overrides()
    quick = {
        name: machine + extra for name, extra in (QUICK if args.quick else dict.fromkeys(QUICK, [])).items()
    }
    started, seconds = time.monotonic(), {}
    shards = {split: out / "shards" / split for split in ("train", "test")}
    seconds["shards"] = sum(
        stage(
            "shards",
            "--source",
            f"fashion-mnist:{data}:{split}",
            "--out",
            str(path),
            "--shard-size",
            "2000",
            *(["--limit", str(QUICK_SAMPLES[split])] if args.quick else []),
        )
        for split, path in shards.items()
    )
    splits = (f"data.train={shards['train']}", f"data.val={shards['test']}")
    seconds["pretrain"] = stage(
        "pretrain",
        "--config",
        "demo/pretrain.yaml",
        f"data.train={shards['train']}",
        f"run.dir={out / 'pretrain'}",
        f"monitor.bank={shards['train']}",
        f"monitor.val={shards['test']}",
        *quick["pretrain"],
    )
    seconds["linprobe (MAE)"] = stage(
        "linprobe",
        "--config",
        "demo/linprobe.yaml",
        *splits,
        f"init.from={out / 'pretrain'}",
        f"run.dir={out / 'linprobe-mae'}",
        *quick["linprobe"],
    )
    seconds["linprobe (random)"] = stage(
        "linprobe",
        "--config",
        "demo/linprobe.yaml",
        *splits,
        "init.from=none",
        "model.name=mae_vit_demo_patch7",
        f"run.dir={out / 'linprobe-random'}",
        *quick["linprobe"],
    )
    seconds["finetune"] = stage(
        "finetune",
        "--config",
        "demo/finetune.yaml",
        *splits,
        f"init.from={out / 'pretrain'}",
        f"run.dir={out / 'finetune-mae'}",
        *quick["finetune"],
    )
    seconds["export"] = stage("export", str(out / "pretrain"), "--out", str(out / "export"), "--with-decoder")
    seconds["visualize"] = sum(
        stage(
            "visualize",
            str(out / "pretrain"),
            "--out",
            str(out / f"{name}.png"),
            "--data",
            str(shards["test"]),
            *extra,
        )
        for name, extra in (("reconstructions", []), ("attention", ["--attention"]))
    )
    seconds["total"] = time.monotonic() - started
    curve = knn_chart(out / "pretrain", out / "knn.png")
    accuracy = {
        "linprobe_mae": test_top1(out / "linprobe-mae"),
        "linprobe_random": test_top1(out / "linprobe-random"),
        "finetune_mae": test_top1(out / "finetune-mae"),
    }
    table = write_results(out, accuracy, seconds, curve, args.quick)
    print(
        f"\n{table}\n\n[demo] results: {out / 'results.md'}; pictures: "
        + ", ".join(str(out / f"{name}.png") for name in ("knn", "reconstructions", "attention"))
        + f"; TensorBoard: tensorboard --logdir {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
