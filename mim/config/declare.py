"""Declaring config keys: `key(...)` gives a key its type (the annotation), default, one-line
description, the values it allows and the stages that read it; the checks of single values,
`--help-config` and docs/config.md all come from those declarations (mim.config)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mim.errors import UserInputError

DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp;bmp;gif;tif;tiff;ppm;npy"  # data.image_key (mim.data.members)
DEFAULT_LABEL_KEY = "cls"  # data.label_key: what `mim shards` writes
DEFAULT_MASK_KEY = "seg.png;mask.png"  # data.mask_key: `mim shards` writes seg.png


class ConfigError(UserInputError):
    """A user's config is wrong: the message names the key, the value and what was expected."""


# ----------------------------------------------------------------------------- declaring keys

PRETRAIN, LINPROBE, FINETUNE, SEGPROBE = "pretrain", "linprobe", "finetune", "segprobe"
STAGES = (PRETRAIN, LINPROBE, FINETUNE, SEGPROBE)
CLASSIFY = (LINPROBE, FINETUNE)
EVALUATE = (LINPROBE, FINETUNE, SEGPROBE)  # the stages that evaluate a backbone on data.val


@dataclass(frozen=True)
class Declared:
    """What a key is, beside its type and default: one line for users, the values it allows,
    the stages that read it and the defaults that differ by stage."""

    doc: str
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
    metadata: dict[str, Any] = {"declared": Declared(doc, bounds, stages, per_stage, spellings)}
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
    if declared.bounds is not None:
        inside = _bounds_test(declared.bounds)
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and not inside(number):
                raise ConfigError(f"config key {where!r} must be {declared.bounds}, got {shown(value)}")


def shown(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
