"""One typed config tree per stage: dataclass sections, YAML files with a `base:` chain,
dotted `key=value` overrides, validation before any work, the resolved tree written to disk.

A YAML file may name `base: other.yaml` (relative to itself); it is loaded first and the
file's own keys are merged over it, so a recipe says only what differs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mim.errors import UserInputError
from mim.resources import recipes, shipped

DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp;bmp;gif;tif;tiff;ppm"  # data.image_key (mim.data.members)
DEFAULT_LABEL_KEY = "cls"  # data.label_key: what `mim shards` writes


class ConfigError(UserInputError):
    """A user's config is wrong: the message names the key, the value and what was expected."""


# ----------------------------------------------------------------------------- sections


@dataclass
class EncoderGeometry:
    # None keeps the value of the registered variant (pretraining) or of the backbone (evaluation).
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None


@dataclass
class ModelConfig(EncoderGeometry):
    name: str = "mae_vit_base_patch16"
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    norm_pix_loss: bool | None = None
    mask_ratio: float = 0.75


@dataclass
class DataConfig:
    train: str = ""  # a shard directory, an _info.json, a brace pattern; or http(s)/pipe: (see README)
    val: str = ""
    batch_size: int = 64  # per process (per GPU), per micro-step
    num_workers: int = 4
    samples_per_epoch: int | None = None  # None: the training split's sample count
    shards_per_chunk: int = 2  # shards read and shuffled together by one worker
    shuffle_buffer: int = 1000  # samples a worker holds to shuffle them (its memory, whatever the shard size)
    read_retries: int = 4  # further tries of a remote shard after a transient failure
    retry_wait: float = 1.0  # seconds before the first retry; doubled for each further one
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples is unreadable
    reduced_decode: bool = True  # JPEGs decode at 1/2, 1/4, 1/8 scale where the crop stays >= img_size
    image_key: str = DEFAULT_IMAGE_KEY  # the sample's image: the first member present of these (;-separated)
    label_key: str = DEFAULT_LABEL_KEY  # the label: a member (cls) or json:FIELD of the sample's .json


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float | None = None
    accum_steps: int = 1


@dataclass
class ScheduleConfig:
    epochs: float = 800
    warmup_epochs: float = 40


@dataclass
class DeepSpeedConfig:
    zero_stage: int | str = (
        "auto"  # 0 | 1 | 2 | auto: the lowest whose model states fit half the device memory
    )
    precision: str = "auto"  # auto: bf16 (autocast, fp32 weights) on CUDA, fp32 elsewhere
    compile: bool | str = "auto"  # torch.compile the model; auto: on CUDA (on the CPU it does not pay)


@dataclass
class RunConfig:
    dir: str = ""
    seed: int = 0
    checkpoint_every: int = 1000  # steps
    keep_last: int = 3
    stop_after: int | None = None  # stop (with a checkpoint) after this step; schedule unchanged
    stop_check_every: int = 10  # steps between the ranks' agreement on a stop signal
    on_nonfinite: str = "stop"  # stop | skip


@dataclass
class LogConfig:
    every: int = 50  # steps between console/TensorBoard lines (host syncs happen only here)
    tensorboard: bool = True
    recon_every: int = 1000  # steps between reconstruction grids in TensorBoard; 0: never


@dataclass
class MonitorConfig:
    # Online kNN accuracy of the encoder during pretraining; off while bank or val is empty.
    bank: str = ""  # labelled shards whose features are the neighbours (like data.train)
    val: str = ""  # labelled shards that are classified
    # Subsets: the first samples of every shard, in proportion to its size; None: the whole split
    bank_samples: int | None = None
    val_samples: int | None = None
    every: int = 1000  # steps between evaluations; also at step 0 and at the last step
    k: int = 20
    temperature: float = 0.07
    global_pool: str = "avg"  # the feature: avg (patch tokens' mean) | token (cls token)
    batch_size: int = 256
    num_workers: int = 2
    crop_fraction: float = 0.875  # resize to img_size / crop_fraction, then centre crop


@dataclass
class InitConfig:
    # Continue from an official MAE checkpoint, a timm ViT weights file, or a mim export.
    from_: str = field(default="", metadata={"yaml": "from"})


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ----------------------------------------------------------------------------- evaluation stages


@dataclass
class ClassifierModelConfig(EncoderGeometry):
    # The encoder's geometry comes from the backbone (init.from); these override it. With
    # init.from=none, `name` (a registered MAE variant) gives the encoder to train from scratch.
    name: str = ""
    global_pool: str = "token"  # token (cls token) | avg (average of patch tokens)
    drop_path: float = 0.0
    num_classes: int | None = None  # None: the number of classes in the training shards' _info.json


@dataclass
class ClassifyOptimConfig(OptimConfig):
    optimizer: str = "adamw"  # adamw | lars
    layer_decay: float | None = None  # fine-tuning: lr x layer_decay ** (depth + 1 - layer)


@dataclass
class ProbeConfig:
    blrs: list[float] = field(default_factory=lambda: [0.1])  # one head per base lr, trained together
    # Run the frozen backbone once (centre crops) and train the heads on the cached features:
    # many epochs for the price of one; gives up the protocol's RandomResizedCrop augmentation.
    cache_features: bool = False
    # The feature: the pooled output of the last block (MAE's protocol, 1), or of the last n blocks
    # side by side (DINO's protocol for small ViTs, n = 4); the heads are n times as wide.
    blocks: int = 1


@dataclass
class AugmentConfig:
    randaug: str = ""  # a timm RandAugment string, e.g. rand-m9-mstd0.5-inc1; "" = none
    mixup: float = 0.0  # alpha; 0 = off
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    reprob: float = 0.0  # random erasing probability


@dataclass
class EvalConfig:
    every_epochs: float = 1.0
    crop_fraction: float = 0.875  # resize to img_size / crop_fraction, then centre crop


@dataclass
class ClassifyConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: ClassifyOptimConfig = field(default_factory=ClassifyOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def build(schema: type, tree: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass `schema` from a nested dict, checking every key and type."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where or 'config'} must be a section (mapping), got {tree!r}")
    fields = {_yaml_name(f): f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f"; did you mean {(where + '.' if where else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config key {dotted!r}{suggestion} (known: {', '.join(fields)})")
        target = fields[key]
        annotation = hints[target.name]
        if dataclasses.is_dataclass(annotation):
            kwargs[target.name] = build(annotation, value, dotted)
        else:
            kwargs[target.name] = _check_type(value, annotation, dotted)
    return schema(**kwargs)


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


def to_tree(config: Any) -> dict[str, Any]:
    tree = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        tree[_yaml_name(f)] = to_tree(value) if dataclasses.is_dataclass(value) else value
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
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(to_tree(config), sort_keys=False))
    temporary.replace(path)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
