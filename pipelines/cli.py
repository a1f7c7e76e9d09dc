"""`mim <stage> ...`: one subcommand per stage; each stage is pipelines/<stage>.py:main(argv)."""

from __future__ import annotations

import importlib
import sys

from mim.runtime import hold_stop_signals

STAGES = {
    "shards": "turn an image folder, a CSV/TSV or Fashion-MNIST into WebDataset shards",
    "pretrain": "MAE pretraining under DeepSpeed (resumes automatically)",
    "train": "any task by name, your own as --task package.module:Class (docs/extending.md)",
    "linprobe": "linear probing of a backbone: frozen encoder, several heads, top-1/top-5",
    "finetune": "supervised fine-tuning of a backbone (or from scratch with init.from=none)",
    "segprobe": "segmentation probe of a frozen backbone: a head on its patch tokens, mIoU",
    "knn": "a kNN classifier on frozen features: a quick check of any checkpoint",
    "export": "a backbone for timm: model.safetensors + config.json + model card",
    "submit": "render slurm/mim.sbatch for a stage (or a chain of stages) and submit it",
    "visualize": "reconstruction pictures from a pretraining checkpoint",
    "demo": "the whole chain on CPU on Fashion-MNIST, with a results table and pictures",
    "configs": "list the recipe configs that --config takes by name",
    "plan": "the memory one process of a pretraining run holds, and the largest micro-batch that fits",
}
TRAINING = ("pretrain", "train", "linprobe", "finetune", "segprobe")  # they checkpoint and stop on a signal


def usage() -> str:
    lines = ["usage: mim <stage> [options]   (mim <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name:<10} {text}" for name, text in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"mim: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if stage in TRAINING:
        hold_stop_signals()  # before the imports, which take seconds
    module = importlib.import_module(f"pipelines.{stage}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
