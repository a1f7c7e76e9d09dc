"""The one module that builds a DeepSpeed engine, configured so that it adds no per-step tax
over a plain PyTorch loop (benchmarks/pretrain_step.py measures the two side by side):

- bf16 is DeepSpeed's `torch_autocast` mode (fp32 weights, gradients and optimizer state, bf16
  matmuls), the same math as the official MAE loop; DeepSpeed's `bf16` section would keep bf16
  weights and check every gradient tensor for inf/NaN on every step.
- `zero_stage: auto` is the lowest stage whose model states (fp32 weights, gradients, optimizer
  state) fit in half the device's memory (`choose_zero_stage`): stage 0 for every registered
  model up to ViT-H on a 40 GB GPU, since partitioning what fits buys nothing and costs a
  per-step tax; stage 3 (the weights partitioned too, gathered block by block in forward and
  backward) only where stage 2 does not fit. At stage 0 on several processes mim averages the gradients during backward
  (engine.grad_sync); on one process there is nothing to average and no all-reduce runs.
- DeepSpeed's throughput timer, which synchronises the device twice a step, is off; mim measures
  its own rate at log steps.
- AdamW is torch's fused kernel wherever the device has one.
- The model can be compiled (`engine.compile()`, in place: state-dict names do not change).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    micro_batch_size: int
    accum_steps: int
    world_size: int
    zero_stage: int | str  # 0 | 1 | 2 | 3 | auto
    precision: str  # auto | bf16 | fp16 | fp32
    grad_clip: float | None
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: str = "adamw"  # adamw | lars
    compile: bool | str = False  # true | false | auto (on CUDA only)
    num_params: int = 0  # trainable parameters: what zero_stage auto has to fit
    device_memory: int | None = None  # bytes per process for zero_stage auto; None: this device's
    zero_options: tuple[tuple[str, object], ...] = ()  # extra zero_optimization keys (benchmarks)

    @property
    def resolved_zero_stage(self) -> int:
        return resolve_zero_stage(
            self.zero_stage, self.world_size, self.num_params, self.device_memory, self.optimizer
        )


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


MODEL_STATE_SHARE = 0.5  # of device memory for weights, gradients and optimizer state; the rest
# is for activations, communication buckets and the allocator's slack


def model_states(
    num_params: int, world_size: int, stage: int, optimizer: str = "adamw", frozen: int = 0
) -> tuple[float, float, float]:
    """Per process, in bytes: (weights, gradients, optimizer state) of `num_params` trained and
    `frozen` frozen parameters, all fp32; the one model of them, which `zero_stage: auto` and
    `mim plan` both use. Optimizer state: AdamW's two moments (8 bytes a parameter) or LARS's
    momentum (4), plus DeepSpeed's fp32 master copy of the partitioned weights from stage 1 (4).
    Stage 1 partitions the optimizer state and keeps the whole gradients plus its partition of
    them in fp32 for the step; stage 2 partitions the gradients; stage 3 the weights too."""
    moments = 8 if optimizer == "adamw" else 4
    weights = 4.0 * (num_params + frozen) / (world_size if stage == 3 else 1)
    if stage == 0:
        return weights, 4.0 * num_params, float(moments * num_params)
    optimizer_state = (4.0 + moments) * num_params / world_size
    if stage == 1:
        return weights, 4.0 * num_params * (1 + 1 / world_size), optimizer_state
    return weights, 4.0 * num_params / world_size, optimizer_state


def model_state_bytes(num_params: int, world_size: int, stage: int, optimizer: str = "adamw") -> float:
    """Per process: the weights, gradients and optimizer state of `model_states`, together."""
    return sum(model_states(num_params, world_size, stage, optimizer))


def device_memory_bytes() -> int:
    """Memory one process may use: the GPU's, or this machine's RAM shared by its processes."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)


def choose_zero_stage(num_params: int, world_size: int, device_memory: int, optimizer: str = "adamw") -> int:
    """The lowest ZeRO stage whose model states fit in MODEL_STATE_SHARE of the device memory;
    3 where none does (with one process there is nothing to partition: 0)."""
    if world_size == 1:
        return 0
    budget = MODEL_STATE_SHARE * device_memory
    for stage in (0, 1, 2):
        if model_state_bytes(num_params, world_size, stage, optimizer) <= budget:
            return stage
    return 3


def resolve_zero_stage(
    zero_stage: int | str,
    world_size: int,
    num_params: int = 0,
    device_memory: int | None = None,
    optimizer: str = "adamw",
) -> int:
    """The stage asked for; auto: `choose_zero_stage` for this model on this device."""
    if zero_stage != "auto":
        return int(zero_stage)
    if world_size == 1:
        return 0
    memory = device_memory if device_memory is not None else device_memory_bytes()
    return choose_zero_stage(num_params, world_size, memory, optimizer)


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
    zero_stage = settings.resolved_zero_stage
    config = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.accum_steps,
        "train_batch_size": settings.micro_batch_size * settings.accum_steps * settings.world_size,
        "zero_optimization": zero_optimization(zero_stage, settings.zero_options, settings.num_params),
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


REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default, in values


def zero_optimization(stage: int, options: tuple[tuple[str, object], ...] = (), num_params: int = 0) -> dict:
    """DeepSpeed's ZeRO section. Stage 1 keeps whole gradients in each parameter's .grad, so
    DeepSpeed's contiguous_gradients buys no memory there; it only adds a Python hook per
    parameter on every backward (README: Speed, `--zero-option contiguous_gradients=false`).
    Stage 2 keeps it (DeepSpeed's default): it keeps partitioned gradients from fragmenting GPU
    memory in the large models that auto sends there. The gradient norm is switched per step by
    StepRunner. Stage 3 keeps DeepSpeed's prefetching and its persistence threshold (tensors of
    fewer than 100k values, norms and biases, stay whole on every process). At stages 2 and 3
    DeepSpeed allocates its gradient-reduction bucket whole, 5e8 values by default (2 GB in
    fp32): mim sizes it to the model where the model is smaller (`num_params`, 0: DeepSpeed's)."""
    section: dict = {"stage": stage}
    if stage == 1:
        section["contiguous_gradients"] = False
    if stage >= 2 and num_params:
        section["reduce_bucket_size"] = min(REDUCE_BUCKET, num_params)
    if stage > 0:
        section.update(options)
    return section


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
    if settings.world_size == 1 and settings.resolved_zero_stage == 0:
        # An all-reduce over one process averages nothing but flattens and copies every gradient.
        engine.enable_backward_allreduce = False
    # DeepSpeed's stage-0 zero_grad walks the module tree for its parameters on every step (a
    # measurable share of a small model's step: README, Speed); the list does not change.
    engine.zero_grad = _grads_to_none(list(model.parameters()))
    if resolve_compile(settings.compile):
        engine.compile()
    return engine


def _grads_to_none(parameters: list[nn.Parameter]):
    def zero_grad() -> None:
        for parameter in parameters:
            parameter.grad = None

    return zero_grad


def is_partitioned(engine) -> bool:
    """ZeRO stage 3: each process holds a slice of every large parameter, not the parameter."""
    return engine.zero_optimization_stage() == 3


def full_state_dict(
    engine,
    rank: int,
    device: torch.device | str = "cpu",
    everywhere: bool = False,
    trained_only: bool = False,
):
    """The module's state dict with whole fp32 tensors on `device`: on rank 0 only (None elsewhere),
    or on every rank with `everywhere`; with `trained_only`, without the frozen parameters. Every
    rank calls it: at stage 3 each parameter is gathered from its partitions in turn (one
    parameter's whole size at a time on the accelerator)."""
    module = engine.module
    wanted = everywhere or rank == 0
    frozen = frozen_names(module) if trained_only else set()
    if not is_partitioned(engine):
        if not wanted:
            return None
        return {
            k: v.detach().float().to(device).contiguous()
            for k, v in module.state_dict().items()
            if k not in frozen
        }
    import deepspeed

    parameters = dict(module.named_parameters())
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if name in frozen:
            continue
        if name not in parameters:  # buffers are never partitioned
            if wanted:
                state[name] = value.detach().float().to(device).contiguous()
            continue
        with deepspeed.zero.GatheredParameters([parameters[name]]):
            if wanted:
                state[name] = parameters[name].detach().float().to(device).clone()
    return state if wanted else None


def frozen_names(module: nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if not parameter.requires_grad}


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device (no memory): what `materialize` fills with weights."""
    import copy

    memo = {
        id(tensor): (
            nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=tensor.requires_grad)
            if isinstance(tensor, nn.Parameter)
            else torch.empty_like(tensor, device="meta")
        )
        for tensor in (*model.parameters(), *model.buffers())
    }
    return copy.deepcopy(model, memo)


def materialize(frame: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain module of `frame`'s structure (a `skeleton`) holding `state`, on `device`."""
    import copy

    module = copy.deepcopy(frame)
    module.load_state_dict(state, strict=True, assign=True)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.to(device)


def engine_param_groups(engine) -> list[dict]:
    """The param groups whose lr the optimizer really uses (ZeRO wraps the client optimizer)."""
    return engine.optimizer.param_groups


def engine_description(settings: EngineSettings) -> dict:
    """What a checkpoint's optimizer state depends on: a resume needs the same."""
    return {
        "zero_stage": settings.resolved_zero_stage,
        "precision": resolve_precision(settings.precision),
    }
