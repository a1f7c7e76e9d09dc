"""Sample streams over WebDataset shards.

Training (`TrainStream`): resampled shards, no epoch boundary. Each (rank, worker) stream is a
sequence of chunks; chunk k draws `shards_per_chunk` shards with replacement and shuffles their
samples, all from an RNG seeded by (seed, rank, worker, k). Its position is therefore two numbers
(chunk, offset), which every batch carries with its (logical) worker id; a `StreamPosition` holds
the position of the last batch consumed from each worker and which worker is due next (the
training loop advances it as it consumes batches and saves it), and a resumed stream continues exactly
there.

Evaluation (`EvalStream`): every sample of the split (or of a subset of it) exactly once
across all ranks and workers: contiguous ranges of the global sample indices, split by rank, then
by worker.

Both skip the samples a shard set holds out (`ShardSet.held_out`, eval.holdout of the classifier
stages): the held-out ones are read only as a subset of the same shards without the holdout.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mim.data.batch import Batch, StreamPosition
from mim.data.members import (
    DEFAULT_IMAGE_KEY,
    DEFAULT_LABEL_KEY,
    missing_label,
    sample_image,
    sample_label,
    sample_mask,
)
from mim.data.reading import ReadPolicy, ShardUnreadable, basename, stream_samples
from mim.data.segmentation import BadMask, SegmentSpec, eval_pair, train_pair
from mim.data.shards import ShardSet
from mim.data.transforms import BadSample, eval_view, train_view
from mim.errors import TrainingStopped

log = logging.getLogger(__name__)
MAX_EMPTY_CHUNKS = 10
ALL_BAD_SAMPLES = 256  # a worker whose first this many samples are all unusable stops the run
LOGGED_BAD_PER_SHARD = 3  # then bad samples of that shard are counted, not logged one by one


def derived_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class ViewSpec:
    img_size: int
    mode: str  # "RGB", "L" or "<C>-band" (mim.data.pixels)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    needs_label: bool = False
    randaug: str = ""  # a timm RandAugment string applied after the crop (fine-tuning)
    reduced_decode: bool = True  # JPEGs decode at a reduced DCT scale where the crop allows
    image_key: str = DEFAULT_IMAGE_KEY  # data.image_key (mim.data.members)
    label_key: str = DEFAULT_LABEL_KEY  # data.label_key
    segment: SegmentSpec | None = None  # a mask per image, viewed with it, instead of a label


def eval_spec(spec: ViewSpec) -> ViewSpec:
    """The evaluation view of a training spec: same size, mode, decoding and members; labels required."""
    return ViewSpec(
        spec.img_size,
        spec.mode,
        needs_label=True,
        reduced_decode=spec.reduced_decode,
        image_key=spec.image_key,
        label_key=spec.label_key,
        segment=spec.segment,
    )


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class _SampleReader:
    """Streams the samples of one shard at a time (local, http(s) or `pipe:`, retried where that
    can help). Bad samples, shards that cannot be read to their end and empty shards are counted
    per shard (by file name) and logged, never raised."""

    def __init__(self, policy: ReadPolicy) -> None:
        self.policy = policy
        self.bad: collections.Counter[str] = collections.Counter()
        self.reported: collections.Counter[str] = collections.Counter()

    def count_bad(self, url: str, why: object, what: str = "bad sample in") -> None:
        """Counted always; logged for the first few of each shard, so a log never grows without bound."""
        name = basename(url)
        self.bad[name] += 1
        if self.bad[name] <= LOGGED_BAD_PER_SHARD:
            log.warning("skipping %s %s: %s", what, url, why)
        if self.bad[name] == LOGGED_BAD_PER_SHARD:
            log.warning("further bad samples in %s are counted, not logged", name)

    def samples(self, url: str) -> Iterator[dict]:
        delivered = 0
        try:
            for sample in stream_samples(url, self.policy):
                delivered += 1
                yield sample
        except ShardUnreadable as error:  # what came before the failure is kept
            self.count_bad(url, str(error).removeprefix(f"{url}: "), what="the rest of shard")
            return
        if not delivered:
            self.count_bad(url, "the shard holds no samples")

    def new_bad(self) -> dict[str, int]:
        """Bad samples per shard since the last call."""
        new = self.bad - self.reported
        self.reported = collections.Counter(self.bad)
        return dict(new)


def _decode_sample(sample: dict, spec: ViewSpec, view: Callable) -> tuple[torch.Tensor, Any]:
    """(image, label), or (image, mask) for a segmentation spec, whose `view` takes both payloads."""
    payload = sample_image(sample, spec.image_key)
    if spec.segment is not None:
        mask = sample_mask(sample, spec.segment.mask_key)
        try:
            return view(payload, mask)
        except BadMask as error:
            raise BadMask(
                f"sample {sample.get('__key__')} in {sample.get('__url__', '?')}: {error}"
            ) from None
    label = sample_label(sample, spec.label_key)
    if label is None:
        if spec.needs_label:
            raise missing_label(sample, spec.label_key)
        label = -1
    return view(payload), label


class TrainStream(IterableDataset):
    def __init__(
        self,
        shards: ShardSet,
        spec: ViewSpec,
        batch_size: int,
        seed: int,
        rank: int,
        shards_per_chunk: int = 2,
        start: StreamPosition | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.shards, self.spec, self.batch_size = shards, spec, batch_size
        self.seed, self.rank, self.shards_per_chunk = seed, rank, shards_per_chunk
        self.shuffle_buffer = shuffle_buffer
        self.start_positions = dict(start.workers) if start is not None else {}
        # The DataLoader takes batches from its workers in turn, starting with worker 0; a resumed
        # stream lets worker 0 play the logical worker whose batch was due next.
        self.first_worker = start.next_worker if start is not None else 0

    def _chunk(self, worker: int, chunk: int) -> tuple[random.Random, list[str]]:
        rng = random.Random(derived_seed(self.seed, self.rank, worker, chunk))
        return rng, [rng.choice(self.shards.urls) for _ in range(self.shards_per_chunk)]

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        worker = (worker + self.first_worker) % num_workers
        chunk, offset = self.start_positions.get(worker, (0, 0))
        reader = _SampleReader(self.shards.read)
        extra = _randaug(self.spec) if self.spec.randaug else None
        images, labels = [], []
        empty_chunks, good, bad = 0, 0, 0
        while True:
            rng, urls = self._chunk(worker, chunk)
            samples = (sample for url in urls for sample in _usable_samples(self.shards, reader, url))
            read_any = False
            for position, sample in enumerate(shuffled(samples, rng, self.shuffle_buffer)):
                read_any = True
                if position < offset:  # resuming: the chunk is read again up to where it stopped
                    continue
                view_rng = random.Random(derived_seed(self.seed, self.rank, worker, chunk, position))
                view = self._view(view_rng, extra)
                try:
                    image, label = _decode_sample(sample, self.spec, view)
                except BadSample as error:
                    reader.count_bad(sample.get("__url__", "?"), f"sample {sample.get('__key__')}: {error}")
                    bad += 1
                    if bad == ALL_BAD_SAMPLES and not good:  # nothing usable: waiting would be forever
                        raise TrainingStopped(
                            f"the first {bad} samples read were all unusable, e.g. {error}"
                        ) from None
                    continue
                good += 1
                images.append(image)
                labels.append(label)
                if len(images) == self.batch_size:
                    yield Batch(
                        torch.stack(images),
                        torch.stack(labels) if self.spec.segment else torch.tensor(labels),
                        worker,
                        (chunk, position + 1),
                        reader.new_bad(),
                    )
                    images, labels = [], []
            empty_chunks = 0 if read_any else empty_chunks + 1
            if empty_chunks == MAX_EMPTY_CHUNKS:  # without this the loader would wait forever
                worst = ", ".join(name for name, _ in reader.bad.most_common(3))
                raise TrainingStopped(
                    f"no readable sample in {MAX_EMPTY_CHUNKS} chunks of shards in a row (failing: "
                    f"{worst}); are the shards reachable and are they tar files?"
                )
            chunk, offset = chunk + 1, 0

    def _view(self, rng: random.Random, extra: Callable | None) -> Callable:
        spec = self.spec
        if spec.segment is not None:
            return lambda image, mask: train_pair(  # noqa: E731
                image, mask, spec.mode, spec.img_size, rng, spec.segment, spec.hflip
            )
        return lambda payload: train_view(  # noqa: E731
            payload, spec.mode, spec.img_size, rng, spec.crop_scale, spec.hflip, extra, spec.reduced_decode
        )


def _usable_samples(shards: ShardSet, reader: _SampleReader, url: str) -> Iterator[dict]:
    """The shard's samples, less those its set holds out (eval.holdout)."""
    held_out = shards.held_out
    if held_out is None:
        yield from reader.samples(url)
        return
    name = basename(url)
    for offset, sample in enumerate(reader.samples(url)):
        if not held_out.holds(name, offset):
            yield sample


def shuffled(samples: Iterable[dict], rng: random.Random, size: int) -> Iterator[dict]:
    """`samples` in a random order drawn from `rng`, holding at most `size` of them at a time:
    once the buffer is full, each new sample takes the place of a random one, which comes out."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


def _randaug(spec: ViewSpec) -> Callable:
    from timm.data.auto_augment import rand_augment_transform

    fill = (124, 116, 104) if spec.mode == "RGB" else (124,)
    transform = rand_augment_transform(
        spec.randaug, {"translate_const": int(spec.img_size * 0.45), "img_mean": fill}
    )
    for op in transform.ops:
        # At magnitude 10 timm's increasing posterize keeps 0 bits, which Pillow >= 11 refuses;
        # 9 keeps 1 bit, the strongest posterize Pillow allows.
        if op.name == "PosterizeIncreasing":
            op.magnitude_max = min(op.magnitude_max or 10, 9)
    return transform


def index_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    return [(part * total // parts, (part + 1) * total // parts) for part in range(parts)]


class EvalStream(IterableDataset):
    """Yields (image, label, global index) for every sample of this rank's share exactly once. The
    share is a contiguous part of the split's indices, or of `subset` (sorted global indices) when
    given: ranks split it, then workers split each rank's part."""

    def __init__(
        self,
        shards: ShardSet,
        spec: ViewSpec,
        rank: int,
        world_size: int,
        crop_fraction: float,
        subset: Sequence[int] | None = None,
    ) -> None:
        if shards.lengths is None:
            raise ValueError("evaluation needs per-shard sample counts (an _info.json, or count them first)")
        self.shards, self.spec, self.crop_fraction = shards, spec, crop_fraction
        indices = range(shards.num_samples) if subset is None else tuple(subset)
        start, stop = index_ranges(len(indices), world_size)[rank]
        self.indices = indices[start:stop]  # a range stays a range: membership tests are O(1)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        worker, num_workers = _worker()
        start, stop = index_ranges(len(self.indices), num_workers)[worker]
        wanted = self.indices[start:stop]
        if not wanted:
            return
        members = wanted if isinstance(wanted, range) else frozenset(wanted)
        reader = _SampleReader(self.shards.read)
        shard_start = 0
        for url, length in zip(self.shards.urls, self.shards.lengths, strict=True):
            shard_stop = shard_start + length
            # wanted[first:stop] are this shard's wanted indices (bisect works on a range too)
            first, stop = bisect.bisect_left(wanted, shard_start), bisect.bisect_left(wanted, shard_stop)
            if stop > first:
                yield from self._read_range(url, shard_start, members, wanted[stop - 1], reader)
            shard_start = shard_stop

    def _read_range(
        self, url: str, first_index: int, members: Container[int], last: int, reader: _SampleReader
    ) -> Iterator[tuple[torch.Tensor, int, int]]:
        spec = self.spec
        if spec.segment is not None:
            view = lambda image, mask: eval_pair(image, mask, spec.mode, spec.segment)  # noqa: E731
        else:
            view = lambda payload: eval_view(  # noqa: E731
                payload, spec.mode, spec.img_size, self.crop_fraction, spec.reduced_decode
            )
        held_out, name = self.shards.held_out, basename(url)
        for offset, sample in enumerate(reader.samples(url)):
            index = first_index + offset
            if index > last:  # the rest of the shard is not wanted: stop reading it
                break
            if index in members and not (held_out is not None and held_out.holds(name, offset)):
                try:
                    image, label = _decode_sample(sample, self.spec, view)
                except BadSample as error:
                    reader.count_bad(url, f"{index}: {error}", what="evaluation sample in")
                    continue
                yield image, label, index


def spread_subset(lengths: list[int], count: int | None) -> tuple[int, ...] | None:
    """`count` sample indices spread over every shard in proportion to its size: the first samples
    of each, so reading them costs what they hold, not the whole split (`mim shards` mixes the
    classes within each shard). None (the whole split) when `count` is None or not smaller."""
    total = sum(lengths)
    if count is None or count >= total:
        return None
    exact = [count * length / total for length in lengths]
    quotas = [int(share) for share in exact]
    by_remainder = sorted(range(len(lengths)), key=lambda i: (quotas[i] - exact[i], i))
    for shard in by_remainder[: count - sum(quotas)]:
        quotas[shard] += 1
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return tuple(
        start + offset for start, quota in zip(starts, quotas, strict=True) for offset in range(quota)
    )


def first_images(shards: ShardSet, spec: ViewSpec, count: int, max_shards: int = 8) -> list[torch.Tensor]:
    """The first `count` readable images of the first shards (whole images, eval view), read only
    as far as needed: a fixed set to show, wherever the shards live."""
    reader, images = _SampleReader(shards.read), []
    unlabelled = dataclasses.replace(spec, needs_label=False, segment=None)
    view = lambda payload: eval_view(payload, spec.mode, spec.img_size, 1.0, spec.reduced_decode)  # noqa: E731
    for url in shards.urls[:max_shards]:
        for sample in reader.samples(url):
            try:
                images.append(_decode_sample(sample, unlabelled, view)[0])
            except BadSample:
                continue
            if len(images) == count:
                return images
    return images
