"""Backbones for the evaluation stages and for export: a backbone's weights (`Weights`, read from
any source by mim.weights) turned into timm's VisionTransformer; the architecture from tensor
shapes where a file does not say it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from mim.errors import UserInputError
from mim.models.arch import ViTArch, read_arch

log = logging.getLogger(__name__)
ENCODER_DROP_PREFIXES = ("decoder_", "mask_token", "global_head")  # pretraining-only parts
HEADS_BY_WIDTH = {  # the registered variants' heads (mim.models.registry)
    **{192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16},
    **{1536: 24, 2688: 21, 3072: 24, 3584: 28, 4096: 32},
}
TIMM_NAMES = {  # (embed_dim, depth, patch) -> a timm architecture of that shape
    (192, 12, 16): "vit_tiny_patch16_224",
    (384, 12, 16): "vit_small_patch16_224",
    (768, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 14): "vit_huge_patch14_224",
    (1408, 40, 14): "vit_giant_patch14_224",
}


@dataclass
class Weights:
    state: dict[str, torch.Tensor]  # encoder weights, timm / official MAE names
    arch: ViTArch
    source: str  # what it was, for messages and model cards
    meta: dict[str, Any]
    decoder: dict[str, torch.Tensor]  # decoder weights when the source had them, else empty
    guessed: frozenset[str] = frozenset()  # arch keys not stored in the source (num_heads of a bare file)
    path: str = ""  # the file or checkpoint directory it was read from, resolved (a run dir's newest)


class BadCheckpoint(UserInputError):
    pass


# ----------------------------------------------------------------------------- shapes


def infer_arch(state: dict[str, torch.Tensor], source: str) -> ViTArch:
    """The ViT geometry from tensor shapes (num_heads by the usual width -> heads table)."""
    try:
        proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
        embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    except (KeyError, ValueError) as error:
        raise BadCheckpoint(
            f"{source} does not hold a ViT encoder (missing {error}); expected official MAE / "
            "timm names such as patch_embed.proj.weight, pos_embed, blocks.0.*"
        ) from None
    q_norm = state.get("blocks.0.attn.q_norm.weight")  # one head's width: the heads are known
    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": embed_dim // q_norm.shape[0]
        if q_norm is not None
        else HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64)),
        "mlp_ratio": mlp_ratio,
        "qk_norm": q_norm is not None,
    }


# ----------------------------------------------------------------------------- timm models


def timm_name(arch: ViTArch) -> str:
    return TIMM_NAMES.get((arch["embed_dim"], arch["depth"], arch["patch_size"]), "vit_base_patch16_224")


def timm_args(arch: ViTArch) -> dict[str, Any]:
    """Everything timm needs to rebuild our encoder, whatever the registered name's defaults."""
    return dict(read_arch(arch))


def create_vit(
    arch: ViTArch, num_classes: int, global_pool: str, fc_norm: bool, drop_path: float = 0.0
) -> nn.Module:
    return timm.create_model(
        timm_name(arch),
        pretrained=False,
        num_classes=num_classes,
        global_pool=global_pool,
        fc_norm=fc_norm,
        drop_path_rate=drop_path,
        **timm_args(arch),
    )


def load_encoder(
    model: nn.Module, weights: Weights, allowed_missing: set[str], allowed_unexpected: set[str]
) -> dict[str, list[str]]:
    """Loads `weights` into a timm ViT; the missing/unexpected keys must be exactly the allowed
    ones (a head the stage adds, a norm it drops), anything else is a clear error."""
    state = dict(weights.state)
    target_pos = model.pos_embed
    if "pos_embed" in state and state["pos_embed"].shape != target_pos.shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise BadCheckpoint(f"{weights.source} does not fit the model: {error}") from None
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    if missing - allowed_missing or unexpected - allowed_unexpected:
        raise BadCheckpoint(
            f"{weights.source} does not match the model: missing {sorted(missing - allowed_missing)}, "
            f"unexpected {sorted(unexpected - allowed_unexpected)}"
        )
    return {"missing": sorted(missing), "unexpected": sorted(unexpected)}


def adapt_patch_embedding(weight: torch.Tensor, bands: int) -> torch.Tensor:
    """A patch embedding (D, C, p, p) for images of C bands made to take `bands` bands: each band's
    filter is the mean of the C filters times C / bands, so an image that is the same in every band
    embeds as it did (grey in RGB weights, say); the bands are told apart by training."""
    return (weight.mean(1, keepdim=True) * (weight.shape[1] / bands)).expand(-1, bands, -1, -1).contiguous()
