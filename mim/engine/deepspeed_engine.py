"""The one module that builds a DeepSpeed engine, configured so that it adds no per-step tax
over a plain PyTorch loop (benchmarks/pretrain_step.py measures the two side by side):

- bf16 is DeepSpeed's `torch_autocast` mode (fp32 weights, gradients and optimizer state, bf16
  matmuls), the same math as the official MAE loop; DeepSpeed's `bf16` section would keep bf16
  weights and check every gradient tensor for inf/NaN on every step.
- ZeRO partitions nothing on one process: `zero_stage: auto` is stage 0 there (and the gradient
  all-reduce over a world of one is skipped), stage 1 on several processes.
- DeepSpeed's throughput timer, which synchronises the device twice a step, is off; mim measures
  its own rate at log steps.
- AdamW is torch's fused kernel wherever the device has one.
- The model can be compiled (`engine.compile()`, in place: state-dict names do not change).
"""

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
    zero_stage: int | str  # 0 | 1 | 2 | auto
    precision: str  # auto | bf16 | fp16 | fp32
    grad_clip: float | None
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # adamw | lars
    compile: bool | str = False  # true | false | auto (on CUDA only)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def resolve_zero_stage(zero_stage: int | str, world_size: int) -> int:
    """auto: 0 on one process (nothing to partition), 1 on several."""
    if zero_stage == "auto":
        return 0 if world_size == 1 else 1
    return int(zero_stage)


def resolve_compile(compile_model: bool | str) -> bool:
    """auto: compile on CUDA, where it pays; on the CPU compiling costs more than it gives."""
    if compile_model == "auto":
        return torch.cuda.is_available()
    return bool(compile_model)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype images enter the engine in: fp16 weights take fp16 inputs; bf16 autocast and
    fp32 take fp32 (autocast casts inside the matmuls)."""
    return torch.float16 if resolve_precision(precision) == "fp16" else torch.float32


def deepspeed_config(settings: EngineSettings) -> dict:
    precision = resolve_precision(settings.precision)
    zero_stage = resolve_zero_stage(settings.zero_stage, settings.world_size)
    config = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.accum_steps,
        "train_batch_size": settings.micro_batch_size * settings.accum_steps * settings.world_size,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # mim logs by itself
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
    }
    if precision == "bf16":
        # No module listed as safe for lower precision: gradients are all-reduced in fp32, as DDP
        # does in the official loop (DeepSpeed's default would sum Linear gradients in bf16).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    # Stage 0 clips in mim (one fused pass, no host sync: see engine.step.StepRunner); ZeRO clips
    # the partitions it owns. Always said: DeepSpeed's own default is to clip at 1.0.
    config["gradient_clipping"] = settings.grad_clip if settings.grad_clip and zero_stage > 0 else 0.0
    return config


def make_optimizer(groups: list[dict], settings: EngineSettings) -> torch.optim.Optimizer:
    # "names" is ours, for messages and tests; torch's optimizers keep unknown group keys.
    if settings.optimizer == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=0.0, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.0, betas=settings.betas, fused=True)


def build_engine(model: nn.Module, groups: list[dict], settings: EngineSettings):
    """Wraps `model` and an optimizer over `groups` in a DeepSpeed engine. The lr is set every
    step by the caller (schedule.apply_lr on engine.optimizer.param_groups)."""
    import deepspeed

    optimizer = make_optimizer(groups, settings)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(settings), dist_init_required=False
    )
    if settings.world_size == 1 and resolve_zero_stage(settings.zero_stage, 1) == 0:
        # An all-reduce over one process averages nothing but flattens and copies every gradient.
        engine.enable_backward_allreduce = False
    if resolve_compile(settings.compile):
        engine.compile()
    return engine


def engine_param_groups(engine) -> list[dict]:
    """The param groups whose lr the optimizer really uses (ZeRO wraps the client optimizer)."""
    return engine.optimizer.param_groups


def engine_description(settings: EngineSettings) -> dict:
    """What a checkpoint's optimizer state depends on: a resume needs the same."""
    return {
        "zero_stage": resolve_zero_stage(settings.zero_stage, settings.world_size),
        "precision": resolve_precision(settings.precision),
    }
