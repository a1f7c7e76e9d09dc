"""The run's state as parts that save themselves, and the one manager that checkpoints them.

A part has `state_dict()` and `load_state_dict(state)`. The manager keeps three kinds beside the
engine's own state (the model and its optimizer, mim.engine.checkpointer):
- rank parts: each process's own (its RNG, its data stream's position), in its rank-NNNNN.pt;
- shared parts: tensors every process holds alike (the EMA teacher), one safetensors file each,
  written by rank 0;
- meta: what meta.json says about the checkpoint.
Adding a piece of state to a run is one `add_rank_part` or `add_shared_part`, nothing in save or
resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from mim import checkpoint, rng
from mim.distributed import DistEnv, barrier, gather_objects
from mim.engine import checkpointer
from mim.errors import TrainingStopped
from mim.meta import CheckpointMeta
from mim.runtime import interruptible

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateNotKept(Exception):
    """Raised by a rank part whose saved state cannot serve this run (another data.num_workers,
    say): the manager logs why, and that part and those added after it start afresh."""


class RngState:
    """This process's random generators (torch, Python, CUDA)."""

    def state_dict(self) -> dict[str, Any]:
        return rng.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng.set_rng_state(state)


class CheckpointManager:
    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int) -> None:
        self.run_dir, self.env, self.keep_last = Path(run_dir), env, keep_last
        self.rank_parts: dict[str, Stateful] = {}
        self.shared_parts: dict[str, Stateful] = {}

    def add_rank_part(self, name: str, part: Stateful) -> None:
        self.rank_parts[name] = part

    def add_shared_part(self, name: str, part: Stateful) -> None:
        """`part.state_dict()`: tensors by name, alike on every rank ({}: nothing to write)."""
        self.shared_parts[name] = part

    # ------------------------------------------------------------------ finding

    def newest(self) -> Path | None:
        """The newest checkpoint that verifies (rank 0 checks every file and sets damaged ones
        aside); every rank gets the same answer, or the same TrainingStopped."""
        found, failure = None, None
        if self.env.is_main:
            try:
                found = checkpoint.newest_intact(self.run_dir)
            except TrainingStopped as error:
                failure = str(error)
        found, failure = gather_objects((found, failure))[0]
        if failure is not None:
            raise TrainingStopped(failure)
        return found

    def latest(self) -> Path | None:
        return checkpoint.latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------ saving

    def save(self, engine: Any, step: int, meta: CheckpointMeta) -> Path:
        """Every rank calls it; a stop signal never cuts it short."""
        with interruptible(None):
            rank_state = {name: part.state_dict() for name, part in self.rank_parts.items()}
            shared = None
            if self.env.is_main:
                shared = {name: part.state_dict() for name, part in self.shared_parts.items()}
                shared = {name: tensors for name, tensors in shared.items() if tensors}
            path = checkpointer.save(
                engine,
                self.run_dir,
                step,
                self.env.rank,
                rank_state,
                meta,
                self.keep_last,
                barrier,
                gather_objects,
                shared=shared,
            )
        log.info("checkpoint %s written", path)
        return path

    # ------------------------------------------------------------------ restoring

    def restore(
        self, engine: Any, path: Path, meta: CheckpointMeta, zero_stage: int, keep: tuple[str, ...] = ()
    ) -> None:
        """The engine's state (DeepSpeed's files where they fit, else moved), then the shared
        parts, then this rank's parts but those named in `keep`, which stay as they are (a rollback
        keeps the data stream where it is)."""
        checkpointer.restore(engine, path, meta, zero_stage, self.env.world_size)
        names = list(self.shared_parts)
        loaded = checkpoint.load_shared(path, names) if names else {}
        for name, part in self.shared_parts.items():
            if name not in loaded:
                raise TrainingStopped(
                    f"{path} holds no {name} state ({name}.safetensors), which this run needs"
                )
            part.load_state_dict(loaded[name])
        self._restore_rank_parts(path, meta, keep)

    def _restore_rank_parts(self, path: Path, meta: CheckpointMeta, keep: tuple[str, ...]) -> None:
        rank_state = checkpoint.load_rank_state(path, self.env.rank)
        if rank_state is None:
            log.warning(
                "%s has no state for rank %d (written by %s process(es)): this rank's data stream "
                "starts at its first chunk; ranks that were there continue theirs",
                path,
                self.env.rank,
                meta.world_size,
            )
            return
        for name, part in self.rank_parts.items():
            if name in keep:
                continue
            state = rank_state.get(name)
            if state is None and getattr(part, "legacy_top_level", False):
                state = rank_state  # checkpoints from before named parts kept it at the top level
            if state is None:
                log.info("%s holds no %s state for rank %d: it starts afresh", path, name, self.env.rank)
                continue
            try:
                part.load_state_dict(state)
            except StateNotKept as why:
                log.warning("%s: %s", name, why)
                return


def shared_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as a shared part saves them: fp32, on the CPU, contiguous."""
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
