"""A training batch and where a rank's training stream is: the two things that cross from the
data loader into the training loop and, as the stream's position, into a checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A training batch: uint8 images (N, C, H, W), labels (N,), and where it ends in its
    (logical) worker's stream: (chunk, samples into it)."""

    images: torch.Tensor
    labels: torch.Tensor
    worker: int
    position: tuple[int, int]
    bad: dict[str, int]  # shard file name -> bad samples since the worker's last batch

    def pin_memory(self) -> Batch:
        """What the DataLoader calls where it pins memory (CUDA)."""
        return dataclasses.replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


@dataclass
class StreamPosition:
    """Where a rank's training stream is: per logical worker the (chunk, samples into it) of the
    last batch consumed, and whose batch is due next. The training loop advances a copy with each batch
    of a step and keeps it once the step is complete; it travels in the rank's checkpoint state
    (`state_dict`, `from_state`) and starts the resumed `TrainStream` (`start`)."""

    num_workers: int
    workers: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    next_worker: int = 0

    def advance(self, batch: Batch) -> None:
        self.workers[batch.worker] = tuple(batch.position)
        self.next_worker = (batch.worker + 1) % max(1, self.num_workers)

    def copy(self) -> StreamPosition:
        return StreamPosition(self.num_workers, dict(self.workers), self.next_worker)

    def state_dict(self) -> dict:
        return {
            "positions": {worker: list(at) for worker, at in self.workers.items()},
            "next_worker": self.next_worker,
            "num_workers": self.num_workers,
        }

    @classmethod
    def from_state(cls, state: dict, num_workers: int) -> StreamPosition | None:
        """The saved position; None where it cannot be kept (another data.num_workers: the
        logical workers' streams are not the same ones)."""
        if state["num_workers"] != num_workers:
            return None
        workers = {int(worker): tuple(at) for worker, at in state["positions"].items()}
        return cls(num_workers, workers, int(state["next_worker"]))
