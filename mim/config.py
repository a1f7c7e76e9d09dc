"""One typed config tree per stage: dataclass sections, YAML files with a `base:` chain,
dotted `key=value` overrides, validation before any work, the resolved tree written to disk.

Every key is declared once, below, with `key(...)`: type, default, a one-line description, the
values it allows, the stages that read it. The checks of single values, `mim <stage>
--help-config` and docs/config.md all come from those declarations; checks that relate several
keys (or need the data) live in mim.recipe.

A YAML file may name `base: other.yaml` (relative to itself); it is loaded first and the
file's own keys are merged over it, so a recipe says only what differs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mim.errors import UserInputError
from mim.files import atomic_write_text
from mim.resources import recipes, shipped

DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp;bmp;gif;tif;tiff;ppm"  # data.image_key (mim.data.members)
DEFAULT_LABEL_KEY = "cls"  # data.label_key: what `mim shards` writes


class ConfigError(UserInputError):
    """A user's config is wrong: the message names the key, the value and what was expected."""


# ----------------------------------------------------------------------------- declaring keys

PRETRAIN, LINPROBE, FINETUNE = "pretrain", "linprobe", "finetune"
STAGES = (PRETRAIN, LINPROBE, FINETUNE)
CLASSIFY = (LINPROBE, FINETUNE)


@dataclass(frozen=True)
class Declared:
    """What a key is, beside its type and default: one line for users, the values it allows,
    the stages that read it and the defaults that differ by stage."""

    doc: str
    choices: tuple[Any, ...] | None = None
    bounds: str | None = None  # ">= 1", "> 0", "[0, 1)", ...: each number of the value must lie there
    stages: tuple[str, ...] | None = None  # None: every stage whose schema has the key
    per_stage: dict[str, Any] | None = None
    spellings: tuple[tuple[Any, Any], ...] = ()  # (as users write it, the value it means)

    def stage_default(self, stage: str, default: Any) -> Any:
        return (self.per_stage or {}).get(stage, default)


def key(
    default: Any,
    doc: str,
    *,
    choices: tuple[Any, ...] | None = None,
    bounds: str | None = None,
    stages: tuple[str, ...] | None = None,
    per_stage: dict[str, Any] | None = None,
    yaml_name: str | None = None,
    spellings: tuple[tuple[Any, Any], ...] = (),
) -> Any:
    """A config key: its default, a one-line description and what it allows, in one place; the
    checks in `build` and the pages of `--help-config` and docs/config.md come from here."""
    if bounds is not None:
        _bounds_test(bounds)  # a malformed declaration fails at import, not on a user's value
    metadata: dict[str, Any] = {"declared": Declared(doc, choices, bounds, stages, per_stage, spellings)}
    if yaml_name:
        metadata["yaml"] = yaml_name
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(schema: type, doc: str, *, stages: tuple[str, ...] | None = None) -> Any:
    return field(default_factory=schema, metadata={"declared": Declared(doc, stages=stages)})


_INTERVAL = re.compile(r"^([\[(])\s*(\S+),\s*(\S+)\s*([\])])$")
_HALF_LINE = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_COMPARE = {
    ">=": lambda v, b: v >= b,
    ">": lambda v, b: v > b,
    "<=": lambda v, b: v <= b,
    "<": lambda v, b: v < b,
}


def _bounds_test(bounds: str) -> typing.Callable[[float], bool]:
    if match := _HALF_LINE.match(bounds):
        op, limit = match.group(1), float(match.group(2))
        return lambda value: _COMPARE[op](value, limit)
    if match := _INTERVAL.match(bounds):
        opening, low, high, closing = match.groups()
        low_op, high_op = (">=" if opening == "[" else ">"), ("<=" if closing == "]" else "<")
        low_value, high_value = float(low), float(high)
        return lambda value: _COMPARE[low_op](value, low_value) and _COMPARE[high_op](value, high_value)
    raise ValueError(f"bounds {bounds!r} is neither 'OP NUMBER' nor an interval like '[0, 1)'")


def check_declared(value: Any, declared: Declared, where: str) -> None:
    """The checks a key's declaration implies; None (where allowed) passes."""
    if value is None:
        return
    if declared.choices is not None and value not in declared.choices:
        allowed = ", ".join(shown(c) for c in declared.choices)
        raise ConfigError(f"config key {where!r} must be one of {allowed}, got {shown(value)}")
    if declared.bounds is not None:
        inside = _bounds_test(declared.bounds)
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and not inside(number):
                raise ConfigError(f"config key {where!r} must be {declared.bounds}, got {shown(value)}")


def shown(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- sections


@dataclass
class EncoderGeometry:
    img_size: int | None = key(
        None, "input size in pixels; null: the variant's (or the backbone's)", bounds=">= 1"
    )
    patch_size: int | None = key(
        None, "patch side in pixels; null: the variant's (or the backbone's)", bounds=">= 1"
    )
    in_chans: int | None = key(
        None, "image channels, 1 (grey) or 3 (RGB); null: the variant's", choices=(1, 3)
    )
    embed_dim: int | None = key(None, "encoder width; null: the variant's (or the backbone's)", bounds=">= 4")
    depth: int | None = key(None, "encoder blocks; null: the variant's (or the backbone's)", bounds=">= 1")
    num_heads: int | None = key(None, "encoder attention heads; null: the variant's", bounds=">= 1")
    mlp_ratio: float | None = key(None, "MLP hidden width / embed_dim; null: the variant's", bounds="> 0")
    grad_checkpointing: int = key(
        0,
        "activation checkpointing: recompute every k-th block in backward (1 or true: every block, "
        "of the encoder and the decoder); 0 or false: off",
        bounds=">= 0",
        stages=(PRETRAIN, FINETUNE),
        spellings=((True, 1), (False, 0)),  # timm's and HF's set_grad_checkpointing(True)
    )


@dataclass
class ModelConfig(EncoderGeometry):
    name: str = key("mae_vit_base_patch16", "a registered MAE variant (mim.models.registry)")
    decoder_embed_dim: int | None = key(None, "decoder width; null: the variant's (512)", bounds=">= 4")
    decoder_depth: int | None = key(None, "decoder blocks; null: the variant's (8)", bounds=">= 1")
    decoder_num_heads: int | None = key(None, "decoder attention heads; null: the variant's", bounds=">= 1")
    norm_pix_loss: bool = key(True, "predict each patch's pixels normalised by its own mean and std")
    mask_ratio: float = key(0.75, "fraction of patches hidden from the encoder", bounds="(0, 1)")


@dataclass
class DataConfig:
    train: str = key("", "training shards: a directory, an _info.json, a brace pattern, http(s):// or pipe:")
    val: str = key(
        "",
        "labelled shards the result is reported on (the test split), given as data.train is",
        stages=CLASSIFY,
    )
    batch_size: int = key(
        64,
        "samples per process (per GPU) per micro-step",
        bounds=">= 1",
        per_stage={LINPROBE: 512, FINETUNE: 128},
    )
    num_workers: int = key(10, "loader worker processes per training process", bounds=">= 0")
    samples_per_epoch: int | None = key(
        None, "samples an epoch counts for the schedule; null: the training split's count", bounds=">= 1"
    )
    shards_per_chunk: int = key(2, "shards one worker reads and shuffles together", bounds=">= 1")
    shuffle_buffer: int = key(1000, "samples a worker holds to shuffle them (its memory)", bounds=">= 1")
    read_retries: int = key(4, "further tries of a remote shard after a transient failure", bounds=">= 0")
    retry_wait: float = key(1.0, "seconds before the first retry, doubled for each next", bounds=">= 0")
    crop_scale: list[float] = key(
        [0.2, 1.0],
        "RandomResizedCrop area range [low, high] of the training view",
        bounds="(0, 1]",
        per_stage={LINPROBE: [0.08, 1.0], FINETUNE: [0.08, 1.0]},
    )
    hflip: bool = key(True, "random horizontal flips of the training view")
    mean: list[float] = key([0.485, 0.456, 0.406], "per-channel mean for normalisation (1 or 3 values)")
    std: list[float] = key(
        [0.229, 0.224, 0.225], "per-channel std for normalisation (1 or 3 values)", bounds="> 0"
    )
    max_bad_fraction: float = key(
        0.01, "stop when more than this fraction of the samples read is unreadable", bounds="[0, 1)"
    )
    reduced_decode: bool = key(True, "decode JPEGs at 1/2, 1/4 or 1/8 scale where the crop stays sharp")
    image_key: str = key(
        DEFAULT_IMAGE_KEY, "the sample's image: the first of these members present (;-separated)"
    )
    label_key: str = key(
        DEFAULT_LABEL_KEY,
        "the label (classification, kNN monitor): a member (cls) or json:FIELD of the .json",
    )


@dataclass
class OptimConfig:
    blr: float = key(
        1.5e-4,
        "base lr: lr = blr x effective batch / 256 (linprobe: probe.blrs)",
        bounds="> 0",
        stages=(PRETRAIN, FINETUNE),
        per_stage={FINETUNE: 5e-4},
    )
    lr: float | None = key(
        None, "absolute lr; overrides blr when set", bounds="> 0", stages=(PRETRAIN, FINETUNE)
    )
    min_lr: float = key(
        0.0, "lr at the end of the cosine schedule", bounds=">= 0", per_stage={FINETUNE: 1e-6}
    )
    weight_decay: float = key(
        0.05, "decoupled weight decay (not on biases and norms)", bounds=">= 0", per_stage={LINPROBE: 0.0}
    )
    betas: list[float] = key(
        [0.9, 0.95], "Adam betas [beta1, beta2]", bounds="[0, 1)", per_stage={FINETUNE: [0.9, 0.999]}
    )
    grad_clip: float | None = key(
        None, "clip the global gradient norm to this; null: no clipping", bounds="> 0"
    )
    accum_steps: int = key(1, "micro-steps per optimizer step (gradient accumulation)", bounds=">= 1")


@dataclass
class ClassifyOptimConfig(OptimConfig):
    optimizer: str = key(
        "adamw",
        "adamw, or lars (MAE's linear probe)",
        choices=("adamw", "lars"),
        per_stage={LINPROBE: "lars"},
    )
    layer_decay: float | None = key(
        0.65,
        "lr x layer_decay ** (depth + 1 - layer); null: one lr for all layers",
        bounds="(0, 1]",
        stages=(FINETUNE,),
    )


@dataclass
class ScheduleConfig:
    epochs: float = key(
        800,
        "length of the run in epochs of data.samples_per_epoch",
        bounds="> 0",
        per_stage={LINPROBE: 90, FINETUNE: 100},
    )
    warmup_epochs: float = key(
        40, "linear lr warm-up, then cosine decay", bounds=">= 0", per_stage={LINPROBE: 10, FINETUNE: 5}
    )


@dataclass
class DeepSpeedConfig:
    zero_stage: int | str = key(
        "auto",
        "ZeRO stage (3: the weights partitioned too); auto: the lowest whose model states fit half the device memory",
        choices=(0, 1, 2, 3, "auto"),
        per_stage={LINPROBE: 0},
    )
    precision: str = key(
        "auto",
        "auto: bf16 (autocast, fp32 weights) on CUDA, fp32 elsewhere",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    compile: bool | str = key(
        "auto", "torch.compile the model; auto: on CUDA only", choices=(True, False, "auto")
    )


@dataclass
class RunConfig:
    dir: str = key("", "the run directory: checkpoints, logs, TensorBoard events (required)")
    seed: int = key(0, "seed of the model's init, the masks and the data order")
    checkpoint_every: int = key(
        1000, "steps between checkpoints (and at the end and on a stop)", bounds=">= 1"
    )
    keep_last: int = key(3, "checkpoints kept; older ones are deleted", bounds=">= 1")
    stop_after: int | None = key(
        None, "stop with a checkpoint after this step; the schedule is unchanged", bounds=">= 1"
    )
    stop_check_every: int = key(10, "steps between the ranks' agreement on a stop signal", bounds=">= 1")


@dataclass
class LogConfig:
    every: int = key(50, "steps between console and TensorBoard lines (host syncs only there)", bounds=">= 1")
    tensorboard: bool = key(True, "write TensorBoard event files under run.dir/tb")
    recon_every: int = key(
        5000, "steps between reconstruction grids in TensorBoard; 0: never", bounds=">= 0", stages=(PRETRAIN,)
    )


@dataclass
class MonitorConfig:
    bank: str = key("", "labelled shards whose features are the kNN neighbours; empty: monitor off")
    val: str = key("", "labelled shards that the kNN monitor classifies; empty: monitor off")
    bank_samples: int | None = key(None, "bank size, spread over its shards; null: all", bounds=">= 1")
    val_samples: int | None = key(None, "val size, spread over its shards; null: all", bounds=">= 1")
    every: int = key(1000, "steps between evaluations (also at step 0 and at the last step)", bounds=">= 1")
    k: int = key(20, "neighbours that vote", bounds=">= 1")
    temperature: float = key(0.07, "softmax temperature of the neighbours' cosine similarities", bounds="> 0")
    global_pool: str = key(
        "avg", "the feature: avg (patch tokens' mean) or token (cls token)", choices=("avg", "token")
    )
    batch_size: int = key(256, "images per feature-extraction batch", bounds=">= 1")
    num_workers: int = key(2, "loader workers of the monitor", bounds=">= 0")
    crop_fraction: float = key(0.875, "resize to img_size / crop_fraction, then centre crop", bounds="(0, 1]")


@dataclass
class TargetConfig:
    kind: str = key(
        "pixels",
        "what the decoder predicts at masked patches: pixels (MAE), hog (MaskFeat), teacher (a frozen "
        "backbone's tokens), ema (data2vec: an EMA of the encoder)",
        choices=("pixels", "hog", "teacher", "ema"),
    )
    teacher: str = key("", "the frozen teacher (kind=teacher, or the global objective): what init.from takes")
    loss: str = key(
        "auto", "auto: cosine for teacher, mse otherwise", choices=("auto", "mse", "cosine", "smooth_l1")
    )
    hog_bins: int = key(9, "HOG orientation bins over [0, 180) degrees", bounds=">= 2")
    hog_cell: int | None = key(
        None, "HOG cell side in pixels, dividing the patch; null: 8 if it can", bounds=">= 1"
    )
    ema_decay: float = key(0.9998, "the EMA teacher's momentum at step 0", bounds="(0, 1)")
    ema_end_decay: float = key(0.99999, "its momentum at the last step (linear in between)", bounds="(0, 1]")
    ema_top_k: int = key(
        8, "EMA targets: the average of the last k blocks (at most the depth)", bounds=">= 1"
    )
    global_weight: float = key(
        0.0, "weight of the cls token predicting the teacher's (EMA or target.teacher); 0: off", bounds=">= 0"
    )


@dataclass
class InitConfig:
    from_: str = key(
        "",
        "weights to start from: a mim run or checkpoint, an official MAE .pth, timm weights, a mim export "
        "(linprobe/finetune: required; none trains from scratch)",
        yaml_name="from",
    )


@dataclass
class StageConfig:
    """The sections every training stage has; a stage's schema narrows `model` and `optim`."""

    STAGE: ClassVar[str] = ""
    model: EncoderGeometry = section(EncoderGeometry, "the model's shape")
    init: InitConfig = section(InitConfig, "weights to start from")
    data: DataConfig = section(DataConfig, "shards, loader and training view")
    optim: OptimConfig = section(OptimConfig, "optimizer and lr")
    schedule: ScheduleConfig = section(ScheduleConfig, "warm-up and cosine lr schedule")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "ZeRO, precision, compilation")
    run: RunConfig = section(RunConfig, "run directory, checkpoints, stopping")
    log: LogConfig = section(LogConfig, "console and TensorBoard")


@dataclass
class PretrainConfig(StageConfig):
    STAGE: ClassVar[str] = PRETRAIN
    model: ModelConfig = section(ModelConfig, "the MAE: encoder and decoder shape, masking")
    optim: OptimConfig = section(OptimConfig, "AdamW and its lr")
    target: TargetConfig = section(TargetConfig, "what the decoder (and the cls token) learn to predict")
    monitor: MonitorConfig = section(MonitorConfig, "online kNN accuracy of the encoder during pretraining")


# ----------------------------------------------------------------------------- evaluation stages


@dataclass
class ClassifierModelConfig(EncoderGeometry):
    name: str = key("", "init.from=none: the registered MAE variant whose encoder is trained from scratch")
    global_pool: str = key(
        "avg",
        "the feature: token (cls token) or avg (patch tokens' mean)",
        choices=("token", "avg"),
        per_stage={LINPROBE: "token"},
    )
    drop_path: float = key(0.1, "stochastic depth rate of the encoder", bounds="[0, 1)", stages=(FINETUNE,))
    num_classes: int | None = key(
        None, "classes of the head; null: those in the training shards' _info.json", bounds=">= 1"
    )


@dataclass
class ProbeConfig:
    blrs: list[float] = key([0.1], "one head per base lr, trained together; each reported", bounds="> 0")
    cache_features: bool = key(
        False, "run the frozen backbone once on centre crops and train the heads on cached features"
    )
    blocks: int = key(1, "the feature: the last n blocks' pooled outputs side by side", bounds=">= 1")


@dataclass
class AugmentConfig:
    randaug: str = key("rand-m9-mstd0.5-inc1", "a timm RandAugment string; empty: none", stages=(FINETUNE,))
    mixup: float = key(0.8, "mixup alpha; 0: off", bounds=">= 0", stages=(FINETUNE,))
    cutmix: float = key(1.0, "cutmix alpha; 0: off", bounds=">= 0", stages=(FINETUNE,))
    label_smoothing: float = key(
        0.0, "label smoothing of the cross-entropy", bounds="[0, 1)", per_stage={FINETUNE: 0.1}
    )
    reprob: float = key(0.25, "random erasing probability", bounds="[0, 1]", stages=(FINETUNE,))


@dataclass
class EvalConfig:
    every_epochs: float = key(
        1.0,
        "epochs between evaluations (on the held-out share, see eval.holdout; and at the end)",
        bounds="> 0",
        per_stage={LINPROBE: 5.0},
    )
    crop_fraction: float = key(0.875, "resize to img_size / crop_fraction, then centre crop", bounds="(0, 1]")
    holdout: float = key(
        0.02,
        "share of data.train held out (seeded) to choose the head and epoch on; data.val is then "
        "evaluated only for the choice. 0: choose on data.val itself (its figure is then optimistic)",
        bounds="[0, 0.5]",
    )


@dataclass
class ClassifyConfig(StageConfig):
    """Linear probing and fine-tuning share one schema; the stage decides which keys it reads."""

    model: ClassifierModelConfig = section(ClassifierModelConfig, "the backbone's shape and the head")
    optim: ClassifyOptimConfig = section(ClassifyOptimConfig, "optimizer and lr")
    probe: ProbeConfig = section(ProbeConfig, "the linear heads", stages=(LINPROBE,))
    augment: AugmentConfig = section(AugmentConfig, "training augmentation")
    eval: EvalConfig = section(EvalConfig, "evaluation: the choice of head and epoch, and data.val")


@dataclass
class LinprobeConfig(ClassifyConfig):
    STAGE: ClassVar[str] = LINPROBE


@dataclass
class FinetuneConfig(ClassifyConfig):
    STAGE: ClassVar[str] = FINETUNE


SCHEMAS: dict[str, type] = {PRETRAIN: PretrainConfig, LINPROBE: LinprobeConfig, FINETUNE: FinetuneConfig}


# ----------------------------------------------------------------------------- loading


def load_yaml_chain(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML file and the chain of `base:` files under it, merged base-first."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    if path in seen:
        raise ConfigError(f"config file {path} names itself as a base (cycle: {[str(p) for p in seen]})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, found {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return merge_trees(load_yaml_chain(path.parent / base, seen + (path,)), tree)


def merge_trees(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` sets tree[a][b] = yaml value of c."""
    tree = merge_trees({}, tree)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def build(schema: type, tree: dict[str, Any], where: str = "", stage: str | None = None) -> Any:
    """Builds dataclass `schema` from a nested dict, checking every key against its declaration:
    known, read by this stage (the root schema's STAGE), of its type, within what it allows.
    Keys not given take the stage's default."""
    stage = getattr(schema, "STAGE", "") if stage is None else stage
    if not isinstance(tree, dict):
        raise ConfigError(f"{where or 'config'} must be a section (mapping), got {tree!r}")
    fields = {_yaml_name(f): f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = [k for k, f in fields.items() if _read_by(f, stage)]
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean {(where + '.' if where else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config key {dotted!r}{suggestion} (known: {', '.join(known)})")
        target = fields[key]
        annotation = hints[target.name]
        if not _read_by(target, stage):
            users = ", ".join(f"mim {s}" for s in _declared(target).stages)
            what = "section" if dataclasses.is_dataclass(annotation) else "key"
            raise ConfigError(
                f"config {what} {dotted!r} is not read by mim {stage} (only by {users}): remove it"
            )
        if dataclasses.is_dataclass(annotation):
            kwargs[target.name] = build(annotation, value, dotted, stage)
        else:
            value = _spelled(value, _declared(target).spellings)
            kwargs[target.name] = _check_type(value, annotation, dotted)
            check_declared(kwargs[target.name], _declared(target), dotted)
    for target in dataclasses.fields(schema):
        if target.name in kwargs:
            continue
        annotation = hints[target.name]
        if dataclasses.is_dataclass(annotation):
            kwargs[target.name] = build(annotation, {}, f"{where}.{_yaml_name(target)}".lstrip("."), stage)
        elif stage in (_declared(target).per_stage or {}):
            kwargs[target.name] = copy.deepcopy(_declared(target).per_stage[stage])
    return schema(**kwargs)


def _spelled(value: Any, spellings: tuple[tuple[Any, Any], ...]) -> Any:
    """The value a user's spelling means (true for 1, say); compared by type too, so 1 is not True."""
    for written, meant in spellings:
        if type(value) is type(written) and value == written:
            return meant
    return value


def _declared(f: dataclasses.Field) -> Declared:
    return f.metadata.get("declared") or Declared("")


def _read_by(f: dataclasses.Field, stage: str) -> bool:
    stages = _declared(f).stages
    return stages is None or stage in stages


@dataclass(frozen=True)
class KeyInfo:
    name: str  # dotted, as YAML and overrides spell it
    type: str
    default: Any
    declared: Declared


def stage_keys(stage: str) -> list[KeyInfo]:
    """Every key that `mim <stage>` reads, in declaration order, with that stage's default."""
    schema = SCHEMAS[stage]
    return list(_walk(schema, stage, ""))


def stage_sections(stage: str) -> list[tuple[str, str]]:
    """(section name, description) of the sections that `mim <stage>` reads."""
    return [
        (_yaml_name(f), _declared(f).doc) for f in dataclasses.fields(SCHEMAS[stage]) if _read_by(f, stage)
    ]


def _walk(schema: type, stage: str, where: str):
    hints = typing.get_type_hints(schema)
    defaults = schema()
    for f in dataclasses.fields(schema):
        if not _read_by(f, stage):
            continue
        dotted = f"{where}.{_yaml_name(f)}" if where else _yaml_name(f)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            yield from _walk(annotation, stage, dotted)
        else:
            declared = _declared(f)
            default = declared.stage_default(stage, getattr(defaults, f.name))
            yield KeyInfo(dotted, _type_name(annotation), default, declared)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        optional = type(None) in typing.get_args(annotation)
        return " | ".join(names) + (" | null" if optional else "")
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    return annotation.__name__


def _yaml_name(f: dataclasses.Field) -> str:
    return f.metadata.get("yaml", f.name)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        for option in options[:-1]:
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        return _check_type(value, options[-1], where)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config key {where!r} expects a list, got {value!r}")
        return [_check_type(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; users write it that way
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {where!r} expects true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"config key {where!r} expects an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"config key {where!r} expects {annotation.__name__}, got {value!r}")
    return value


def to_tree(config: Any, stage: str | None = None) -> dict[str, Any]:
    """The config as YAML would spell it: the keys its stage reads, nothing else."""
    stage = getattr(type(config), "STAGE", "") if stage is None else stage
    tree = {}
    for f in dataclasses.fields(config):
        if not _read_by(f, stage):
            continue
        value = getattr(config, f.name)
        tree[_yaml_name(f)] = to_tree(value, stage) if dataclasses.is_dataclass(value) else value
    return tree


def config_path(spec: str | Path) -> Path:
    """`--config`: a YAML file, else a recipe name (`pretrain/mae_vit_base_p16`, with or without
    `.yaml`, with or without a leading `configs/`, so the README's commands work from anywhere)."""
    path = Path(spec)
    if path.is_file() or path.is_dir():
        return path  # a directory: load_yaml_chain says what is wrong with it
    name = str(spec).removeprefix("configs/").removesuffix(".yaml")
    recipe = shipped("configs") / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    close = difflib.get_close_matches(name, recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `mim configs` lists the recipes"
    raise ConfigError(f"config file {spec} does not exist or is not a file, nor a recipe name{hint}")


def load_config(schema: type, path: str | Path | None, overrides: list[str]) -> Any:
    """`path`: a YAML file or a recipe name (`config_path`)."""
    tree = load_yaml_chain(config_path(path)) if path else {}
    return build(schema, apply_overrides(tree, overrides))


def write_config(config: Any, path: str | Path) -> None:
    """Writes the resolved config, atomically (a run dir never holds half a config)."""
    atomic_write_text(path, yaml.safe_dump(to_tree(config), sort_keys=False))


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
