"""Model transforms: changes applied by name to a freshly built model, before its weights are
loaded into the engine and its param groups are made (activation checkpointing today; adapters
for parameter-efficient fine-tuning next). A transform is a function `(model, config) -> None`
that changes the model in place; `config` is the run's whole config.

`model.grad_checkpointing` applies the registered `grad_checkpointing` transform; `model.transforms`
lists more, by registered name or as `package.module:function` (docs/extending.md)."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from mim.models.checkpointing import checkpoint_blocks
from mim.registry import Registry

log = logging.getLogger(__name__)
TRANSFORMS = Registry("model transform", "model.transforms")


@TRANSFORMS.register("grad_checkpointing")
def grad_checkpointing(model: nn.Module, config: Any) -> None:
    """Activation checkpointing of every `model.grad_checkpointing`-th block of the encoder (and
    of the decoder, where the model has one)."""
    for name in ("blocks", "decoder_blocks"):
        blocks = getattr(model, name, None)
        if blocks is not None:
            checkpoint_blocks(blocks, config.model.grad_checkpointing)


def transforms_of(config: Any) -> list[str]:
    """The transforms a config asks for, in the order they apply."""
    model = config.model
    wanted = ["grad_checkpointing"] if getattr(model, "grad_checkpointing", 0) else []
    return wanted + list(getattr(model, "transforms", []))


def apply_transforms(model: nn.Module, config: Any) -> list[str]:
    """Applies the config's transforms to `model`; returns their names."""
    names = transforms_of(config)
    for name in names:
        TRANSFORMS.get(name)(model, config)
    if names:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("model transforms %s: %d of %d parameters trainable", ", ".join(names), trainable, total)
    return names
