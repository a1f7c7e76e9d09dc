"""Parameter groups: no weight decay on norms, biases, tokens and position embeddings; optional
layer-wise lr decay carried as each group's `lr_scale` and applied by `schedule.apply_lr`."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

NO_DECAY_NAMES = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "dist_token", "reg_token"}


def takes_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim > 1 and not name.endswith(".bias") and name.split(".")[-1] not in NO_DECAY_NAMES


def vit_layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_layers + 1 for everything after the blocks."""
    if name in ("cls_token", "pos_embed", "dist_token", "reg_token") or name.startswith("patch_embed"):
        return 0
    match = re.match(r"^(?:backbone\.)?blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith("backbone.") and vit_layer_id(name[len("backbone.") :], num_layers) == 0:
        return 0
    return num_layers + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    num_layers: int = 0,
    layer_id: Callable[[str, int], int] = vit_layer_id,
) -> list[dict]:
    """Groups keyed by (decay?, layer); each carries `lr_scale` = layer_decay ** (num_layers + 1 - layer)."""
    groups: dict[tuple[bool, int], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = takes_weight_decay(name, parameter)
        layer = layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (decay, layer),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[key] for key in sorted(groups)]
