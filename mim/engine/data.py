"""A run's training data as the loop sees it: batches from where the last completed step left
off, the batch's inputs on the device, and the position as a rank part of the checkpoint.

`StreamData` reads the shards (mim.data.streams.TrainStream); a task may hand the loop another
source with the same three methods (the cached features of a linear probe, say)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import torch

from mim.data.batch import StreamPosition
from mim.data.loaders import train_loader
from mim.data.shards import ShardSet
from mim.data.streams import TrainStream, ViewSpec
from mim.data.transforms import normalize_on_device
from mim.engine.state import StateNotKept


class BadSamples(collections.Counter):
    """This rank's unusable samples per shard file since the run began; a rank part, so that a
    resumed run counts on (data.max_bad_fraction is of everything read)."""

    def state_dict(self) -> dict[str, Any]:
        return {"by_shard": dict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        self.update(state["by_shard"])


class PositionState:
    """The `position` (a StreamPosition) as a rank part: the loop advances a copy with each batch
    of a step and keeps it once the step is complete."""

    position: StreamPosition
    legacy_top_level = True  # checkpoints from before named parts kept the position at the top

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = StreamPosition.from_state(state, self.position.num_workers)
        if position is None:
            raise StateNotKept(
                f"data.num_workers changed from {state['num_workers']} to {self.position.num_workers}: "
                "data stream positions cannot be kept"
            )
        self.position = position


class StreamData(PositionState):
    def __init__(
        self, config: Any, shards: ShardSet, view_spec: ViewSpec, rank: int, device: torch.device, dtype
    ) -> None:
        self.config, self.shards, self.view_spec, self.rank = config, shards, view_spec, rank
        self.device, self.dtype = device, dtype
        self.position = StreamPosition(config.data.num_workers)

    def batches(self) -> Iterator[dict]:
        data = self.config.data
        stream = TrainStream(
            self.shards,
            self.view_spec,
            data.batch_size,
            self.config.run.seed,
            self.rank,
            data.shards_per_chunk,
            self.position,
            data.shuffle_buffer,
        )
        return iter(train_loader(stream, data.num_workers))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images, normalised on the device in the engine's input dtype."""
        data = self.config.data
        return normalize_on_device(images.to(self.device, non_blocking=True), data.mean, data.std, self.dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's images as the model takes them."""
        return self.normalize(images)

    def describe(self) -> dict[str, Any]:
        return {"train": self.config.data.train, "num_samples": self.shards.num_samples}
