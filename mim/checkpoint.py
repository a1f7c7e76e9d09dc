"""The one module that knows the checkpoint layout.

    RUN_DIR/checkpoints/step-00001000/      one complete checkpoint
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (engine.save_checkpoint)
        rank-00000.pt                            per-rank RNG states and data-stream positions
        model.safetensors                        the model's weights in fp32 (official MAE names)
        meta.json                                step, config, model, versions, git sha (written last)
    RUN_DIR/checkpoints/.tmp-step-00001000/  a checkpoint being written; never loaded

A checkpoint is written under a temporary name on every rank and renamed by rank 0 once all
ranks are done, so a directory named step-* is complete; `meta.json` inside it is the validity
marker. The last K complete checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mim.errors import TrainingStopped, UserInputError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


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


def read_meta(checkpoint: Path) -> dict[str, Any]:
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


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(directory: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, directory / f"rank-{rank:05d}.pt")


def load_rank_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    path = Path(checkpoint) / f"rank-{rank:05d}.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- save / retain


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    barrier: Any,
) -> Path:
    """Saves a complete checkpoint; every rank calls it. Returns the final directory. A failed
    write (disk full, quota) leaves the previous checkpoints as they were."""
    root = Path(run_dir) / CHECKPOINT_DIR
    temporary = root / temporary_name(step)
    final = root / step_name(step)
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=temporary.name, save_latest=False)
        save_rank_state(temporary, rank, rank_state)
        if rank == 0:
            weights = {
                k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()
            }
            save_file(weights, str(temporary / WEIGHTS_FILE))
            meta = dict(meta, step=step, versions=versions(), git_sha=git_sha())
            (temporary / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
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
    """The fp32 model state dict of a complete checkpoint (official MAE names)."""
    path = Path(checkpoint) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {WEIGHTS_FILE}; is it a complete mim checkpoint?")
    return load_file(str(path))
