"""DataLoaders over mim's streams (mim.data.streams) that a stop signal can cut short: the
workers ignore stop signals (the training process checkpoints), each wait for a batch can be
interrupted, and a loader left early kills its workers at once."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from mim.data.streams import EvalStream, TrainStream
from mim.runtime import interruptible


def _ignore_stop_signals(worker_id: int) -> None:
    """Stop signals are for the training process, which checkpoints; a worker killed by one would
    break the batch the main process is waiting for."""
    for number in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


class _Loader(DataLoader):
    """A DataLoader that a stop signal can cut short: each wait for a batch is `interruptible` as
    `waiting` (when set; an evaluation marks its whole loop instead), and when it is left before its
    end (StopWhileWaiting, or closed early) the worker processes are killed at once, where the
    loader's own shutdown would join each for seconds (a worker blocked on a read never sees it)."""

    def __init__(self, *args, waiting: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = waiting

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        try:
            while True:
                with interruptible(self.waiting) if self.waiting else contextlib.nullcontext():
                    batch = next(iterator, _END)
                if batch is _END:
                    return
                yield batch
        except BaseException:  # a stop cut a wait short, or the consumer let the loader go early
            _kill_workers(iterator)
            raise


_END = object()


def _kill_workers(iterator) -> None:
    """torch has no public way to drop a loader whose workers are blocked: take them out of its
    SIGCHLD check (which would report the kill as a worker crash), then kill them (they ignore
    SIGTERM); the loader's own shutdown then finds them gone."""
    workers = getattr(iterator, "_workers", None)  # absent without worker processes
    if not workers:
        return
    if getattr(iterator, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in workers:
        worker.kill()


def train_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    return _Loader(
        stream,
        batch_size=None,  # the stream batches itself, so each batch carries one worker's position
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals,
        waiting="waiting for training data",
        # The stream seeds every sample's view itself; the loader's base seed comes from a private
        # generator, so starting it (again, on resume) leaves the global RNG, which drop path and
        # mixup draw from, where the checkpoint put it.
        generator=torch.Generator(),
    )


def eval_loader(
    stream: EvalStream,
    batch_size: int,
    num_workers: int,
    generator: torch.Generator | None = None,
    collate: Callable | None = None,
) -> DataLoader:
    """`generator`: where the loader draws its workers' base seed; a private one leaves the global
    RNG (and so a training run around the evaluation) untouched. `collate`: how a batch's samples
    are put together (default: stacked)."""
    return _Loader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_stop_signals,
        generator=generator,
        collate_fn=collate,
    )
