"""The segmentation probe on the Fashion-MNIST scenes: what the demo's MAE encoder's patch tokens
hold against a random encoder of the same shape and against raw pixels, and what the stage costs.

quality: on a `mim demo` run dir (its pretraining run and its scene shards), `mim segprobe` with
the demo's recipe (configs/demo/segprobe.yaml) for three feature sources: the MAE encoder, a
random encoder of the same shape, and the pixels of each 7x7 patch as its token (the floor: what a
head of the same kind gets from no encoder at all; `PixelSegprobe` below, run through `mim train
--task`), each at three resolutions: the scenes brought to 28 pixels (the pretraining size, one
window); at their own 56 pixels in sliding 28-pixel windows; and at 56 pixels in one window, the
position embeddings resampled to twice the grid. mIoU and pixel accuracy on the validation
scenes, chosen on the held-out 5 % of the training scenes. A finished run is read, not rerun.

    python benchmarks/dense_probe.py quality --demo runs/demo --out runs/dense-bench

cost: seconds per epoch of the probe streaming augmented images and with cached window features
(seg.cache_features), and the process's resident peak, as the training split grows (1,000, 2,000,
4,000 scenes, one epoch each): streaming holds no whole-split tensor, so its peak stays flat; the
cache grows with the split.

    python benchmarks/dense_probe.py cost --demo runs/demo --out runs/dense-cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from mim.models.segmentation import SegmentationProbe
from mim.tasks.segment import Segprobe

RESOLUTIONS = {  # name: overrides
    "28 (pretraining size)": ["model.img_size=28", "seg.eval_size=28"],
    "56, 28-px windows": ["model.img_size=28", "seg.eval_size=56"],
    "56, one window (positions resampled)": ["model.img_size=56", "seg.eval_size=56"],
}
ENCODERS = {  # name: (overrides, task)
    "MAE encoder": (["init.from={demo}/pretrain"], "segprobe"),
    "random encoder": (["init.from=none", "model.name=mae_vit_demo_patch7"], "segprobe"),
    "raw pixel patches": (["init.from=none", "model.name=mae_vit_demo_patch7"], "dense_probe:PixelSegprobe"),
}


class PixelPatches(nn.Module):
    """Stands in for the encoder: each patch's pixels are its token, (N, C * p * p, H / p, W / p)."""

    def __init__(self, patch_size: int, in_chans: int) -> None:
        super().__init__()
        self.patch_size, self.num_features = patch_size, in_chans * patch_size**2
        self.blocks = [None]  # one level

    def forward_intermediates(self, images, **_):
        return [F.pixel_unshuffle(images, self.patch_size)]


class PixelSegprobe(Segprobe):
    """The segmentation probe on raw pixel patches instead of an encoder's tokens."""

    def build_model(self):
        config, inputs = self.config, self.inputs
        model = SegmentationProbe(
            PixelPatches(inputs.arch["patch_size"], inputs.arch["in_chans"]),
            inputs.num_classes,
            1,
            config.seg.head,
            config.seg.hidden,
        )
        self.report = {"missing": [], "unexpected": []}
        groups = [{"params": list(model.head.parameters()), "weight_decay": config.optim.weight_decay}]
        return model, groups


def _run(task: str, run_dir: Path, args: list[str]) -> float:
    """Runs the stage unless run_dir already finished; returns its wall seconds (0 if read)."""
    if (run_dir / "metrics.json").is_file() and "test" in json.loads((run_dir / "metrics.json").read_text()):
        final = json.loads((run_dir / "metrics.json").read_text())
        if final.get("evaluations") and final["evaluations"][-1]["epoch"] >= _epochs(args):
            return 0.0
    command = [sys.executable, "-m", "mim", "train", "--task", task, *args, f"run.dir={run_dir}"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    )
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def _epochs(args: list[str]) -> float:
    given = [a.split("=", 1)[1] for a in args if a.startswith("schedule.epochs=")]
    return float(given[-1]) if given else 0.0


def quality(demo: Path, out: Path) -> None:
    scenes = demo / "scenes"
    common = [
        "--config",
        "demo/segprobe.yaml",
        f"data.train={scenes / 'train'}",
        f"data.val={scenes / 'val'}",
    ]
    print("| features | resolution | mIoU | pixel accuracy | chosen on (held-out mIoU) |")
    print("|---|---|---|---|---|")
    for encoder, (overrides, task) in ENCODERS.items():
        for number, (resolution, sizes) in enumerate(RESOLUTIONS.items()):
            run_dir = out / f"{encoder.split()[0].lower()}-{number}"
            _run(task, run_dir, common + [o.format(demo=demo) for o in overrides] + sizes)
            test = json.loads((run_dir / "metrics.json").read_text())["test"]
            print(
                f"| {encoder} | {resolution} | {test['miou']:.2f} | {test['pixel_accuracy']:.2f} | "
                f"{test['selection_miou']:.2f} |",
                flush=True,
            )


def cost(demo: Path, out: Path, data: Path) -> None:
    source = f"fashion-mnist-scenes:{data}:train"
    print(
        "| training scenes | features | caching (s) | training (s / epoch) | run (s) | resident peak (GiB) |"
    )
    print("|---|---|---|---|---|---|")
    for count in (1000, 2000, 4000):
        shards = out / f"scenes-{count}"
        if not (shards / "_info.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "mim", "shards", "--source", source, "--out", str(shards), "--limit", str(count), "--shard-size", "500"],
                check=True,
                capture_output=True,
            )  # fmt: skip
        for cached in (False, True):
            run_dir = out / f"run-{count}-{'cached' if cached else 'streamed'}"
            args = [
                "--config", "demo/segprobe.yaml", f"data.train={shards}", f"data.val={demo / 'scenes' / 'val'}",
                f"init.from={demo / 'pretrain'}", "schedule.epochs=1", "eval.every_epochs=100", "eval.holdout=0.05",
                f"seg.cache_features={str(cached).lower()}",
            ]  # fmt: skip
            seconds = _run("segprobe", run_dir, args)
            report = json.loads((run_dir / "metrics.json").read_text())
            log = (run_dir / "log.txt").read_text()
            steps = int(log.split("segprobe: ", 1)[1].split(" steps", 1)[0])
            epoch = report["cost"]["step_seconds"] * steps
            caching = log.split("cached features in ", 1)[1].split(" s", 1)[0] if cached else "-"
            print(
                f"| {count} | {'cached windows' if cached else 'streamed, augmented'} | {caching} | "
                f"{epoch:.1f} | {seconds:.0f} | {report['cost']['peak_memory_gib']:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("quality", "cost"))
    parser.add_argument("--demo", type=Path, required=True, help="a mim demo run dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    if args.what == "quality":
        quality(args.demo.resolve(), args.out.resolve())
    else:
        cost(args.demo.resolve(), args.out.resolve(), args.data)


if __name__ == "__main__":
    main()
