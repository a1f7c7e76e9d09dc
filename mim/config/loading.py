"""Loading a config: YAML files with a `base:` chain, dotted `key=value` overrides, every key
checked against its declaration before any work, the resolved tree written to disk."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mim.config.declare import ConfigError, Declared, check_declared, shown
from mim.config.stages import SCHEMAS
from mim.files import atomic_write_text
from mim.resources import recipes, shipped

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
    choices: tuple[Any, ...] | None  # a Literal's values


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
            yield KeyInfo(dotted, _type_name(annotation), default, declared, choices_of(annotation))


def choices_of(annotation: Any) -> tuple[Any, ...] | None:
    """The values a `Literal` annotation allows (inside `| None` too); None: not a Literal."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if (found := choices_of(option)) is not None:
                return found
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(dict.fromkeys(type(a).__name__ for a in typing.get_args(annotation)))
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
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if not any(type(value) is type(choice) and value == choice for choice in allowed):
            shown_allowed = ", ".join(shown(c) for c in allowed)
            raise ConfigError(f"config key {where!r} must be one of {shown_allowed}, got {shown(value)}")
        return value
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


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config tree as its dotted keys (`optim.lr`) and their values."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


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
