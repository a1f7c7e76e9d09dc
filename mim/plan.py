"""The memory plan of a pretraining or fine-tuning run (timm's ViT classifier on whole images,
its `finetune.method` applied), per process, before any accelerator is bought.

    parameters   the fp32 weights (ZeRO 3: this process's slices, plus the tensors that stay
                 whole, plus those DeepSpeed gathers and keeps for the step)
    gradients    fp32, whole at ZeRO 0 and 1 (1 also keeps its partition's fp32 copy), this
                 process's partition at 2 and 3
    optimizer    AdamW's two fp32 moments (LARS's one), with DeepSpeed's fp32 master copy of the
                 partition at ZeRO 1-3, partitioned over the processes from stage 1
    activations  what autograd keeps for backward, counted by running the model's forward and
                 loss on the meta device (no memory, any size) at the run's micro-batch, mask
                 ratio, precision (bf16: autocast's casts, the weights' bf16 copies included) and
                 activation checkpointing; plus the peak that backward adds on top of it
    buffers      DeepSpeed's: the gradient-reduction bucket (ZeRO 2 and 3), allocated whole; at
                 ZeRO 3 on several processes the prefetch bucket of weights gathered ahead

The activation count is exact for what autograd saves; the backward peak above it is a
per-block estimate (`BACKWARD_PEAK_BLOCK_SHARE` of one block's saved tensors, or a whole block's
recomputation when it is checkpointed), checked against measured peaks by
benchmarks/memory_plan.py. A device `fits` what is under `USABLE_SHARE` of its memory (the
rest: the CUDA context, the allocator's slack, the data loader's pinned buffers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mim.config import FinetuneMethodConfig
from mim.engine.deepspeed_engine import REDUCE_BUCKET, model_states
from mim.models.arch import MaeArch, read_arch
from mim.models.backbone import create_vit
from mim.models.checkpointing import checkpoint_blocks
from mim.models.finetuning import method_of
from mim.models.mae import MaskedAutoencoderViT

USABLE_SHARE = 0.92
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default
BACKWARD_PEAK_BLOCK_SHARE = 1.0  # of the largest block's saved tensors: backward's transient peak
GiB = 1 << 30


@dataclass(frozen=True)
class Setup:
    arch: MaeArch  # the MAE's architecture (mim.models.registry.model_args)
    micro_batch: int
    world_size: int
    zero_stage: int
    precision: str = "fp32"  # fp32 | bf16 (autocast over fp32 weights)
    grad_checkpointing: int = 0  # every k-th block recomputed in backward; 0: off
    mask_ratio: float = 0.75
    optimizer: str = "adamw"
    pred_dim: int | None = None  # the decoder's output per patch; None: pixels
    task: str = "pretrain"  # or "finetune": the encoder with a classifier head, every patch seen
    method: tuple[tuple[str, Any], ...] = ()  # finetune: the finetune.* keys, as items
    num_classes: int = 1000  # finetune: the head's


@dataclass(frozen=True)
class MemoryPlan:
    setup: Setup
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    num_params: int
    trained: int = 0  # parameters with gradients and optimizer state

    @property
    def total(self) -> float:
        """Below stage 3 gradients and activations do not peak together: backward frees a block's
        activations as it makes the block's gradients, so the step's peak holds the larger of the
        two. Stage 3 keeps its gradient partition in one flat buffer allocated with the engine
        (contiguous_gradients), held while the forward's activations are."""
        if self.setup.zero_stage == 3:
            return self.parameters + self.optimizer + self.buffers + self.gradients + self.activations
        return self.parameters + self.optimizer + self.buffers + max(self.gradients, self.activations)

    def fits(self, device_memory: float) -> bool:
        return self.total <= USABLE_SHARE * device_memory

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("DeepSpeed buffers", self.buffers),
            ("total", self.total),
        ]


# ----------------------------------------------------------------------------- activations


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, memory-efficient, the CPU's flash) keeps for
    backward: q, k, v, the output and the rows' log-sum-exp, never the attention matrix. On the
    meta device torch takes the math path, which would keep it."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class _Trace(TorchFunctionMode):
    """The forward as the accelerator runs it, on the meta device: attention through a fused
    kernel; with `bf16`, autocast's casts as torch.autocast does them on CUDA (autocast does
    nothing on the meta device): matmuls and attention in bf16 (each weight cast once per
    forward, the copy in autocast's cache until the forward ends), normalisation in fp32,
    everything else as it comes."""

    LOWER = {
        torch._C._nn.linear,
        torch.conv2d,
        torch.nn.functional.scaled_dot_product_attention,
        torch.matmul,
        torch.bmm,
        torch.mm,
        torch.addmm,
        torch.baddbmm,
    }
    FP32 = {torch.layer_norm, torch.nn.functional.layer_norm, torch.softmax, torch.nn.functional.softmax}

    def __init__(self, bf16: bool) -> None:
        super().__init__()
        self.bf16 = bf16
        self.casts: dict[int, torch.Tensor] = {}  # autocast's cache: held until forward ends

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not (torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype):
            return value
        if isinstance(value, nn.Parameter):
            if id(value) not in self.casts:
                self.casts[id(value)] = value.to(dtype)
            return self.casts[id(value)]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.LOWER else torch.float32 if func in self.FP32 else None
        if self.bf16 and dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FlashAttention.apply(*args[:3])
        return func(*args, **kwargs)


def _meta_model(setup: Setup) -> nn.Module:
    with torch.device("meta"):
        if setup.task == "finetune":
            arch = read_arch(setup.arch)
            model = create_vit(arch, num_classes=setup.num_classes, global_pool="avg", fc_norm=True)
            method_of(FinetuneMethodConfig(**dict(setup.method))).apply(model)
        else:
            model = MaskedAutoencoderViT(**setup.arch, pred_dim=setup.pred_dim)
    for blocks in _block_lists(model):
        checkpoint_blocks(blocks, setup.grad_checkpointing)
    return model


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [model.blocks, *([model.decoder_blocks] if hasattr(model, "decoder_blocks") else [])]


def saved_bytes(setup: Setup, batch: int) -> tuple[float, float, float]:
    """(bytes autograd holds at the end of forward, the largest one block holds, the bytes of
    autocast's weight casts that nothing saved) for `batch` images, counted on the meta device:
    every tensor saved for backward once (by its storage), parameters left out, and a
    checkpointed block's input, which its recomputation keeps. Autocast's cache holds a bf16
    copy of every weight until the forward ends, saved for backward or not."""
    model = _meta_model(setup)
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    held: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # alive until the count ends: no storage address is reused
    per_block: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            held.setdefault(storage._cdata, storage.nbytes())
            kept.append(tensor)
        return tensor

    def block_hooks(block: nn.Module):
        start: dict[str, int] = {}

        def before(module, inputs):
            start["bytes"] = sum(held.values())
            # a checkpointed block keeps its input unless backward never reaches it (frozen, frozen input)
            trained = any(p.requires_grad for p in module.parameters())
            if getattr(type(module), "checkpointed", False) and torch.is_grad_enabled():
                for value in inputs:
                    if trained or value.requires_grad:
                        pack(value)

        def after(module, inputs, output):
            per_block.append(sum(held.values()) - start["bytes"])

        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)

    for blocks in _block_lists(model):
        for block in blocks:
            block_hooks(block)
    mode = _Trace(bf16=setup.precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), mode:
        _forward(model, setup, batch)
    unsaved_casts = 0.0
    if mode.bf16:  # the cache: a bf16 copy of every matmul's weight and bias, less what backward keeps
        cached = sum(
            2 * p.numel()
            for module in model.modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
            for p in module.parameters()
            if p.requires_grad
        )
        kept = sum(
            c.untyped_storage().nbytes() for c in mode.casts.values() if c.untyped_storage()._cdata in held
        )
        unsaved_casts = float(max(0, cached - kept))
    return float(sum(held.values())), float(max(per_block, default=0)), float(unsaved_casts)


def _forward(model: nn.Module, setup: Setup, batch: int) -> None:
    """The training forward of `batch` images: a fine-tune's classifier, or the MAE with its loss."""
    size, channels = setup.arch["img_size"], setup.arch["in_chans"]
    images = torch.empty(batch, channels, size, size, device="meta")
    if setup.task == "finetune":
        model(images)
        return
    noise = torch.empty(batch, model.num_patches, device="meta").uniform_()
    target = None
    if setup.pred_dim is not None:
        target = torch.empty(batch, model.num_patches, setup.pred_dim, device="meta")
    model(images, mask_ratio=setup.mask_ratio, noise=noise, target=target)


def _key(setup: Setup) -> tuple:
    """What the activations depend on besides the batch (hashable, for the cache)."""
    return (
        tuple(sorted(setup.arch.items())),
        setup.precision,
        setup.grad_checkpointing,
        setup.mask_ratio,
        setup.pred_dim,
        setup.task,
        setup.method,
        setup.num_classes,
    )


@functools.lru_cache(maxsize=128)
def _activation_terms(key: tuple) -> tuple[tuple[float, float], ...]:
    """(per image, fixed) of: the saved bytes, the largest block's, the unsaved casts, and what
    a recomputed block holds. Every shape grows with the batch, so two traces give them all."""
    arch, precision, every, mask_ratio, *rest = key  # rest: pred_dim, task, method, num_classes
    setup = Setup(dict(arch), 1, 1, 0, precision, every, mask_ratio, "adamw", *rest)
    one, two = saved_bytes(setup, 1), saved_bytes(setup, 2)
    terms = [(b - a, 2 * a - b) for a, b in zip(one, two, strict=True)]
    if every:  # a checkpointed block, recomputed in backward, holds what it holds unchecked
        whole = replace(setup, grad_checkpointing=0)
        a, b = saved_bytes(whole, 1)[1], saved_bytes(whole, 2)[1]
        terms.append((b - a, 2 * a - b))
    else:
        terms.append((0.0, 0.0))
    return tuple(terms)


def activation_bytes(setup: Setup, batch: int | None = None) -> float:
    """The peak of the activations: at the end of forward (with autocast's cache) or in backward
    (a transient on top of what is saved), whichever is higher."""
    batch = setup.micro_batch if batch is None else batch
    saved, largest, casts, recomputed = (
        slope * batch + fixed for slope, fixed in _activation_terms(_key(setup))
    )
    backward = max(BACKWARD_PEAK_BLOCK_SHARE * largest, recomputed)
    return saved + max(casts, backward)


# ----------------------------------------------------------------------------- model states


def _param_counts(setup: Setup) -> tuple[int, int, int]:
    """(trained, frozen, trained in tensors DeepSpeed keeps whole at ZeRO 3) parameter values."""
    key = (setup.pred_dim, setup.task, setup.method, setup.num_classes)
    return _counts(tuple(sorted(setup.arch.items())), *key)


@functools.lru_cache(maxsize=64)
def _counts(arch: tuple, *rest: Any) -> tuple[int, int, int]:  # rest: pred_dim, task, method, classes
    model = _meta_model(Setup(dict(arch), 1, 1, 0, "fp32", 0, 0.75, "adamw", *rest))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    whole = sum(p.numel() for p in model.parameters() if p.numel() < PERSISTENCE_THRESHOLD)
    return trained, frozen, whole


def plan(setup: Setup) -> MemoryPlan:
    trained, frozen, whole = _param_counts(setup)
    world, stage = setup.world_size, setup.zero_stage
    parameters, gradients, optimizer = model_states(trained, world, stage, setup.optimizer, frozen)
    if stage == 3:
        # The tensors that stay whole on every process, and those gathered for the step:
        # DeepSpeed releases a gathered tensor only when it is not used again within
        # max_reuse_distance values (1e9: a forward's tensors stay for backward), and holds at
        # most max_live_parameters of them.
        gathered = min(MAX_LIVE_PARAMETERS, trained + frozen - whole)
        parameters += 4.0 * (whole * (1 - 1 / world) + gathered)
    # The gradient-reduction bucket, allocated whole (mim sizes it to the model where the model
    # is smaller: mim.engine.deepspeed_engine.zero_optimization). Stage 3 on several processes
    # also all-gathers the weights a forward is about to use ahead of time, into buffers of up to
    # stage3_prefetch_bucket_size values, held while the gathered weights are.
    buffers = 4.0 * min(REDUCE_BUCKET, trained) if stage >= 2 else 0.0
    if stage == 3 and world > 1:
        buffers += 4.0 * min(PREFETCH_BUCKET, trained + frozen - whole)
    return MemoryPlan(
        setup=setup,
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activation_bytes(setup),
        buffers=buffers,
        num_params=trained + frozen,
        trained=trained,
    )


def largest_micro_batch(setup: Setup, device_memory: float, limit: int = 4096) -> int:
    """The largest micro-batch (at most `limit`) whose plan fits `device_memory`; 0: not even one
    image. The activations grow with the batch: a bisection over exact plans."""

    def fits(batch: int) -> bool:
        return plan(replace(setup, micro_batch=batch)).fits(device_memory)

    low, high = 0, limit + 1  # fits(low) (or low == 0); not fits(high)
    if fits(limit):
        return limit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def alternatives(setup: Setup, device_memory: float) -> list[tuple[Setup, int]]:
    """Setups that fit where `setup` does not, with the largest micro-batch each fits: ZeRO
    stages above the one asked for, with and without activation checkpointing of every block."""
    found = []
    for stage in range(setup.zero_stage, 4):
        if stage > 0 and setup.world_size == 1 and stage < 3:
            continue
        for every in sorted({setup.grad_checkpointing, 1}):
            candidate = replace(setup, zero_stage=stage, grad_checkpointing=every)
            if candidate == setup:
                continue
            batch = largest_micro_batch(candidate, device_memory)
            if batch > 0:
                found.append((candidate, batch))
    return found


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '141e9', '24G' -> bytes (GB and G: 10^9; GiB: 2^30)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": GiB, "tib": 1 << 40, "kb": 1e3, "mb": 1e6, "gb": 1e9}
    units.update({"tb": 1e12, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "b": 1})
    lowered = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            try:
                return float(number) * units[unit]
            except ValueError:
                break
    try:
        return float(lowered)
    except ValueError:
        raise ValueError(f"device memory {text!r} is not a size such as 80GB, 141GB or 24GiB") from None


def gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"
