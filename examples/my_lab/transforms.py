"""A model transform of our own: freeze the patch embedding (a common trick for stable large-model
training, MoCo v3), applied by name once the model is built.

    mim pretrain --config pretrain/debug 'model.transforms=[my_lab.transforms:freeze_patch_embed]'
"""

from __future__ import annotations

from typing import Any

from torch import nn


def freeze_patch_embed(model: nn.Module, config: Any) -> None:
    model.patch_embed.requires_grad_(False)
