"""`mim plan --config RECIPE [key=value ...] [--processes N] [--device-memory 80GB]`: what one
process of a pretraining or fine-tuning run holds (parameters, gradients, optimizer state,
activations, DeepSpeed's buffers) at the config's micro-batch, ZeRO stage, precision, activation
checkpointing and (fine-tuning) finetune.method, and the largest micro-batch that fits the
device. Nothing is allocated: the model runs on the meta device. Exits 1 when the config does not
fit, naming setups that do. A fine-tuning recipe (finetune/...) or --stage finetune plans
fine-tuning; its backbone's shape comes from model.name (the pretraining variant)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from mim.config import FinetuneConfig, PretrainConfig, load_config
from mim.engine.deepspeed_engine import choose_zero_stage
from mim.errors import UserInputError
from mim.models.finetuning import method_of
from mim.models.target_kinds import TARGETS
from mim.plan import USABLE_SHARE, Setup, alternatives, gib, largest_micro_batch, parse_bytes, plan
from mim.recipe import check_model
from pipelines.common import add_help_config, reports_user_errors


def _processes(given: int | None) -> int:
    if given is not None:
        return given
    return int(os.environ.get("SLURM_NTASKS") or os.environ.get("WORLD_SIZE") or 8)


def _describe(setup: Setup, batch: int | None = None) -> str:
    every = setup.grad_checkpointing
    return (
        f"deepspeed.zero_stage={setup.zero_stage} model.grad_checkpointing={every} "
        f"data.batch_size={batch if batch is not None else setup.micro_batch}"
    )


@reports_user_errors("mim plan")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mim plan", description=__doc__)
    parser.add_argument(
        "--config", help="a pretraining or fine-tuning YAML file or recipe name (mim configs)"
    )
    parser.add_argument(
        "--stage",
        choices=["pretrain", "finetune"],
        help="what the config is for; default: finetune for a finetune/... recipe, else pretrain",
    )
    add_help_config(parser, "pretrain")
    parser.add_argument(
        "--processes", type=int, help="processes (GPUs) of the run; default $SLURM_NTASKS or 8"
    )
    parser.add_argument(
        "--device-memory", default="80GB", help="memory of one device, e.g. 80GB, 141GB, 24GiB"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        memory = parse_bytes(args.device_memory)
    except ValueError as error:
        raise UserInputError(f"--device-memory: {error}") from None
    processes = _processes(args.processes)
    if processes < 1:
        raise UserInputError(f"--processes must be at least 1, got {processes}")
    stage = args.stage or ("finetune" if str(args.config or "").startswith("finetune") else "pretrain")
    config = load_config(
        FinetuneConfig if stage == "finetune" else PretrainConfig, args.config, args.overrides
    )
    if stage == "finetune" and not config.model.name:
        raise UserInputError(
            "mim plan of a fine-tune: set model.name to the backbone's registered variant "
            "(e.g. model.name=mae_vit_7b_patch14; mim configs lists the recipes that name them)"
        )
    arch = check_model(config.model)
    precision = "bf16" if config.deepspeed.precision == "auto" else config.deepspeed.precision
    if precision == "fp16":
        raise UserInputError(
            "mim plan plans fp32 and bf16 runs (deepspeed.precision fp16 keeps half weights)"
        )
    setup = Setup(
        arch,
        config.data.batch_size,
        processes,
        0,
        precision,
        config.model.grad_checkpointing,
        getattr(config.model, "mask_ratio", 0.0),
    )
    if stage == "finetune":
        method = method_of(config.finetune)
        method.check(arch)
        options = tuple((key, getattr(config.finetune, key)) for key in ("method", *method.options))
        options = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in options)
        setup = replace(setup, task="finetune", method=options, num_classes=config.model.num_classes or 1000)
    zero = config.deepspeed.zero_stage
    if zero == "auto":
        zero = choose_zero_stage(plan(setup).num_params, processes, int(memory))
    setup = replace(setup, zero_stage=int(zero))
    result = plan(setup)
    trained = (
        f", finetune.method={config.finetune.method} ({result.trained / 1e6:.2f}M trained)"
        if stage == "finetune"
        else ""
    )
    print(
        f"mim plan: {stage} {config.model.name} ({result.num_params / 1e9:.2f}B parameters{trained}), {processes} process(es), "
        f"ZeRO {setup.zero_stage}{' (auto)' if config.deepspeed.zero_stage == 'auto' else ''}, {precision}, "
        f"micro-batch {setup.micro_batch}, activation checkpointing "
        + (f"every {setup.grad_checkpointing} block(s)" if setup.grad_checkpointing else "off")
    )
    if stage == "pretrain" and not TARGETS.get(config.target.kind).predicts_pixels:
        print(f"  (target.kind={config.target.kind}: its teacher and head are not counted)")
    print("per process:")
    for name, value in result.rows():
        print(f"  {name:<18} {gib(value):>12}")
    usable = USABLE_SHARE * memory
    largest = largest_micro_batch(setup, memory)
    if result.fits(memory):
        print(
            f"fits in {args.device_memory} ({gib(usable)} usable); the largest micro-batch that fits: {largest}"
        )
        return 0
    print(f"does not fit in {args.device_memory}: {gib(result.total)} needed, {gib(usable)} usable")
    if 0 < largest < setup.micro_batch:
        print(
            f"  fits with a smaller micro-batch: {_describe(setup, largest)} (raise optim.accum_steps to keep the batch)"
        )
    options = alternatives(setup, memory)
    for candidate, batch in options:
        print(f"  fits: {_describe(candidate, min(batch, setup.micro_batch))} (micro-batch up to {batch})")
    if not options and largest == 0:
        print("  nothing fits on this many processes: more processes, or a smaller model")
    return 1
