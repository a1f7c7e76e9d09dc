"""A ViT's architecture as it crosses files: checkpoints' meta.json (`model.arch`, `backbone.arch`),
exports' config.json, the classifier stages' model.* and timm's keyword arguments (`**arch`). A
typed dict, not a class, because it is all of those one-to-one; `ARCH_KEYS` are the keys a
backbone must agree on to be loaded."""

from __future__ import annotations

from typing import TypedDict


class ViTArch(TypedDict):
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qk_norm: bool  # LayerNorm on each head's queries and keys (timm's qk_norm)


class MaeArch(ViTArch):
    """The MAE of pretraining: the encoder's shape, its decoder's, and the pixel loss."""

    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    norm_pix_loss: bool


ARCH_KEYS = tuple(ViTArch.__annotations__)
ARCH_DEFAULTS = {"qk_norm": False}  # what files written before a key existed meant


def read_arch(tree: dict) -> ViTArch:
    """A ViT's architecture from a file's tree (or a caller's dict), keys it predates taking their
    ARCH_DEFAULTS."""
    return {
        key: tree[key] if key in tree else ARCH_DEFAULTS[key]
        for key in ARCH_KEYS
        if key in tree or key in ARCH_DEFAULTS
    }
