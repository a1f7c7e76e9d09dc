"""Checks of a config that need more than types, and the values derived from it: computed once,
here, before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mim.config import ConfigError, DataConfig, OptimConfig, PretrainConfig, ScheduleConfig, require
from mim.data.shards import ShardSet, open_shards
from mim.models.registry import model_args


@dataclass(frozen=True)
class Plan:
    effective_batch: int  # samples per optimizer step, all ranks and micro-steps together
    lr: float
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(
    optim: OptimConfig, schedule: ScheduleConfig, batch_size: int, world_size: int, samples_per_epoch: int
) -> Plan:
    effective_batch = batch_size * optim.accum_steps * world_size
    steps_per_epoch = max(1, samples_per_epoch // effective_batch)
    return Plan(
        effective_batch=effective_batch,
        lr=optim.lr if optim.lr is not None else optim.blr * effective_batch / 256,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=max(1, math.ceil(schedule.epochs * steps_per_epoch)),
        warmup_steps=math.ceil(schedule.warmup_epochs * steps_per_epoch),
    )


def check_model(model_config: Any) -> dict[str, Any]:
    """The resolved architecture; a clear error for impossible geometry."""
    overrides = {
        k: getattr(model_config, k)
        for k in (
            "img_size",
            "patch_size",
            "in_chans",
            "embed_dim",
            "depth",
            "num_heads",
            "decoder_embed_dim",
            "decoder_depth",
            "decoder_num_heads",
            "mlp_ratio",
            "norm_pix_loss",
        )
        if hasattr(model_config, k)
    }
    try:
        arch = model_args(model_config.name, **overrides)
    except ValueError as error:
        raise ConfigError(f"model.name: {error}") from None
    require(
        arch["img_size"] % arch["patch_size"] == 0,
        f"model.img_size {arch['img_size']} is not a multiple of model.patch_size {arch['patch_size']}",
    )
    require(arch["in_chans"] in (1, 3), f"model.in_chans must be 1 or 3, got {arch['in_chans']}")
    for prefix in ("", "decoder_"):
        width, heads = arch[f"{prefix}embed_dim"], arch[f"{prefix}num_heads"]
        require(
            width % heads == 0,
            f"model.{prefix}embed_dim {width} is not divisible by model.{prefix}num_heads {heads}",
        )
        require(
            width % 4 == 0, f"model.{prefix}embed_dim {width} must be divisible by 4 (2-D sin-cos positions)"
        )
    return arch


def check_data(data: DataConfig, in_chans: int) -> None:
    require(data.batch_size >= 1, f"data.batch_size must be at least 1, got {data.batch_size}")
    require(data.num_workers >= 0, f"data.num_workers must be 0 or more, got {data.num_workers}")
    require(
        len(data.crop_scale) == 2 and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1,
        f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {data.crop_scale}",
    )
    for key in ("mean", "std"):
        values = getattr(data, key)
        require(len(values) in (1, 3) and len(values) >= 1, f"data.{key} needs 1 or 3 values, got {values}")
    require(all(s > 0 for s in data.std), f"data.std must be positive, got {data.std}")
    require(
        0 <= data.max_bad_fraction < 1,
        f"data.max_bad_fraction must be in [0, 1), got {data.max_bad_fraction}",
    )
    require(
        data.shards_per_chunk >= 1, f"data.shards_per_chunk must be at least 1, got {data.shards_per_chunk}"
    )


def check_optim(optim: OptimConfig, schedule: ScheduleConfig) -> None:
    require(optim.blr > 0 or (optim.lr or 0) > 0, "optim.blr (or optim.lr) must be positive")
    require(optim.accum_steps >= 1, f"optim.accum_steps must be at least 1, got {optim.accum_steps}")
    require(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        f"optim.betas must be two values in [0, 1), got {optim.betas}",
    )
    require(
        optim.grad_clip is None or optim.grad_clip > 0,
        f"optim.grad_clip must be positive, got {optim.grad_clip}",
    )
    require(schedule.epochs > 0, f"schedule.epochs must be positive, got {schedule.epochs}")
    require(
        0 <= schedule.warmup_epochs <= schedule.epochs,
        f"schedule.warmup_epochs must be in [0, schedule.epochs], got {schedule.warmup_epochs}",
    )


def check_run_dir(run_dir: str) -> Path:
    require(bool(run_dir), "run.dir is not set (where checkpoints and logs go): add run.dir=PATH")
    path = Path(run_dir)
    require(not path.exists() or path.is_dir(), f"run.dir {path} exists and is not a directory")
    return path


def check_pretrain(config: PretrainConfig) -> tuple[dict[str, Any], ShardSet]:
    """Validates everything before any work; returns the architecture and the training shards."""
    arch = check_model(config.model)
    require(
        0 < config.model.mask_ratio < 1, f"model.mask_ratio must be in (0, 1), got {config.model.mask_ratio}"
    )
    check_data(config.data, arch["in_chans"])
    check_optim(config.optim, config.schedule)
    require(
        config.deepspeed.zero_stage in (0, 1, 2),
        f"deepspeed.zero_stage must be 0, 1 or 2, got {config.deepspeed.zero_stage}",
    )
    require(
        config.deepspeed.precision in ("auto", "bf16", "fp16", "fp32"),
        f"deepspeed.precision must be auto, bf16, fp16 or fp32, got {config.deepspeed.precision!r}",
    )
    check_run_dir(config.run.dir)
    require(
        config.run.checkpoint_every >= 1,
        f"run.checkpoint_every must be at least 1, got {config.run.checkpoint_every}",
    )
    require(config.run.keep_last >= 1, f"run.keep_last must be at least 1, got {config.run.keep_last}")
    require(config.log.every >= 1, f"log.every must be at least 1, got {config.log.every}")
    try:
        shards = open_shards(config.data.train)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data.train: {error}") from None
    require(
        shards.num_samples is not None or config.data.samples_per_epoch is not None,
        f"data.train {config.data.train!r} has no _info.json with sample counts: set data.samples_per_epoch",
    )
    return arch, shards
