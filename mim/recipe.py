"""Checks of a config that need more than types, and the values derived from it: computed once,
here, before any work starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mim.config import (
    ClassifyConfig,
    ConfigError,
    DataConfig,
    MonitorConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    ScheduleConfig,
    require,
)
from mim.data.holdout import Holdout
from mim.data.members import check_keys
from mim.data.pixels import check_pixels
from mim.data.reading import ReadPolicy, ShardUnreadable
from mim.data.segmentation import DEFAULT_IGNORE_INDEX
from mim.data.shards import ShardSet, open_shards, with_lengths
from mim.data.streams import spread_subset
from mim.engine.evaluate import EvaluationSplits, KnnSplits
from mim.engine.trackers import check_trackers
from mim.models.arch import ARCH_KEYS, MaeArch, ViTArch
from mim.models.backbone import Weights
from mim.models.registry import model_args
from mim.models.target_kinds import TARGETS
from mim.models.transforms import TRANSFORMS
from mim.weights import load_weights


@dataclass(frozen=True)
class TrainingPlan:
    """What a run does, derived once from its config: the effective batch, the lr, its epochs in steps."""

    effective_batch: int  # samples per optimizer step, all ranks and micro-steps together
    lr: float
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def batch_split(effective_batch: int, world_size: int, batch_size: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation steps) per process that make `effective_batch` on `world_size`
    processes, with the largest micro-batch up to `batch_size`; None where the processes cannot
    share it evenly."""
    if effective_batch % world_size:
        return None
    per_process = effective_batch // world_size
    micro = next(m for m in range(min(batch_size, per_process), 0, -1) if per_process % m == 0)
    return micro, per_process // micro


def process_counts_for(effective_batch: int, limit: int = 1024) -> list[int]:
    return [count for count in range(1, min(effective_batch, limit) + 1) if effective_batch % count == 0]


def make_plan(
    optim: OptimConfig, schedule: ScheduleConfig, batch_size: int, world_size: int, samples_per_epoch: int
) -> TrainingPlan:
    effective_batch = batch_size * optim.accum_steps * world_size
    steps_per_epoch = max(1, samples_per_epoch // effective_batch)
    return TrainingPlan(
        effective_batch=effective_batch,
        lr=optim.lr if optim.lr is not None else optim.blr * effective_batch / 256,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=max(1, math.ceil(schedule.epochs * steps_per_epoch)),
        warmup_steps=math.ceil(schedule.warmup_epochs * steps_per_epoch),
    )


def check_model(model_config: Any) -> MaeArch:
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
            "qk_norm",
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


def check_data(data: DataConfig) -> None:
    """What relates data keys to each other (single values are checked as the config is built)."""
    check_keys(data.image_key, data.label_key)
    require(
        len(data.crop_scale) == 2 and data.crop_scale[0] <= data.crop_scale[1],
        f"data.crop_scale must be [low, high] with low <= high, got {data.crop_scale}",
    )


def read_policy(data: DataConfig) -> ReadPolicy:
    return ReadPolicy(attempts=data.read_retries + 1, wait=data.retry_wait)


def check_optim(optim: OptimConfig, schedule: ScheduleConfig) -> None:
    require(len(optim.betas) == 2, f"optim.betas must be two values [beta1, beta2], got {optim.betas}")
    require(
        schedule.warmup_epochs <= schedule.epochs,
        f"schedule.warmup_epochs must be at most schedule.epochs ({schedule.epochs}), got {schedule.warmup_epochs}",
    )


def check_run_dir(run_dir: str) -> Path:
    require(bool(run_dir), "run.dir is not set (where checkpoints and logs go): add run.dir=PATH")
    path = Path(run_dir)
    require(not path.exists() or path.is_dir(), f"run.dir {path} exists and is not a directory")
    return path


HANG_TIMEOUT_FLOOR = 5.0  # seconds: below it a healthy step or a log line's sync could pass for a hang


def check_run(run: RunConfig) -> Path:
    """The run dir, and what relates the loop's self-healing keys to each other and to the checkpoints."""
    path = check_run_dir(run.dir)
    require(
        run.spike_threshold == 0 or run.spike_threshold > 1,
        f"run.spike_threshold must be 0 (off) or above 1 (a multiple of the recent mean loss), "
        f"got {run.spike_threshold}",
    )
    require(
        run.hang_timeout == 0 or run.hang_timeout >= HANG_TIMEOUT_FLOOR,
        f"run.hang_timeout must be 0 (off) or at least {HANG_TIMEOUT_FLOOR:g} seconds, got {run.hang_timeout}",
    )
    require(
        run.on_divergence != "rollback" or run.keep_last >= 2,
        f"run.on_divergence=rollback needs run.keep_last >= 2 (got {run.keep_last}): a rollback restores the "
        "newest checkpoint that verifies, and one damaged checkpoint must not leave none; "
        "raise run.keep_last or set run.on_divergence=stop",
    )
    return path


def check_init(init_from: str, arch: MaeArch) -> Weights | None:
    """Weights to start pretraining from (init.from); their encoder must have this run's shape, but
    for its bands (the patch embedding is adapted: mim.models.backbone.adapt_patch_embedding)."""
    if not init_from:
        return None
    weights = load_weights(init_from)
    compared = [k for k in ARCH_KEYS if k not in ("img_size", "in_chans") and k not in weights.guessed]
    mismatched = {k: (weights.arch[k], arch[k]) for k in compared if weights.arch[k] != arch[k]}
    require(
        not mismatched,
        f"init.from {init_from}: its encoder does not have this run's shape "
        f"(key: (theirs, ours)) {mismatched}; set model.* to match it",
    )
    return weights


def check_pretrain(config: PretrainConfig) -> tuple[dict[str, Any], ShardSet]:
    """Validates everything before any work; returns the architecture and the training shards."""
    arch = check_model(config.model)
    check_data(config.data)
    check_optim(config.optim, config.schedule)
    check_run(config.run)
    check_trackers(config.log)
    try:
        shards = open_shards(config.data.train, read_policy(config.data))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data.train: {error}") from None
    if config.model.in_chans is None and shards.pixels is not None:
        arch["in_chans"] = shards.pixels["bands"]  # the model follows the data
    check_pixels(config.data, shards, arch["in_chans"])
    check_target(config.target, arch)
    check_transforms(config)
    require(
        shards.num_samples is not None or config.data.samples_per_epoch is not None,
        f"data.train {config.data.train!r} has no sample counts (an _info.json, info.json, sizes.json or "
        "img2dataset's *_stats.json): set data.samples_per_epoch",
    )
    return arch, shards


def check_target(target: Any, arch: MaeArch) -> None:
    """What relates the target keys to each other and to the model (the teacher is loaded later,
    by the pretraining task, before any work)."""
    kind = TARGETS.get(target.kind)
    require(
        not kind.needs_teacher or bool(target.teacher),
        f"target.kind={target.kind} needs target.teacher: a mim run or export, an official MAE .pth or timm weights",
    )
    require(
        not target.teacher or kind.needs_teacher or target.global_weight > 0,
        f"target.teacher is set but nothing uses it: target.kind is {target.kind!r} and "
        "target.global_weight is 0",
    )
    kind.check(target, arch)
    require(
        target.ema_decay <= target.ema_end_decay,
        f"target.ema_decay {target.ema_decay} must be at most target.ema_end_decay {target.ema_end_decay}",
    )


def check_monitor(monitor: MonitorConfig, data: DataConfig) -> KnnSplits | None:
    """The kNN monitor's splits (None: the monitor is off), opened and counted before any work."""
    if not monitor.bank and not monitor.val:
        return None
    require(
        bool(monitor.bank) and bool(monitor.val),
        f"the kNN monitor needs both monitor.bank and monitor.val (labelled shards), got "
        f"bank={monitor.bank!r} val={monitor.val!r}; leave both empty to turn it off",
    )
    bank = _open_split("monitor.bank", monitor.bank, read_policy(data))
    val = _open_split("monitor.val", monitor.val, read_policy(data))
    for key, split in (("bank", bank), ("val", val)):
        require(
            bool(split.classes),
            f"monitor.{key} {getattr(monitor, key)}: its _info.json names no classes; "
            "the kNN monitor needs labelled shards",
        )
    return KnnSplits(
        bank,
        val,
        len(bank.classes),
        spread_subset(bank.lengths, monitor.bank_samples),
        spread_subset(val.lengths, monitor.val_samples),
    )


@dataclass
class ClassifyInputs:
    weights: Weights | None  # None: a randomly initialised encoder
    arch: ViTArch
    shards: ShardSet
    splits: EvaluationSplits  # the choice on a held-out share of data.train, data.val reported
    num_classes: int


def _classifier_arch(config: ClassifyConfig, weights: Weights | None) -> ViTArch:
    if weights is not None:
        arch = dict(weights.arch)
    else:
        require(
            bool(config.model.name),
            "init.from=none trains from scratch: set model.name to a registered "
            "variant (e.g. mae_vit_base_patch16) for the encoder's shape",
        )
        try:
            arch = {k: v for k, v in model_args(config.model.name).items() if k in ARCH_KEYS}
        except ValueError as error:
            raise ConfigError(f"model.name: {error}") from None
    arch.update({k: getattr(config.model, k) for k in ARCH_KEYS if getattr(config.model, k) is not None})
    require(
        arch["img_size"] % arch["patch_size"] == 0,
        f"model.img_size {arch['img_size']} is not a multiple of the patch size {arch['patch_size']}",
    )
    require(
        arch["embed_dim"] % arch["num_heads"] == 0,
        f"embed_dim {arch['embed_dim']} is not divisible by num_heads {arch['num_heads']}",
    )
    return arch


def _open_split(key: str, spec: str, read: ReadPolicy) -> ShardSet:
    try:
        return with_lengths(open_shards(spec, read))
    except (FileNotFoundError, ValueError, ShardUnreadable) as error:
        raise ConfigError(f"{key}: {error}") from None


def check_classify(config: ClassifyConfig) -> ClassifyInputs:
    """Validates a linprobe/finetune config before any work; loads the backbone's weights."""
    require(
        bool(config.init.from_),
        "init.from is not set: a mim run dir or checkpoint, an official MAE .pth, "
        "a timm weights file, a mim export, or none (train from scratch)",
    )
    weights = None if config.init.from_ == "none" else load_weights(config.init.from_)
    arch = _classifier_arch(config, weights)
    check_data(config.data)
    check_optim(config.optim, config.schedule)
    require(
        config.optim.optimizer != "lars" or config.deepspeed.zero_stage == 0,
        "optim.optimizer=lars needs deepspeed.zero_stage=0 (LARS's per-layer trust ratio needs whole tensors)",
    )
    check_transforms(config)
    check_run(config.run)
    check_trackers(config.log)
    shards = _open_split("data.train", config.data.train, read_policy(config.data))
    val_shards = _open_split("data.val", config.data.val, read_policy(config.data))
    check_pixels(config.data, shards, arch["in_chans"])
    randaug = getattr(config.data, "randaug", "")  # finetune's
    require(
        not randaug or arch["in_chans"] in (1, 3),
        f"data.randaug={randaug!r} works on grey or RGB images; this model takes "
        f"{arch['in_chans']} bands: set data.randaug=''",
    )
    num_classes = config.model.num_classes or len(shards.classes)
    require(
        num_classes > 0,
        f"data.train {config.data.train} names no classes in _info.json: set model.num_classes",
    )
    splits = EvaluationSplits(val_shards, val_shards, None, "data.val itself (optimistic: eval.holdout=0)")
    if config.eval.holdout > 0:
        shards = replace(shards, held_out=Holdout(config.eval.holdout, config.run.seed))
        held = shards.held_out_indices()
        require(
            0 < len(held) < shards.num_samples,
            f"eval.holdout={config.eval.holdout} of data.train's {shards.num_samples} samples holds out "
            f"{len(held)}: choose a share that leaves samples on both sides, or 0 to choose on data.val",
        )
        name = f"the held-out {config.eval.holdout:.0%} of data.train ({len(held)} samples)"
        splits = EvaluationSplits(val_shards, replace(shards, held_out=None), held, name)
    return ClassifyInputs(weights, arch, shards, splits, num_classes)


@dataclass
class SegmentInputs(ClassifyInputs):
    ignore_index: int = DEFAULT_IGNORE_INDEX
    eval_size: int = 0  # the short side images are evaluated at


def check_segment(config: Any) -> SegmentInputs:
    """Validates a segprobe config before any work: what check_classify checks, and the
    segmentation keys against the shards and the backbone."""
    inputs = check_classify(config)
    seg = config.seg
    for key, split in (("data.train", inputs.shards), ("data.val", inputs.splits.test)):
        require(split.num_samples, f"{key} {getattr(config.data, key.split('.')[1])} holds no samples")
    require(
        seg.blocks <= inputs.arch["depth"],
        f"seg.blocks must be at most the encoder's depth {inputs.arch['depth']}, got {seg.blocks}",
    )
    require(
        len(seg.scale) == 2 and seg.scale[0] <= seg.scale[1],
        f"seg.scale must be [low, high] with low <= high, got {seg.scale}",
    )
    ignore = seg.ignore_index
    if ignore is None:
        ignore = (
            inputs.shards.ignore_index if inputs.shards.ignore_index is not None else DEFAULT_IGNORE_INDEX
        )
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(ClassifyInputs)}
    return SegmentInputs(**fields, ignore_index=ignore, eval_size=seg.eval_size or inputs.arch["img_size"])


def check_transforms(config: Any) -> None:
    """Every name in model.transforms is registered or imports (before any work)."""
    for name in getattr(config.model, "transforms", []):
        TRANSFORMS.get(name)
