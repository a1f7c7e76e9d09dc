"""Representation quality on Fashion-MNIST: the demo's model and recipes on a longer budget
(about 50 minutes on 2 CPU cores), every stage through the `mim` CLI as a user runs it.

    python benchmarks/quality_fashion_mnist.py --out runs/quality          # the full table
    python benchmarks/quality_fashion_mnist.py --out runs/quality-smoke --pretrain-epochs 0.2 \\
        --finetune-epochs 0.1 --fewshot-epochs 0.5 --probe-epochs 2        # a smoke run

`--target SPEC ...` runs instead one row per pretraining target (target.kind), each with the same
model, pretraining budget (`--target-epochs`, by default the demo's 5) and evaluation protocol:
linear probe (last 4 blocks), kNN, fine-tuning with 100 % and 10 % of the labels, and the
pretraining's wall time. SPEC is pixels, hog, ema, teacher-mae (the teacher: a pixel MAE
pretrained for `--teacher-epochs`) or teacher-supervised (that MAE fine-tuned on all the labels:
a teacher that saw the labels, so its row is not self-supervised), each optionally +global (the
cls-token objective, target.global_weight=1) and @EPOCHS (another pretraining budget for that row,
e.g. pixels@3.6 to give pixel MAE the wall time another target took):

    python benchmarks/quality_fashion_mnist.py --out runs/targets --target pixels hog ema \
        teacher-mae teacher-supervised pixels+global ema+global

Rows: linear probe on MAE features vs on a random encoder of the same shape; fine-tuning from MAE
vs the same ViT from scratch with the same budget, with 100 % and with 10 % of the labels
(class-balanced, seeded); multinomial logistic regression on raw pixels. Fixed seed: the same
machine gives the same table. Finished stages are kept in OUT/results.json and skipped when the
script is run again, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.data.shards import write_shards  # noqa: E402
from mim.data.sources import Source, fashion_mnist, fashion_mnist_arrays  # noqa: E402
from mim.runtime import format_duration  # noqa: E402
from pipelines.demo import find_data, stage, test_top1  # noqa: E402

TARGETS = {  # the quality goals set for the demo's model (benchmarks/README.md)
    "linprobe_mae": 87.0,
    "finetune_mae": 93.0,
}
DEMO_MODEL = "mae_vit_demo_patch7"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="the four Fashion-MNIST idx files (default: Debian's)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=float, default=20)
    parser.add_argument("--probe-epochs", type=float, default=100)
    parser.add_argument("--finetune-epochs", type=float, default=3, help="with all labels")
    parser.add_argument("--fewshot-fraction", type=float, default=0.1)
    parser.add_argument("--fewshot-epochs", type=float, default=15, help="epochs over the labelled fraction")
    parser.add_argument(
        "--target", nargs="+", help="one row per target instead of the table above (see the top)"
    )
    parser.add_argument("--target-epochs", type=float, default=5, help="--target: pretraining epochs of each")
    parser.add_argument("--teacher-epochs", type=float, default=20, help="--target: the teacher MAE's epochs")
    parser.add_argument("--knn-bank", type=int, default=10000, help="--target: kNN bank samples (of train)")
    return parser.parse_args(argv)


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> list[int]:
    """The same fraction of every class, drawn with a fixed seed; sorted indices."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.extend(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return sorted(int(i) for i in chosen)


def pixel_logistic_regression(data: Path, seed: int) -> float:
    """Multinomial logistic regression on standardised raw pixels (full-batch L-BFGS, small L2):
    the classic Fashion-MNIST baseline (84.2 % in the dataset's benchmark)."""
    torch.manual_seed(seed)
    train_x, train_y = fashion_mnist_arrays(data, "train")
    test_x, test_y = fashion_mnist_arrays(data, "test")
    to_float = lambda x: torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)  # noqa: E731
    train, test = to_float(train_x), to_float(test_x)
    mean, std = train.mean(0), train.std(0) + 1e-3
    train, test = (train - mean) / std, (test - mean) / std
    targets = torch.from_numpy(train_y.astype(np.int64))
    model = torch.nn.Linear(train.shape[1], 10)
    optimizer = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(train), targets)
        loss = loss + 1e-4 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = model(test).argmax(1).numpy()
    return float((predicted == test_y).mean() * 100)


class Results:
    """OUT/results.json: accuracy and seconds per finished stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"accuracy": {}, "seconds": {}}

    def done(self, key: str) -> bool:
        return key in self.data["accuracy"] or key in self.data["seconds"]

    def record(self, key: str, seconds: float, accuracy: float | None = None) -> None:
        self.data["seconds"][key] = seconds
        if accuracy is not None:
            self.data["accuracy"][key] = accuracy
        self.path.write_text(json.dumps(self.data, indent=1))


class Bench:
    """The benchmark's shards, results file and stage runner, shared by both tables."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.data, self.out = args, find_data(args.data), args.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = Results(self.out / "results.json")
        self.shards = {name: self.out / "shards" / name for name in ("train", "test", "fewshot")}
        if not self.results.done("shards"):
            started = time.monotonic()
            for split in ("train", "test"):
                write_shards(fashion_mnist(self.data, split), self.shards[split], name=split, shard_size=2000)
            full = fashion_mnist(self.data, "train")
            _, labels = fashion_mnist_arrays(self.data, "train")
            subset = [full.records[i] for i in balanced_subset(labels, args.fewshot_fraction, args.seed)]
            write_shards(Source(subset, full.classes), self.shards["fewshot"], name="train", shard_size=2000)
            self.results.record("shards", time.monotonic() - started)
        self.fewshot_size = json.loads((self.shards["fewshot"] / "_info.json").read_text())["num_samples"]
        self.val = f"data.val={self.shards['test']}"

    def staged(self, key: str, name: str, *arguments: str) -> None:
        if self.results.done(key):
            return
        run_dir = self.out / key
        seconds = stage(name, *arguments, f"run.seed={self.args.seed}", f"run.dir={run_dir}")
        self.results.record(key, seconds, None if name == "pretrain" else test_top1(run_dir))

    def pretraining(self, epochs: float, *extra: str) -> tuple[str, ...]:
        return (
            "--config",
            "configs/demo/pretrain.yaml",
            f"data.train={self.shards['train']}",
            f"schedule.epochs={epochs}",
            f"schedule.warmup_epochs={min(1.0, epochs / 10)}",
            *extra,
        )

    def probe(self, *extra: str) -> tuple[str, ...]:
        epochs = self.args.probe_epochs
        return (
            "--config",
            "configs/demo/linprobe.yaml",
            f"data.train={self.shards['train']}",
            self.val,
            f"schedule.epochs={epochs}",
            f"schedule.warmup_epochs={epochs / 12}",
            f"eval.every_epochs={epochs / 6}",
            *extra,
        )

    def finetune(self, fewshot: bool, *extra: str) -> tuple[str, ...]:
        epochs = self.args.fewshot_epochs if fewshot else self.args.finetune_epochs
        train = self.shards["fewshot" if fewshot else "train"]
        return (
            "--config",
            "configs/demo/finetune.yaml",
            f"data.train={train}",
            self.val,
            *extra,
            *([f"data.samples_per_epoch={self.fewshot_size}"] if fewshot else []),
            f"schedule.epochs={epochs}",
            f"schedule.warmup_epochs={epochs / 10}",
            f"eval.every_epochs={epochs / 3}",
        )

    def knn(self, key: str, run_dir: Path) -> None:
        if self.results.done(key):
            return
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "knn",
                "--config",
                "configs/demo/linprobe.yaml",
                "--bank-samples",
                str(self.args.knn_bank),
                "--out",
                str(self.out / f"{key}.json"),
                f"init.from={run_dir}",
                f"data.train={self.shards['train']}",
                self.val,
            ],
            check=True,
        )
        top1 = json.loads((self.out / f"{key}.json").read_text())["top1"]
        self.results.record(key, time.monotonic() - started, top1)


def run(args: argparse.Namespace) -> Results:
    bench = Bench(args)
    scratch = ("init.from=none", f"model.name={DEMO_MODEL}")
    mae = (f"init.from={bench.out / 'pretrain'}",)
    bench.staged("pretrain", "pretrain", *bench.pretraining(args.pretrain_epochs))
    bench.staged("linprobe_mae", "linprobe", *bench.probe(*mae))
    bench.staged("linprobe_random", "linprobe", *bench.probe(*scratch))
    bench.staged("finetune_mae", "finetune", *bench.finetune(False, *mae))
    bench.staged("finetune_scratch", "finetune", *bench.finetune(False, *scratch))
    bench.staged("fewshot_mae", "finetune", *bench.finetune(True, *mae))
    bench.staged("fewshot_scratch", "finetune", *bench.finetune(True, *scratch))
    if not bench.results.done("pixels_logistic"):
        started = time.monotonic()
        accuracy = pixel_logistic_regression(bench.data, args.seed)
        bench.results.record("pixels_logistic", time.monotonic() - started, accuracy)
    return bench.results


TEACHERS = {
    "teacher-mae": "a pixel MAE of the same shape pretrained for --teacher-epochs",
    "teacher-supervised": "that MAE fine-tuned on all the labels (the teacher saw the labels)",
}


def parse_spec(spec: str, default_epochs: float) -> tuple[str, str, float, str]:
    """`KIND[+global][@EPOCHS]` -> (kind, suffix, epochs, the results' key)."""
    head, _, epochs = spec.partition("@")
    kind, _, extra = head.partition("+")
    return kind, extra, float(epochs or default_epochs), spec.replace("+", "_").replace("@", "_at_")


def target_overrides(bench: Bench, spec: str) -> tuple[str, ...]:
    kind, extra, _, _ = parse_spec(spec, 0)
    overrides = ["monitor.bank=", "monitor.val="]
    if kind in TEACHERS:
        teachers = {"teacher-mae": "teacher_mae", "teacher-supervised": "teacher_supervised"}
        overrides += ["target.kind=teacher", f"target.teacher={bench.out / teachers[kind]}"]
    else:
        overrides.append(f"target.kind={kind}")
    if extra == "global":
        overrides.append("target.global_weight=1.0")
    elif extra:
        raise SystemExit(f"--target {spec}: the only suffix is +global")
    return tuple(overrides)


def run_targets(args: argparse.Namespace) -> Results:
    """One row per target: pretraining at --target-epochs, then the same evaluations."""
    bench = Bench(args)
    kinds = {parse_spec(spec, 0)[0] for spec in args.target}
    if kinds & set(TEACHERS):
        bench.staged("teacher_mae", "pretrain", *bench.pretraining(args.teacher_epochs))
    if "teacher-supervised" in kinds:
        bench.staged(
            "teacher_supervised", "finetune", *bench.finetune(False, f"init.from={bench.out / 'teacher_mae'}")
        )
    for spec in args.target:
        _, _, epochs, key = parse_spec(spec, args.target_epochs)
        run_dir = bench.out / f"pretrain_{key}"
        bench.staged(
            f"pretrain_{key}", "pretrain", *bench.pretraining(epochs, *target_overrides(bench, spec))
        )
        encoder = (f"init.from={run_dir}",)
        bench.staged(f"linprobe_{key}", "linprobe", *bench.probe(*encoder))
        bench.knn(f"knn_{key}", run_dir)
        bench.staged(f"finetune_{key}", "finetune", *bench.finetune(False, *encoder))
        bench.staged(f"fewshot_{key}", "finetune", *bench.finetune(True, *encoder))
    return bench.results


def target_table(results: Results, args: argparse.Namespace) -> str:
    accuracy, seconds = results.data["accuracy"], results.data["seconds"]
    percent = round(args.fewshot_fraction * 100)
    lines = [
        f"| target | pretraining epochs | linear probe | kNN | fine-tune 100 % | fine-tune {percent} % "
        "| pretraining time |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in args.target:
        _, _, epochs, key = parse_spec(spec, args.target_epochs)
        cells = [
            f"{accuracy[f'{stage}_{key}']:.2f} %" for stage in ("linprobe", "knn", "finetune", "fewshot")
        ]
        time_taken = format_duration(seconds[f"pretrain_{key}"])
        lines.append(f"| {spec.partition('@')[0]} | {epochs:g} | {' | '.join(cells)} | {time_taken} |")
    used = [name for name in TEACHERS if any(parse_spec(spec, 0)[0] == name for spec in args.target)]
    lines += [""] + [f"{name}: {TEACHERS[name]}." for name in used]
    lines.append(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}; command: {' '.join(sys.argv)}"
    )
    return "\n".join(lines)


def table(results: Results, args: argparse.Namespace) -> str:
    accuracy, seconds = results.data["accuracy"], results.data["seconds"]
    percent = round(args.fewshot_fraction * 100)
    gap = lambda a, b: accuracy[a] - accuracy[b]  # noqa: E731
    rows = [
        ("Linear probe, MAE encoder", f"{accuracy['linprobe_mae']:.2f} %", "≥ 87 %"),
        ("Linear probe, random encoder (same shape)", f"{accuracy['linprobe_random']:.2f} %", ""),
        ("Fine-tune from MAE, 100 % labels", f"{accuracy['finetune_mae']:.2f} %", "≥ 93 %"),
        ("Same ViT from scratch, same budget, 100 % labels", f"{accuracy['finetune_scratch']:.2f} %", ""),
        (
            f"Fine-tune from MAE, {percent} % labels",
            f"{accuracy['fewshot_mae']:.2f} %",
            f"≥ scratch + 2 ({gap('fewshot_mae', 'fewshot_scratch'):+.2f})",
        ),
        (f"Same ViT from scratch, {percent} % labels", f"{accuracy['fewshot_scratch']:.2f} %", ""),
        ("Logistic regression on raw pixels", f"{accuracy['pixels_logistic']:.2f} %", ""),
    ]
    met = {
        "linprobe_mae": accuracy["linprobe_mae"] >= TARGETS["linprobe_mae"],
        "finetune_mae": accuracy["finetune_mae"] >= TARGETS["finetune_mae"],
        "fewshot_gain": gap("fewshot_mae", "fewshot_scratch") >= 2.0,
    }
    lines = ["| Fashion-MNIST test set (10k), top-1 | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| stage | time |", "|---|---|"]
    lines += [f"| {key} | {format_duration(value)} |" for key, value in seconds.items()]
    lines += [f"| total | {format_duration(sum(seconds.values()))} |", ""]
    lines.append("targets met: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in met.items()))
    lines.append(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}; command: {' '.join(sys.argv)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.target:
        text = target_table(run_targets(args), args)
    else:
        text = table(run(args), args)
    (args.out / "results.md").write_text(f"# Fashion-MNIST quality benchmark\n\n{text}\n")
    print(f"\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
