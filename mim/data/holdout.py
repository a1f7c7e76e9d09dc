"""A held-out share of a labelled training split, to choose on (a probe's head and epoch, a
fine-tune's epoch) without looking at the split that is reported.

Each sample is held out or not by a seeded hash of its shard's file name and its position in
the shard: no pass over the data is needed, the training stream and the evaluation stream agree
on every sample, and each class keeps its share of the split (every sample has the same chance,
whatever its label). A run's holdout never changes: it depends on the seed and the shards only.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from mim.data.reading import basename


@dataclass(frozen=True)
class Holdout:
    fraction: float  # of the split, in (0, 1)
    seed: int

    def holds(self, shard: str, offset: int) -> bool:
        """Whether sample `offset` (0-based, in reading order) of shard file `shard` is held out."""
        key = f"mim-holdout/{self.seed}/{shard}/{offset}".encode()
        value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return value < self.fraction * 2**64

    def indices(self, urls: list[str], lengths: list[int]) -> tuple[int, ...]:
        """The held-out samples' global indices in the split, sorted."""
        return _held_out(self, tuple(basename(url) for url in urls), tuple(lengths))


@functools.lru_cache(maxsize=8)
def _held_out(holdout: Holdout, names: tuple[str, ...], lengths: tuple[int, ...]) -> tuple[int, ...]:
    held, start = [], 0
    for name, length in zip(names, lengths, strict=True):
        held.extend(start + offset for offset in range(length) if holdout.holds(name, offset))
        start += length
    return tuple(held)
