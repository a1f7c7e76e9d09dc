"""What `mim linprobe` and `mim finetune` share: the backbone builder, the loader, the loop and
the evaluation. They differ only in what is frozen, which head is used and the param groups."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mim.config import SCHEMAS, ClassifyConfig, load_config
from mim.data.streams import ViewSpec
from mim.engine.classifier import CachedFeatureProbe, ClassifierTrainer
from mim.engine.optim import param_groups
from mim.models.checkpointing import checkpoint_blocks
from mim.models.classifier import build_finetune_vit, build_linear_probe
from mim.recipe import ClassifyInputs, check_classify
from pipelines.common import config_parser, started_run
from pipelines.requeue import requeue_if_stopped


def linprobe_model(config: ClassifyConfig, inputs: ClassifyInputs):
    model, report = build_linear_probe(
        inputs.arch,
        inputs.weights,
        inputs.num_classes,
        len(config.probe.blrs),
        config.model.global_pool,
        config.probe.blocks,
    )
    top = max(config.probe.blrs)
    config.optim.blr = top  # the heads' lrs are probe.blrs; the schedule runs at the largest
    groups = []
    for blr, head in zip(config.probe.blrs, model.heads, strict=True):
        for group in param_groups(head, weight_decay=config.optim.weight_decay):
            # LARS adapts weights only (MAE's protocol): biases keep their plain lr.
            groups.append(
                dict(
                    group,
                    lr_scale=blr / top,
                    always_adapt=group["weight_decay"] > 0 or all(p.ndim > 1 for p in group["params"]),
                )
            )
    return model, groups, report


def finetune_model(config: ClassifyConfig, inputs: ClassifyInputs):
    model, report = build_finetune_vit(
        inputs.arch, inputs.weights, inputs.num_classes, config.model.global_pool, config.model.drop_path
    )
    checkpoint_blocks(model.blocks, config.model.grad_checkpointing)
    groups = param_groups(model, config.optim.weight_decay, config.optim.layer_decay, inputs.arch["depth"])
    return model, groups, report


def run(stage: str, argv: list[str] | None, description: str) -> int:
    log = logging.getLogger(f"mim.{stage}")
    args = config_parser(f"mim {stage}", description, stage).parse_args(argv)
    config = load_config(SCHEMAS[stage], args.config, args.overrides)
    inputs = check_classify(config)  # everything is checked, and the weights read, before any work
    build = linprobe_model if stage == "linprobe" else finetune_model
    torch.manual_seed(config.run.seed)  # the same heads (and random encoder) for the same seed
    model, groups, report = build(config, inputs)
    mode = "L" if inputs.arch["in_chans"] == 1 else "RGB"
    view = ViewSpec(
        inputs.arch["img_size"],
        mode,
        tuple(config.data.crop_scale),
        config.data.hflip,
        needs_label=True,
        randaug=config.augment.randaug if stage == "finetune" else "",
        reduced_decode=config.data.reduced_decode,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
    )
    description = {
        "backbone": inputs.weights.source if inputs.weights else "random init (init.from=none)",
        "source": config.init.from_,
        "arch": inputs.arch,
        "num_classes": inputs.num_classes,
        "global_pool": config.model.global_pool,
        "load_report": report,
        "head_blrs": config.probe.blrs if stage == "linprobe" else None,
        "probe_blocks": config.probe.blocks if stage == "linprobe" else None,
    }
    with started_run(Path(config.run.dir), config) as (env, device, stop):
        log.info(
            "%s of %s: keys the stage adds %s, drops %s",
            stage,
            description["backbone"],
            report["missing"],
            report["unexpected"],
        )
        cached = stage == "linprobe" and config.probe.cache_features
        trainer_class = CachedFeatureProbe if cached else ClassifierTrainer
        trainer = trainer_class(
            stage,
            config,
            model,
            groups,
            inputs.shards,
            inputs.splits,
            view,
            env,
            device,
            description,
            stop,
        )
        outcome = trainer.run()
        test = trainer.metrics.get("test")
        log.info(
            "%s stopped at step %d of %d (%s)%s",
            stage,
            outcome.step,
            outcome.total_steps,
            outcome.reason,
            f"; data.val top-1 {test['top1']:.2f} (head {test['head']} at epoch {test['epoch']:g}, "
            f"chosen on {test['chosen_on']})"
            if test
            else "",
        )
    return requeue_if_stopped(outcome.reason, env)
