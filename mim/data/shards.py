"""WebDataset shards: writing them (`mim shards`) and finding them again (`ShardSet`).

Layout: NAME-000000.tar ... plus _info.json (split name, shard list with sample counts, classes,
and a `splits` entry in the form timm's WebDataset reader reads). Each sample is
`<key>.<ext>` (original encoded bytes) and `<key>.cls` (the integer label, when known); a
segmentation sample has `<key>.seg.png` (its mask) instead, and _info.json its `ignore_index`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
import tarfile
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image

from mim.data.holdout import Holdout
from mim.data.indexes import INDEX_FILES, parse_index, split_of, stats_count, stats_name
from mim.data.reading import DEFAULT_READ, ReadPolicy, ShardUnreadable, is_remote, read_bytes, stream_samples
from mim.data.segmentation import MASK_MEMBER, BadMask, check_mask, decode_mask
from mim.data.sources import Record, Source
from mim.data.transforms import BadSample, open_image
from mim.errors import UserInputError
from mim.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]  # local paths, http(s) URLs or `pipe:` commands
    lengths: list[int] | None  # samples per shard, when known
    classes: list[str]
    read: ReadPolicy = DEFAULT_READ  # retries for remote shards
    held_out: Holdout | None = None  # samples set aside (eval.holdout): every stream skips them
    ignore_index: int | None = None  # segmentation shards: the mask value no class counts for
    pixels: dict | None = None  # per-band stats from the index (`mim shards --stats`; mim.data.indexes)

    @property
    def num_samples(self) -> int | None:
        return sum(self.lengths) if self.lengths is not None else None

    def held_out_indices(self) -> tuple[int, ...]:
        """The global indices of the samples set aside, sorted (none without a holdout)."""
        if self.held_out is None or self.lengths is None:
            return ()
        return self.held_out.indices(self.urls, self.lengths)

    @property
    def num_usable(self) -> int | None:
        """The samples that streams over this set read: all, less those held out."""
        total = self.num_samples
        return None if total is None else total - len(self.held_out_indices())


# ----------------------------------------------------------------------------- writing


def _shard_plan(
    num_records: int, shard_size: int, seed: int | None, limit: int | None = None
) -> list[list[int]]:
    order = list(range(num_records))
    if seed is not None:  # mixed classes in every shard; the same files in the same shards each time
        random.Random(seed).shuffle(order)
    order = order[:limit]  # a seeded random subset, or the first `limit` records unshuffled
    return [order[start : start + shard_size] for start in range(0, len(order), shard_size)]


def downscaled(payload: bytes, extension: str, max_size: int, name: str = "") -> tuple[bytes, str]:
    """The image with its shorter side brought down to `max_size` (bicubic, antialiased; JPEGs
    decode at a reduced DCT scale first), re-encoded as JPEG quality 90 (PNG for lossless
    sources); images already small enough, and undecodable ones, keep their original bytes."""
    try:
        image = Image.open(io.BytesIO(payload))
        width, height = image.size
        if min(width, height) <= max_size:
            return payload, extension
        factor = max_size / min(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image.draft("RGB" if image.mode == "RGB" else None, size)
        image = image.convert("RGB" if image.mode not in ("RGB", "L") else image.mode)
        image = image.resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        if extension in ("jpg", "jpeg", "webp"):
            image.save(buffer, format="JPEG", quality=90)
            return buffer.getvalue(), "jpg"
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        log.warning("not downscaling %s, kept as it is: %s", name, error)
        return payload, extension


def _write_one_shard(
    path: Path, source: Source, indices: list[int], max_size: int | None, classes: list[str]
) -> int:
    # a shard under its final name is always complete
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        # an integer mtime: no PAX header per member (faster to read) and byte-identical reruns
        writer = wds.TarWriter(stream, encoder=False, mtime=0)
        for index in indices:
            record = source.records[index]
            payload, extension = record.read()
            mask = record.read_mask()
            if max_size is not None and mask is None:
                payload, extension = downscaled(payload, extension, max_size, record.name)
            sample = {"__key__": f"{index:09d}", extension: payload}
            if record.label is not None:
                sample["cls"] = str(record.label).encode()
            if mask is not None:
                _check_pair(record, payload, mask, len(classes), source.ignore_index)
                sample[MASK_MEMBER] = mask
            writer.write(sample)
        writer.close()
    return len(indices)


def _check_pair(
    record: Record, payload: bytes, mask: bytes, num_classes: int, ignore_index: int | None
) -> None:
    where = record.mask if isinstance(record.mask, str) else record.name
    try:
        check_mask(decode_mask(mask), open_image(payload).size, num_classes, ignore_index)
    except (BadMask, BadSample) as error:
        raise UserInputError(f"{where} (for image {record.name}): {error}") from None


def mask_classes(source: Source) -> list[str]:
    """Class names "0".."K-1" of masks that come without names: K is one more than the largest
    label any mask holds, the ignore index aside (every mask is read once to find it)."""

    def largest(record: Record) -> int:
        try:
            values = np.unique(decode_mask(record.read_mask()))
        except BadMask as error:
            raise UserInputError(f"{record.mask}: {error}") from None
        values = values[values != source.ignore_index]
        return int(values.max()) if len(values) else -1

    log.info("reading %d masks for the number of classes", len(source.records))
    with ThreadPoolExecutor(4) as pool:
        top = max(pool.map(largest, source.records), default=-1)
    return [str(label) for label in range(top + 1)]


def write_shards(
    source: Source,
    out_dir: Path,
    name: str = "train",
    shard_size: int = 1000,
    shuffle_seed: int | None = 0,
    num_writers: int = 4,
    on_shard_done: Callable[[int], None] = lambda num: None,
    max_size: int | None = None,
    limit: int | None = None,
) -> Path:
    """Writes `source` as shards into `out_dir` and returns the _info.json path. Shards already
    present under their final name are kept, so an interrupted run picks up where it stopped.
    `max_size`: images whose shorter side is larger are downscaled to it (see `downscaled`).
    `limit`: only that many records (a seeded random subset; the first ones without shuffling)."""
    if shard_size < 1:
        raise UserInputError(f"shard_size must be at least 1, got {shard_size}")
    if max_size is not None and max_size < 1:
        raise UserInputError(f"max_size must be at least 1 pixel, got {max_size}")
    if limit is not None and limit < 1:
        raise UserInputError(f"limit must be at least 1 record, got {limit}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(
        out_dir,
        name,
        records=len(source.records),
        shard_size=shard_size,
        seed=shuffle_seed,
        limit=limit,
        max_size=max_size,
    )
    plan = _shard_plan(len(source.records), shard_size, shuffle_seed, limit)
    paths = [out_dir / f"{name}-{number:06d}.tar" for number in range(len(plan))]
    segmentation = source.ignore_index is not None
    classes = mask_classes(source) if segmentation and not source.classes else source.classes

    def work(number: int) -> int:
        if paths[number].exists():
            return len(plan[number])
        return _write_one_shard(paths[number], source, plan[number], max_size, classes)

    with ThreadPoolExecutor(max(1, num_writers)) as pool:
        for count in pool.map(work, range(len(plan))):
            on_shard_done(count)
    lengths = [len(indices) for indices in plan]
    return write_info(out_dir, name, [p.name for p in paths], lengths, classes, source.ignore_index)


def _claim(out_dir: Path, name: str, **options: int | None) -> None:
    """Records what the shards of `name` in `out_dir` are made of before any is written. A rerun
    keeps the shards already there, which is right only with the same source and options: other
    ones are refused instead of leaving a mix of two plans under one _info.json."""
    path = out_dir / f".{name}-plan.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {
            key: (before.get(key), value) for key, value in options.items() if before.get(key) != value
        }
        if changed:
            described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise UserInputError(
                f"{out_dir} holds {name} shards written from another source or with other options "
                f"({described}): write them to another --out, or delete {out_dir} first"
            )
        return
    atomic_write_text(path, json.dumps(options))


def write_info(
    out_dir: Path,
    name: str,
    filenames: list[str],
    lengths: list[int],
    classes: list[str],
    ignore_index: int | None = None,
) -> Path:
    info = {
        "name": name,
        "num_samples": sum(lengths),
        "classes": classes,
        **({"ignore_index": ignore_index} if ignore_index is not None else {}),
        "shards": [{"name": f, "num_samples": n} for f, n in zip(filenames, lengths, strict=True)],
        "splits": {
            name: {
                "name": name,
                "num_samples": sum(lengths),
                "filenames": filenames,
                "shard_lengths": lengths,
            }
        },
    }
    path = out_dir / INDEX_FILES[0]
    atomic_write_text(path, json.dumps(info, indent=1))
    return path


# ----------------------------------------------------------------------------- finding


def open_shards(spec: str, read: ReadPolicy = DEFAULT_READ) -> ShardSet:
    """A shard directory (with an index, or any *.tar), an index file, or a brace pattern;
    remote: an http(s) URL of an index (or of the directory holding its _info.json, ending in /),
    or a brace pattern of http(s) URLs or `pipe:` commands. `SHARDS::SPLIT` picks a split of a
    timm-style index. Indexes: see mim.data.indexes; without one, img2dataset's per-shard stats
    give the counts where they are beside the shards."""
    if not spec:
        raise UserInputError(
            "no shards given (set data.train / data.val to a shard directory, _info.json or pattern)"
        )
    spec, split = split_of(spec)
    if is_remote(spec):
        return _open_remote(spec, split, read)
    return _open_local(spec, split, read)


def _open_local(spec: str, split: str | None, read: ReadPolicy) -> ShardSet:
    path = Path(spec)
    if path.is_dir():
        index = next((path / name for name in INDEX_FILES if (path / name).is_file()), None)
        if index is not None:
            return _from_index(index, split, read)
        urls = sorted(str(p.absolute()) for p in path.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(
                f"shard directory {path} holds no index ({', '.join(INDEX_FILES)}) and no .tar files"
            )
        return _with_stats(urls, read, split)
    if path.is_file() and path.suffix == ".json":
        return _from_index(path, split, read)
    urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard pattern {spec!r} names {len(missing)} missing file(s), e.g. {missing[0]!r}"
            " (expected a shard directory, an _info.json, or a brace pattern of existing .tar files)"
        )
    return _with_stats(urls, read, split)


def _open_remote(spec: str, split: str | None, read: ReadPolicy) -> ShardSet:
    if spec.startswith(("http://", "https://")) and (spec.endswith("/") or spec.endswith(".json")):
        info_url = spec + INDEX_FILES[0] if spec.endswith("/") else spec
        try:
            text = read_bytes(info_url, read)
        except ShardUnreadable as error:
            raise UserInputError(f"cannot read the shard index {error}") from None
        index = parse_index(text, info_url, split)
        return ShardSet(
            [urllib.parse.urljoin(info_url, n) for n in index.names],
            index.lengths,
            index.classes,
            read,
            ignore_index=index.ignore_index,
            pixels=index.pixels,
        )
    urls = list(braceexpand.braceexpand(spec))
    return _with_stats(urls, read, split)


def _from_index(path: Path, split: str | None, read: ReadPolicy) -> ShardSet:
    directory = path.parent.absolute()  # absolute: no entry can come out as `pipe:...`
    index = parse_index(path.read_bytes(), str(path), split)
    urls = [str(directory / name) for name in index.names]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}")
    return ShardSet(
        urls, index.lengths, index.classes, read, ignore_index=index.ignore_index, pixels=index.pixels
    )


def _with_stats(urls: list[str], read: ReadPolicy, split: str | None) -> ShardSet:
    """Shards without an index; their counts from img2dataset's stats files where every shard has
    one (remote: looked for beside the first shard only, so a pattern without them costs one request)."""
    if split is not None:
        raise UserInputError(f"::{split} picks a split of an index, but {urls[:1]} ... have none")
    names = [stats_name(u) for u in urls]
    if not urls or None in names or urls[0].startswith("pipe:"):
        return ShardSet(urls, None, [], read)
    if is_remote(urls[0]):
        try:
            first = read_bytes(names[0], ReadPolicy(attempts=1, wait=0.0, timeout=read.timeout))
        except ShardUnreadable:
            return ShardSet(urls, None, [], read)
        try:
            texts = [first] + [read_bytes(name, read) for name in names[1:]]
        except ShardUnreadable as error:
            raise UserInputError(f"{names[0]} is there but not every shard's stats file: {error}") from None
    elif all(Path(name).is_file() for name in names):
        texts = [Path(name).read_bytes() for name in names]
    else:
        return ShardSet(urls, None, [], read)
    return ShardSet(urls, [stats_count(t, n) for t, n in zip(texts, names, strict=True)], [], read)


def count_samples(url: str, read: ReadPolicy = DEFAULT_READ) -> int:
    """Samples in one shard: from the tar index for a local file (no decoding), else by streaming it."""
    if not is_remote(url):
        with tarfile.open(url) as archive:
            return len({m.name.split(".", 1)[0] for m in archive.getmembers() if m.isfile()})
    return sum(1 for _ in stream_samples(url, read))


def with_lengths(shards: ShardSet) -> ShardSet:
    if shards.lengths is not None:
        return shards
    return dataclasses.replace(shards, lengths=[count_samples(u, shards.read) for u in shards.urls])
