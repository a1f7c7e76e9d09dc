"""`mim demo [--out runs/demo]`: the whole product on CPU on real images (Fashion-MNIST from
Debian's dataset-fashion-mnist): shards -> MAE pretraining -> linear probe (MAE and a random
encoder of the same shape) -> fine-tuning -> segmentation probe on Fashion-MNIST scenes (MAE and
random) -> export -> knn.png (the online kNN monitor's curve), reconstructions.png,
attention.png, segmentation.png, results.md/.json; then whether README.md's table says what this
run measured. Every stage runs through the same CLI and code paths as production; rerunning resumes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
SCENES = {"train": 10000, "val": 2000}  # Fashion-MNIST scenes for the segmentation probe
QUICK_SCENES = {"train": 2000, "val": 500}
README = Path(__file__).resolve().parents[1] / "README.md"  # in a checkout; absent in a wheel
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
    "segprobe": ["schedule.epochs=1"],
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


RANDOM_ENCODER = ("init.from=none", "model.name=mae_vit_demo_patch7")


def test_miou(run_dir: Path) -> float:
    """The segmentation probe's reported mIoU: the epoch chosen on held-out training scenes,
    evaluated on the validation scenes."""
    return json.loads((run_dir / "metrics.json").read_text())["test"]["miou"]


def test_top1(run_dir: Path) -> float:
    """The stage's reported figure: the head and epoch chosen on its held-out training images,
    evaluated on the test split."""
    return json.loads((run_dir / "metrics.json").read_text())["test"]["top1"]


def result_rows(accuracy: dict[str, float], curve: list[dict]) -> list[tuple[str, str]]:
    """The demo's figures as (what, value) rows: results.md's table and README.md's."""
    return [
        ("Linear probe top-1, MAE encoder", f"{accuracy['linprobe_mae']:.2f} %"),
        ("Linear probe top-1, random encoder (same shape)", f"{accuracy['linprobe_random']:.2f} %"),
        ("Fine-tune top-1, from MAE", f"{accuracy['finetune_mae']:.2f} %"),
        (
            "kNN top-1 during pretraining (monitor)",
            f"{curve[0]['top1']:.2f} % at step 0 -> {curve[-1]['top1']:.2f} % at step {curve[-1]['step']}",
        ),
        ("Segmentation probe mIoU on the scenes, MAE encoder", f"{accuracy['segprobe_mae']:.2f}"),
        ("Segmentation probe mIoU on the scenes, random encoder", f"{accuracy['segprobe_random']:.2f}"),
    ]


def write_results(
    out: Path, accuracy: dict[str, float], seconds: dict[str, float], curve: list[dict], quick: bool
) -> tuple[str, list[tuple[str, str]]]:
    test_set = f"{QUICK_SAMPLES['test'] // 1000}k" if quick else "10k"
    scenes = (QUICK_SCENES if quick else SCENES)["val"]
    figures = result_rows(accuracy, curve)
    rows = figures + [(f"Time: {name}", format_duration(value)) for name, value in seconds.items()]
    table = "\n".join(
        [
            f"| Fashion-MNIST test set ({test_set}); scenes: {scenes:,} validation scenes | |",
            "|---|---|",
            *[f"| {a} | {b} |" for a, b in rows],
        ]
    )
    chosen = (
        "The probes' head and epoch, and the fine-tune's epoch, are chosen on 10 % of the training "
        "images held out (eval.holdout); the test split is evaluated for the choice only."
    )
    note = " (--quick: a first look, not the figures of the full demo)" if quick else ""
    pictures = "\n\n".join(f"![{name}]({name}.png)" for name in PICTURES)
    (out / "results.md").write_text(f"# mim demo results{note}\n\n{table}\n\n{chosen}\n\n{pictures}\n")
    (out / "results.json").write_text(
        json.dumps({"accuracy": accuracy, "seconds": seconds, "knn_curve": curve, "quick": quick}, indent=1)
    )
    return table, figures


PICTURES = ("knn", "reconstructions", "attention", "segmentation")


def readme_differences(figures: list[tuple[str, str]], readme: str) -> list[str]:
    """Rows of the demo's table whose figure README.md does not show as this run measured it
    (README's table has a row `| <what> | <value> |` for each)."""
    differences = []
    for what, value in figures:
        row = next((line for line in readme.splitlines() if line.startswith(f"| {what} |")), None)
        if row is None:
            differences.append(f"{what}: not in README.md, this run {value}")
        elif row != f"| {what} | {value} |":
            differences.append(f"{what}: README.md {row.split('|')[2].strip()}, this run {value}")
    return differences


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
    scene_counts = QUICK_SCENES if args.quick else SCENES
    scenes = {split: out / "scenes" / split for split in scene_counts}
    seconds["shards"] += sum(
        stage(
            "shards",
            "--source",
            f"fashion-mnist-scenes:{data}:{split}",
            "--out",
            str(path),
            "--shard-size",
            "2000",
            "--limit",
            str(scene_counts[split]),
        )
        for split, path in scenes.items()
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
        *RANDOM_ENCODER,
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
    for name, encoder in (("MAE", [f"init.from={out / 'pretrain'}"]), ("random", RANDOM_ENCODER)):
        seconds[f"segprobe ({name})"] = stage(
            "segprobe",
            "--config",
            "demo/segprobe.yaml",
            f"data.train={scenes['train']}",
            f"data.val={scenes['val']}",
            *encoder,
            f"run.dir={out / f'segprobe-{name.lower()}'}",
            *quick["segprobe"],
        )
    shutil.copyfile(out / "segprobe-mae" / "segmentation.png", out / "segmentation.png")
    evaluations = [str(out / run) for run in ("linprobe-mae", "finetune-mae", "segprobe-mae")]
    seconds["export"] = stage(
        "export",
        str(out / "pretrain"),
        "--out",
        str(out / "export"),
        "--with-decoder",
        "--dataset",
        "fashion-mnist",
        "--results",
        *evaluations,
    )
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
        "segprobe_mae": test_miou(out / "segprobe-mae"),
        "segprobe_random": test_miou(out / "segprobe-random"),
    }
    table, figures = write_results(out, accuracy, seconds, curve, args.quick)
    print(
        f"\n{table}\n\n[demo] results: {out / 'results.md'}; pictures: "
        + ", ".join(str(out / f"{name}.png") for name in PICTURES)
        + f"; TensorBoard: tensorboard --logdir {out}"
    )
    if README.is_file() and not args.quick:
        differences = readme_differences(figures, README.read_text())
        print(
            "[demo] README.md's table shows what this run measured"
            if not differences
            else "[demo] README.md's table differs from this run (update it from results.md):\n  "
            + "\n  ".join(differences)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
