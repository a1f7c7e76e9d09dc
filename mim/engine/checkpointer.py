"""Saving a DeepSpeed engine's run into the checkpoint format (mim.checkpoint) and restoring it:
every rank writes its files under a temporary name, each file summed as it is written, rank 0
adds the weights, shared states and meta, gathers the sums into the manifest and renames the
directory; a resume loads DeepSpeed's own files where they fit this run, else moves the weights
and the per-parameter optimizer state (mim.engine.portable)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mim.checkpoint import (
    CHECKPOINT_DIR,
    MANIFEST_FILE,
    META_FILE,
    MODEL_STATES_FILE,
    PARTITIONED_MODEL_STATES_FILE,
    WEIGHTS_FILE,
    file_entry,
    git_sha,
    latest_checkpoint,
    load_weights,
    prune,
    save_rank_state,
    step_name,
    temporary_name,
    versions,
    write_manifest,
    write_summed,
    zero_shards,
)
from mim.engine import portable
from mim.engine.deepspeed_engine import full_state_dict
from mim.errors import TrainingStopped
from mim.meta import CheckpointMeta

log = logging.getLogger(__name__)


class _SummingCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine during a save: its files go through torch.save
    into a summing writer, so each is summed as it is written."""

    def __init__(self, inner: Any, sums: dict[str, dict]) -> None:
        self.inner, self.sums = inner, sums

    def save(self, state_dict: Any, path: str) -> None:
        zipped = getattr(self.inner, "zipfile_serialization", True)
        self.sums[Path(path).name] = write_summed(
            Path(path), lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=zipped)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def _summing(engine: Any, sums: dict[str, dict]) -> Iterator[None]:
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SummingCheckpointEngine(inner, sums)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    rank: int,
    rank_state: dict[str, Any],
    meta: CheckpointMeta,
    keep_last: int,
    barrier: Callable[[], None],
    gather: Callable[[Any], list] = lambda value: [value],
    shared: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Saves a complete checkpoint; every rank calls it (`barrier`, `gather`: the process group's;
    `shared`: tensors by file name that every rank holds alike, written once, by rank 0).
    Returns the final directory. A failed write (disk full, quota) leaves the previous checkpoints
    as they were."""
    root = Path(run_dir) / CHECKPOINT_DIR
    temporary = root / temporary_name(step)
    final = root / step_name(step)
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
    barrier()
    sums: dict[str, dict] = {}
    try:
        with _summing(engine, sums):
            engine.save_checkpoint(
                str(root), tag=temporary.name, save_latest=False, exclude_frozen_parameters=meta.trained_only
            )
        sums.update(save_rank_state(temporary, rank, rank_state))
        # every rank: at ZeRO 3 it gathers the partitions
        weights = full_state_dict(engine, rank, trained_only=meta.trained_only)
        if rank == 0:
            save_file(weights, str(temporary / WEIGHTS_FILE))  # 10x faster than safetensors' bytes + write
            sums[WEIGHTS_FILE] = file_entry(temporary / WEIGHTS_FILE)  # read back from the page cache
            for name, tensors in (shared or {}).items():
                save_file(tensors, str(temporary / f"{name}.safetensors"))
                sums[f"{name}.safetensors"] = file_entry(temporary / f"{name}.safetensors")
            tree = dict(
                meta.to_json(), step=step, versions=versions(), git_sha=git_sha(), integrity=MANIFEST_FILE
            )
            text = json.dumps(tree, indent=1, default=str).encode()
            sums[META_FILE] = write_summed(temporary / META_FILE, lambda f: f.write(text))
        every_rank = gather(sums)
        if rank == 0:
            write_manifest(temporary, {name: entry for part in every_rank for name, entry in part.items()})
    except (OSError, RuntimeError) as error:  # DeepSpeed reports a failed torch.save as RuntimeError
        shutil.rmtree(temporary, ignore_errors=True)
        raise TrainingStopped(
            f"could not write the checkpoint of step {step} to {temporary}: {error}; "
            f"the last complete checkpoint, {latest_checkpoint(run_dir)}, is untouched"
        ) from error
    barrier()
    if rank == 0:
        if final.exists():  # a checkpoint of the same step from before a crash: replace it
            shutil.rmtree(final)
        temporary.rename(final)
        prune(run_dir, keep_last)
    barrier()
    return final


def restore(engine: Any, checkpoint: Path, meta: CheckpointMeta, stage: int, world_size: int) -> None:
    """Loads a verified checkpoint into `engine` (ZeRO `stage` on `world_size` processes; every rank
    calls it): DeepSpeed's own load where the files were written for this stage and process count
    (or at stage 0, whose files hold everything), else the weights and the per-parameter AdamW state
    moved into this engine (mim.engine.portable)."""
    written, written_world = meta.zero_stage, meta.world_size
    if (written, written_world) == (stage, world_size) or written == stage == 0:
        engine.load_checkpoint(
            str(checkpoint.parent),
            tag=checkpoint.name,
            load_module_strict=not meta.trained_only,
            load_lr_scheduler_states=False,
        )
        return
    log.warning(
        "moving the optimizer state of %s from ZeRO stage %d on %d process(es) to stage %d on %d",
        checkpoint,
        written,
        written_world,
        stage,
        world_size,
    )
    portable.load_into(engine, load_weights(checkpoint), optimizer_state(checkpoint), meta.trained_only)


def optimizer_state(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The AdamW state per parameter name of a checkpoint written at any stage by any number of
    processes (mim.engine.portable), from DeepSpeed's files (verified on resume)."""
    checkpoint = Path(checkpoint)
    states = checkpoint / MODEL_STATES_FILE
    if not states.is_file():
        states = checkpoint / PARTITIONED_MODEL_STATES_FILE
    return portable.optimizer_state(states, zero_shards(checkpoint))
