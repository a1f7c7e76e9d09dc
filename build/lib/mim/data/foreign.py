"""Existing WebDataset shards as a source for `mim shards` (`--source wds:SHARDS`): shards other
tools wrote (img2dataset, timm / Hugging Face, open_clip pipelines) re-sharded into mim's layout,
with its `_info.json` (counts, classes).

Each sample becomes one Record whose image member is read in place, by its offset in the tar, when
its new shard is written: indexing reads the tar headers and the small label members only, so
memory holds a few hundred bytes a sample, whatever the images weigh. The shards must be local
files (a directory, an index, a brace pattern): random access is what lets mim shuffle samples
across the new shards."""

from __future__ import annotations

import functools
import logging
import tarfile
from collections.abc import Callable

from webdataset.tariterators import base_plus_ext

from mim.data.members import DEFAULT_IMAGE_KEY, DEFAULT_LABEL_KEY, check_keys, members, sample_label
from mim.data.reading import is_remote
from mim.data.shards import open_shards
from mim.data.sources import Record, Source
from mim.data.transforms import BadSample
from mim.errors import UserInputError

log = logging.getLogger(__name__)
LOGGED_SKIPS = 5  # samples skipped are named up to this many, then counted
LABEL_MEMBER_LIMIT = 1 << 20  # a cls or json member larger than this is not a label


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _image_loader(path: str, offset: int, size: int, extension: str) -> tuple[bytes, str]:
    return _read_at(path, offset, size), extension


def _samples_of(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> extension -> (offset, size) of the shard's regular files, grouped as webdataset
    groups them (the name up to the first dot of its last part is the key)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                split = base_plus_ext(info.name) if info.isfile() else None
                if split is None or split[0] is None:
                    continue
                key, extension = split
                samples.setdefault(key, {})[extension.lower()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as error:
        raise UserInputError(f"{path} is not a readable tar file ({error})") from None
    return samples


def webdataset_source(
    spec: str,
    image_key: str = DEFAULT_IMAGE_KEY,
    label_key: str = DEFAULT_LABEL_KEY,
    on_shard_indexed: Callable[[int], None] = lambda count: None,
) -> Source:
    """The samples of the local shards `spec` (as data.train takes them), each once, in shard
    order; a sample without an image among `image_key` is skipped (and counted); one without a
    label is written without one. Classes: the index's where it has them, else 0..max label."""
    check_keys(image_key, label_key)
    shards = open_shards(spec)
    remote = [url for url in shards.urls if is_remote(url)]
    if remote:
        raise UserInputError(
            f"wds:{spec}: mim shards re-shards local shards only (it reads each image in place), got "
            f"{remote[0]}; copy them first (e.g. curl -O), or train on them where they are "
            "(data.train takes http(s) and pipe: shards)"
        )
    label_member = "json" if label_key.startswith("json:") else label_key
    records, skipped, labels = [], 0, set()
    for path in shards.urls:
        for key, found in _samples_of(path).items():
            extension = next((e for e in map(str.strip, image_key.split(";")) if e in found), None)
            label = None
            try:
                if extension is None:
                    raise BadSample(
                        f"sample {key} in {path} has members {members(found)} and no image among "
                        f"{image_key!r}: set --image-key"
                    )
                if label_member in found and found[label_member][1] <= LABEL_MEMBER_LIMIT:
                    content = _read_at(path, *found[label_member])
                    label = sample_label({"__key__": key, "__url__": path, label_member: content}, label_key)
            except BadSample as error:
                skipped += 1
                if skipped <= LOGGED_SKIPS:
                    log.warning("skipping %s", error)
                continue
            if label is not None:
                labels.add(label)
            offset, size = found[extension]
            records.append(
                Record(
                    f"{path}:{key}", label, functools.partial(_image_loader, path, offset, size, extension)
                )
            )
        on_shard_indexed(1)
    if skipped:
        log.warning(
            "%d sample(s) of wds:%s skipped (no image, or a label that is not an integer)", skipped, spec
        )
    if not records:
        raise UserInputError(f"wds:{spec}: no sample has an image among {image_key!r} (set --image-key)")
    classes = shards.classes or ([str(i) for i in range(max(labels) + 1)] if labels else [])
    return Source(records, list(classes))
