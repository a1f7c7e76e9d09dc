"""`mim knn [--k 20 --temperature 0.07] init.from=RUN_OR_CHECKPOINT data.train=... data.val=...`:
a weighted kNN classifier on frozen features (cosine similarity): a fast check of any pretraining
checkpoint, during or after pretraining. Prints top-1/top-5 and writes them to --out (JSON)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from mim.config import LinprobeConfig, load_config
from mim.data.streams import ViewSpec, spread_subset
from mim.data.transforms import normalize_on_device
from mim.distributed import barrier, init_distributed, read_dist_env, shutdown
from mim.engine.evaluate import KnnSplits, knn_evaluate
from mim.errors import UserInputError
from mim.models.classifier import build_linear_probe
from mim.recipe import check_classify
from mim.runtime import setup_logging
from pipelines.common import add_help_config, reports_user_errors

log = logging.getLogger("mim.knn")


@reports_user_errors("mim knn")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim knn", description=__doc__)
    parser.add_argument("--config", help="a linprobe YAML file or recipe name (mim configs); default: none")
    add_help_config(parser, "knn")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument(
        "--bank-samples", type=int, help="a bank of this many samples of data.train, spread over its shards"
    )
    parser.add_argument(
        "--val-samples", type=int, help="this many samples of data.val, spread over its shards"
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.k < 1 or args.temperature <= 0:
        raise UserInputError(
            f"--k must be at least 1 and --temperature positive, got {args.k} and {args.temperature}"
        )
    if min(args.bank_samples or 1, args.val_samples or 1) < 1:
        raise UserInputError("--bank-samples and --val-samples must be at least 1")
    # kNN chooses nothing: the bank is all of data.train
    config = load_config(LinprobeConfig, args.config, ["run.dir=.", "eval.holdout=0", *args.overrides])
    inputs = check_classify(config)  # the same backbone loading and checks as the probe
    model, _ = build_linear_probe(
        inputs.arch, inputs.weights, inputs.num_classes, 1, config.model.global_pool
    )
    env = read_dist_env()
    setup_logging(env.rank)
    device = init_distributed(env)
    backbone = model.backbone.to(device).eval()
    spec = ViewSpec(
        inputs.arch["img_size"],
        "L" if inputs.arch["in_chans"] == 1 else "RGB",
        needs_label=True,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
    )

    def features_of(images: torch.Tensor) -> torch.Tensor:
        return backbone(normalize_on_device(images, config.data.mean, config.data.std))

    splits = KnnSplits(
        inputs.shards,
        inputs.splits.test,
        inputs.num_classes,
        spread_subset(inputs.shards.lengths, args.bank_samples),
        spread_subset(inputs.splits.test.lengths, args.val_samples),
    )
    loader = (config.data.batch_size, config.data.num_workers, config.eval.crop_fraction)
    result = knn_evaluate(features_of, splits, spec, env, device, loader, args.k, args.temperature)
    result.update(
        num_samples=result["num_val"],
        k=args.k,
        temperature=args.temperature,
        backbone=inputs.weights.source if inputs.weights else "random init",
    )
    if env.is_main:
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    barrier()  # every rank is alive: none closes its connections while another still receives
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
