"""`mim plan --config RECIPE [key=value ...] [--processes N] [--device-memory 80GB]`: what one
process of a pretraining run holds (parameters, gradients, optimizer state, activations,
DeepSpeed's buffers) at the config's micro-batch, ZeRO stage, precision and activation
checkpointing, and the largest micro-batch that fits the device. Nothing is allocated: the
model runs on the meta device. Exits 1 when the config does not fit, naming setups that do."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from mim.config import PretrainConfig, load_config
from mim.engine.deepspeed_engine import choose_zero_stage
from mim.errors import UserInputError
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
    parser.add_argument("--config", help="a pretraining YAML file or recipe name (mim configs)")
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
    config = load_config(PretrainConfig, args.config, args.overrides)
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
        config.model.mask_ratio,
    )
    zero = config.deepspeed.zero_stage
    if zero == "auto":
        zero = choose_zero_stage(plan(setup).num_params, processes, int(memory))
    setup = replace(setup, zero_stage=int(zero))
    result = plan(setup)
    print(
        f"mim plan: {config.model.name} ({result.num_params / 1e9:.2f}B parameters), {processes} process(es), "
        f"ZeRO {setup.zero_stage}{' (auto)' if config.deepspeed.zero_stage == 'auto' else ''}, {precision}, "
        f"micro-batch {setup.micro_batch}, activation checkpointing "
        + (f"every {setup.grad_checkpointing} block(s)" if setup.grad_checkpointing else "off")
    )
    if not TARGETS.get(config.target.kind).predicts_pixels:
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
