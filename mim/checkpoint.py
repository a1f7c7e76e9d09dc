"""The checkpoint format, the one module that knows it: the layout, names, manifest and
verification, meta, the weights and per-rank state files, resolving, consolidating and pruning.
It knows no engine: saving from a DeepSpeed engine and restoring into one are
mim.engine.checkpointer's, through what this module defines.

    RUN_DIR/checkpoints/step-00001000/      one complete checkpoint
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (engine.save_checkpoint;
                                                 at ZeRO 3 one *model_states.pt per rank)
        rank-00000.pt                            per-rank RNG states and data-stream positions
        model.safetensors                        the model's weights in fp32 (official MAE names)
        NAME.safetensors                         state every rank shares that is not the model's
                                                 (teacher.safetensors: an EMA teacher), from rank 0
        meta.json                                step, config, model, versions, git sha
        manifest.json                            every other file's size and checksum (written last)
    RUN_DIR/checkpoints/.tmp-step-00001000/  a checkpoint being written; never loaded
    RUN_DIR/checkpoints/damaged-step-00001000-<time>/  one that failed verification, kept aside

A checkpoint is written under a temporary name on every rank and renamed by rank 0 once all
ranks are done, so a directory named step-* is complete; `meta.json` inside it is the validity
marker. The last K complete checkpoints are kept.

Integrity: every file is checksummed (xxh3-128) by the rank that writes it, as it is written (the
weights file: just after, from the page cache); rank 0 gathers the sums into `manifest.json`, which carries a sum of its own.
Every load verifies what it reads against it (`verify`): a flipped byte, a truncated or missing
file, a damaged manifest raise `DamagedCheckpoint` naming the file. Checkpoints from before
manifests (meta.json without `integrity`) load unverified, with a warning.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import load_file

from mim.errors import TrainingStopped, UserInputError
from mim.meta import CheckpointMeta

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's (weights at stage 0 also the optimizer)
PARTITIONED_MODEL_STATES_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # DeepSpeed's at ZeRO 3
_ZERO_SHARD = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # DeepSpeed's, ZeRO 1-3
CHECKSUM = (
    "xxh3_128"  # ~17 GB/s on one core: a few % of a checkpoint's write time (benchmarks/checkpoint_io.py)
)
READ_CHUNK = 8 << 20
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class DamagedCheckpoint(UserInputError):
    """A checkpoint file that does not match its manifest (or a manifest that does not parse)."""


# ----------------------------------------------------------------------------- checksums


class _SummingWriter:
    """A binary file that sums what passes through it, for torch.save and friends."""

    def __init__(self, handle) -> None:
        self.handle, self.sum, self.size = handle, xxhash.xxh3_128(), 0

    def write(self, data) -> int:
        self.sum.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    def entry(self) -> dict[str, Any]:
        return {"bytes": self.size, CHECKSUM: self.sum.hexdigest()}


def write_summed(path: Path, write: Callable[[Any], None]) -> dict[str, Any]:
    with open(path, "wb") as handle:
        writer = _SummingWriter(handle)
        write(writer)
        return writer.entry()


def file_entry(path: Path) -> dict[str, Any]:
    summed, size = xxhash.xxh3_128(), 0
    buffer = bytearray(READ_CHUNK)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            summed.update(memoryview(buffer)[:count])
            size += count
    return {"bytes": size, CHECKSUM: summed.hexdigest()}


def _manifest_sum(files: dict[str, dict]) -> str:
    return xxhash.xxh3_128(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, files: dict[str, dict]) -> None:
    manifest = {"checksum": CHECKSUM, "files": files, "manifest_" + CHECKSUM: _manifest_sum(files)}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(checkpoint: Path) -> dict[str, dict] | None:
    """The files' entries; None for a checkpoint written before manifests."""
    checkpoint = Path(checkpoint)
    path = checkpoint / MANIFEST_FILE
    if not path.is_file():
        if "integrity" not in read_meta(checkpoint):
            return None
        raise DamagedCheckpoint(f"{path} is missing (its meta.json says it was written with one)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        intact = manifest["manifest_" + CHECKSUM] == _manifest_sum(files)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{path} does not parse as a mim manifest ({error!r})") from None
    if not intact:
        raise DamagedCheckpoint(f"{path} does not match its own checksum: it was altered")
    return files


def verify(checkpoint: Path, names: list[str] | None = None) -> bool:
    """Checks every file of the manifest (or only `names`) against it: True when all match, False
    for a checkpoint written before manifests (nothing to check: a warning is logged); raises
    DamagedCheckpoint naming the first file that does not match and how."""
    checkpoint = Path(checkpoint)
    files = read_manifest(checkpoint)
    if files is None:
        log.warning("%s was written before checkpoints had checksums: loading it unverified", checkpoint)
        return False
    for name in sorted(files) if names is None else names:
        path, expected = checkpoint / name, files.get(name)
        if expected is None:
            raise DamagedCheckpoint(f"{path} is not in {checkpoint / MANIFEST_FILE}")
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing ({expected['bytes']} bytes in the manifest)")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise DamagedCheckpoint(
                f"{path} is {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)"
            )
        if file_entry(path)[CHECKSUM] != expected[CHECKSUM]:
            raise DamagedCheckpoint(f"{path} does not match its checksum in the manifest: its bytes changed")
    return True


def set_aside(checkpoint: Path) -> Path:
    """Renames a damaged checkpoint out of the run's checkpoints, kept for inspection."""
    checkpoint = Path(checkpoint)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = checkpoint.with_name(f"damaged-{checkpoint.name}-{stamp}")
    checkpoint.rename(target)
    return target


def newest_intact(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies, after setting aside the newer ones that do
    not (each named in the log with what failed). None when the run has none; TrainingStopped
    when it has some and none verifies (then nothing is moved). Call it on one rank."""
    damaged = []
    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            verify(candidate)
        except DamagedCheckpoint as error:
            damaged.append((candidate, error))
            continue
        for path, error in damaged:
            log.error("checkpoint %s is damaged: %s; set aside as %s", path, error, set_aside(path).name)
        if damaged:
            log.warning("resuming from %s, the newest checkpoint that verifies", candidate)
        return candidate
    if damaged:
        raise TrainingStopped(
            f"no checkpoint of {run_dir} verifies: "
            + "; ".join(str(error) for _, error in damaged)
            + "; nothing was moved or deleted"
        )
    return None


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def temporary_name(step: int) -> str:
    return f".tmp-{step_name(step)}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve(spec: str | Path) -> Path:
    """A complete checkpoint from a run dir (its newest) or a checkpoint dir."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a mim run dir or checkpoint dir)")
    if (path / CHECKPOINT_DIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserInputError(f"run dir {path} holds no complete checkpoint")
        return latest
    if (path / META_FILE).is_file():
        return path
    raise UserInputError(f"{path} is neither a mim run dir nor a complete mim checkpoint (no {META_FILE})")


def is_mim_checkpoint(path: Path) -> bool:
    """A run dir or a checkpoint dir (what `resolve` takes)."""
    return (Path(path) / CHECKPOINT_DIR).is_dir() or (Path(path) / META_FILE).is_file()


def zero_shards(checkpoint: Path) -> list[Path]:
    """DeepSpeed's ZeRO optimizer shards of a checkpoint in rank order (none at stage 0)."""
    found = [(int(m.group(1)), p) for p in Path(checkpoint).iterdir() if (m := _ZERO_SHARD.match(p.name))]
    return [path for _, path in sorted(found)]


def load_meta(checkpoint: Path) -> CheckpointMeta:
    """A checkpoint's meta.json, typed (any version mim wrote)."""
    return CheckpointMeta.from_json(read_meta(checkpoint))


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's meta.json as written (mim.meta.CheckpointMeta is the typed view)."""
    path = Path(checkpoint) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(
            f"{checkpoint} is not a complete mim checkpoint: cannot read {META_FILE} ({error})"
        ) from None


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    import deepspeed
    import timm
    import webdataset

    import mim

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "deepspeed": deepspeed.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"),
        "mim": getattr(mim, "__version__", "?"),
    }


# ----------------------------------------------------------------------------- per-rank state


def save_rank_state(directory: Path, rank: int, state: dict[str, Any]) -> dict[str, dict]:
    name = f"rank-{rank:05d}.pt"
    return {name: write_summed(directory / name, lambda f: torch.save(state, f))}


def load_rank_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    path = Path(checkpoint) / f"rank-{rank:05d}.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)  # verified with the rest by `newest_intact`


# ----------------------------------------------------------------------------- retain


def prune(run_dir: Path, keep_last: int) -> None:
    """Keeps the newest `keep_last` complete checkpoints and removes leftovers of crashed saves."""
    complete = complete_checkpoints(run_dir)
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINT_DIR
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------- weights only


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 model state dict of a complete checkpoint (official MAE names), verified."""
    path = Path(checkpoint) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {WEIGHTS_FILE}; is it a complete mim checkpoint?")
    verify(checkpoint, [WEIGHTS_FILE, META_FILE])
    return load_file(str(path))


def load_shared(checkpoint: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The shared states `save` wrote under `names` (those the checkpoint has), verified."""
    present = [name for name in names if (Path(checkpoint) / f"{name}.safetensors").is_file()]
    verify(checkpoint, [f"{name}.safetensors" for name in present])
    return {name: load_file(str(Path(checkpoint) / f"{name}.safetensors")) for name in present}


def consolidated_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 model state of a checkpoint, verified: the trained parameters from the ZeRO shards'
    fp32 master copy where there are shards; frozen ones (fixed position embeddings, a probed
    backbone), which ZeRO does not shard, from the checkpoint's own model.safetensors."""
    checkpoint = Path(checkpoint)
    state = load_weights(checkpoint)
    shards = zero_shards(checkpoint)
    if shards:
        verify(checkpoint, [shard.name for shard in shards])
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        master = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        state.update({k: v.float().contiguous() for k, v in master.items()})
    return state
