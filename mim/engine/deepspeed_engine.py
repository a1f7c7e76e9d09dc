"""The one module that builds a DeepSpeed engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    micro_batch_size: int
    accum_steps: int
    world_size: int
    zero_stage: int
    precision: str  # auto | bf16 | fp16 | fp32
    grad_clip: float | None
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # adamw | lars


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def deepspeed_config(settings: EngineSettings) -> dict:
    precision = resolve_precision(settings.precision)
    config = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.accum_steps,
        "train_batch_size": settings.micro_batch_size * settings.accum_steps * settings.world_size,
        "zero_optimization": {"stage": settings.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # mim logs by itself
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
    }
    if settings.grad_clip:
        config["gradient_clipping"] = settings.grad_clip
    return config


def make_optimizer(groups: list[dict], settings: EngineSettings) -> torch.optim.Optimizer:
    # "names" is ours, for messages and tests; torch's optimizers keep unknown group keys.
    if settings.optimizer == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=0.0, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.0, betas=settings.betas)


def build_engine(model: nn.Module, groups: list[dict], settings: EngineSettings):
    """Wraps `model` and an optimizer over `groups` in a DeepSpeed engine. The lr is set every
    step by the caller (schedule.apply_lr on engine.optimizer.param_groups)."""
    import deepspeed

    optimizer = make_optimizer(groups, settings)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(settings), dist_init_required=False
    )
    return engine


def engine_param_groups(engine) -> list[dict]:
    """The param groups whose lr the optimizer really uses (ZeRO wraps the client optimizer)."""
    return engine.optimizer.param_groups
