"""Activation checkpointing of transformer blocks: a checkpointed block keeps only its input for
backward and runs its forward again there (torch's non-reentrant checkpoint, which restores the
RNG state, so dropout and drop path draw the same values and the gradients are the forward's).

`checkpoint_blocks(blocks, every)` turns every `every`-th block of a ModuleList (the first, then
each `every` further) into its checkpointed twin: the same class with a forward that checkpoints
itself, so state-dict names, copies, hooks (DeepSpeed's ZeRO-3 gathering) and compilation see the
same module. Without gradients (evaluation) a block runs as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_TWINS: dict[type, type] = {}


def _twin(cls: type) -> type:
    if getattr(cls, "checkpointed", False):
        return cls
    if cls not in _TWINS:

        def forward(self, *args, **kwargs):
            parent = super(twin, self).forward
            if torch.is_grad_enabled():
                return checkpoint(parent, *args, use_reentrant=False, **kwargs)
            return parent(*args, **kwargs)

        twin = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "checkpointed": True})
        twin.__module__ = cls.__module__
        _TWINS[cls] = twin
    return _TWINS[cls]


def checkpoint_blocks(blocks: nn.ModuleList, every: int) -> int:
    """Checkpoints blocks 0, every, 2 * every, ... (none for 0); returns how many."""
    if every < 0:
        raise ValueError(f"grad_checkpointing must be >= 0 (0: off, k: every k-th block), got {every}")
    if every == 0:
        return 0
    chosen = [block for index, block in enumerate(blocks) if index % every == 0]
    for block in chosen:
        block.__class__ = _twin(type(block))
    return len(chosen)


def checkpointed_blocks(blocks: nn.ModuleList) -> list[int]:
    """The indices of the checkpointed blocks."""
    return [index for index, block in enumerate(blocks) if getattr(type(block), "checkpointed", False)]
