"""The global RNGs of a run's process (torch's, Python's, numpy's): seeded from `run.seed`, and
their state as a rank part of a checkpoint, so that what a run draws from them (drop path, mixup,
random erasing) repeats with the seed and continues on resume."""

from __future__ import annotations

import random
from typing import Any

import numpy
import torch


def seed_rngs(seed: int) -> None:
    """The global RNGs (torch's, Python's, numpy's) from a run's seed: what a run draws from them
    (drop path, mixup, random erasing) repeats with the seed; a checkpoint keeps their state."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": _numpy_rng(),  # timm's mixup and cutmix draw from numpy's global RNG
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "numpy" in state:  # checkpoints before it was kept resume without it
        numpy_state = state["numpy"]
        numpy.random.set_state(
            (
                "MT19937",
                numpy_state["keys"].numpy().astype(numpy.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["gauss"],
            )
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_rng() -> dict[str, Any]:
    """numpy's global Mersenne Twister state in types the safe loader (weights_only) reads."""
    _, keys, pos, has_gauss, gauss = numpy.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(numpy.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
