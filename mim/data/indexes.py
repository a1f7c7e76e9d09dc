"""Shard indexes that mim and other tools write, read into one form: shard names relative to the
index, their sample counts, and class names where the index has them.

- mim's `_info.json`: `shards` [{name, num_samples}] and `classes` (mim also writes timm's
  `splits` beside them);
- timm's / Hugging Face's `_info.json` or `info.json`: `splits: {SPLIT: {name, num_samples,
  filenames, shard_lengths}}`; a split is picked by name (`DIR::validation`), else the only one,
  else `train`;
- open_clip's `sizes.json`: {shard file name: sample count};
- img2dataset's `NNNNN_stats.json` beside each `NNNNN.tar`: its `successes` are the shard's samples.

An index names data, never commands: every name goes through `checked_name`, so a served or
edited index cannot make mim run a command (`pipe:`) or read outside the dataset.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass

from mim.errors import UserInputError

INDEX_FILES = ("_info.json", "info.json", "sizes.json")  # looked for in a shard directory, in order
SPLIT_SEPARATOR = "::"


class UnsafeEntry(ValueError):
    """A shard name in an index that would lead outside the index's own data."""


@dataclass(frozen=True)
class Index:
    names: list[str]  # relative to the index, checked
    lengths: list[int]
    classes: list[str]
    ignore_index: int | None = None  # segmentation shards (mim's _info.json)
    pixels: dict | None = None  # per-band stats of `mim shards --stats`: bands, mean, std (mim.data.pixels)


def checked_name(name: object) -> str:
    """A shard name from an index: a relative path (no scheme, no host, no `..`, not absolute), so
    an index only ever names data beside or below itself, never a command (`pipe:`) or a file
    elsewhere (`file:`, `/etc/...`, `../`)."""
    if not isinstance(name, str) or not name:
        raise UnsafeEntry(f"{name!r} is not a file name")
    decoded = urllib.parse.unquote(name).replace("\\", "/")
    parts = urllib.parse.urlsplit(decoded)
    if parts.scheme or parts.netloc or decoded.startswith("/"):
        raise UnsafeEntry(
            f"{name!r} is not a relative path (an index may not name URLs, commands or absolute paths)"
        )
    if ".." in decoded.split("/"):
        raise UnsafeEntry(f"{name!r} climbs out of the index's directory ('..')")
    if parts.query or parts.fragment:
        raise UnsafeEntry(f"{name!r} has a query or fragment")
    return name


def split_of(spec: str) -> tuple[str, str | None]:
    """`DIR::validation` -> (`DIR`, `validation`); a spec without a split -> (spec, None)."""
    if spec.startswith("pipe:") or SPLIT_SEPARATOR not in spec:
        return spec, None
    base, _, split = spec.rpartition(SPLIT_SEPARATOR)
    if not split or "/" in split:
        raise UserInputError(f"{spec!r}: expected SHARDS::SPLIT with a split name after '::'")
    return base, split


def parse_index(text: bytes, where: str, split: str | None = None) -> Index:
    """The shards of one index file, whichever of the formats above it is."""
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{where} is not a JSON shard index ({error})") from None
    try:
        if isinstance(info, dict) and "shards" in info and split is None:
            names = [shard["name"] for shard in info["shards"]]
            lengths = [int(shard["num_samples"]) for shard in info["shards"]]
        elif isinstance(info, dict) and "splits" in info:
            names, lengths = _timm_split(info["splits"], where, split)
        elif (
            isinstance(info, dict)
            and info
            and all(isinstance(v, int) for v in info.values())
            and split is None
        ):
            names, lengths = list(info), list(info.values())
        else:
            raise KeyError("shards" if split is None else "splits")
        ignore = info.get("ignore_index") if isinstance(info, dict) else None
        return Index(
            [_named(where, n) for n in names],
            lengths,
            [str(c) for c in info.get("classes", [])],
            None if ignore is None else int(ignore),
            _pixels(info.get("pixels") if isinstance(info, dict) else None, where),
        )
    except UserInputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserInputError(
            f"{where} is not a shard index mim reads ({error!r}): expected mim's or timm's _info.json "
            "(shards, or splits with filenames and shard_lengths), or open_clip's sizes.json"
            + (f" with a split {split!r}" if split else "")
        ) from None


def _pixels(pixels: object, where: str) -> dict | None:
    """The index's per-band stats, checked: as many means and stds as bands, the stds positive."""
    if pixels is None:
        return None
    try:
        bands, mean, std = (
            int(pixels["bands"]),
            [float(m) for m in pixels["mean"]],
            [float(s) for s in pixels["std"]],
        )
    except (KeyError, TypeError, ValueError):
        raise UserInputError(f"{where}: its pixels entry {pixels!r} is not {{bands, mean, std}}") from None
    if not (len(mean) == len(std) == bands >= 1) or min(std) <= 0:
        raise UserInputError(
            f"{where}: its pixels entry does not match its bands: {bands} band(s), {len(mean)} mean(s), "
            f"{len(std)} std(s) (each above 0); rerun `mim shards --stats`"
        )
    return {"bands": bands, "mean": mean, "std": std}


def _timm_split(splits: dict, where: str, split: str | None) -> tuple[list[str], list[int]]:
    if split is None:
        split = next(iter(splits)) if len(splits) == 1 else "train"
    if split not in splits:
        raise UserInputError(
            f"{where} has no split {split!r}; its splits: {sorted(splits)} (pick one: SHARDS::SPLIT)"
        )
    entry = splits[split]
    names, lengths = list(entry["filenames"]), [int(n) for n in entry["shard_lengths"]]
    if len(names) != len(lengths):
        raise UserInputError(
            f"{where}: split {split!r} lists {len(names)} filenames but {len(lengths)} shard_lengths"
        )
    return names, lengths


def _named(where: str, name: object) -> str:
    try:
        return checked_name(name)
    except UnsafeEntry as error:
        raise UserInputError(
            f"{where}: shard entry {error}; an index names shards relative to itself "
            "(e.g. train-000000.tar); write a pipe: or URL pattern in data.* instead"
        ) from None


def stats_name(url: str) -> str | None:
    """img2dataset's per-shard stats beside a shard: `.../00012.tar` -> `.../00012_stats.json`."""
    return url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None


def stats_count(text: bytes, where: str) -> int:
    try:
        return int(json.loads(text)["successes"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserInputError(
            f"{where} is not an img2dataset stats file with 'successes' ({error!r})"
        ) from None
