"""Registered MAE variants. A variant is a function returning its architecture arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mim.models.mae import MaskedAutoencoderViT

_VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {}
OBJECTIVE_KEYS = ("pred_dim", "global_dim")  # set by the objective (target.*), not by the variant
ARCH_KEYS = tuple(
    k for k in inspect.signature(MaskedAutoencoderViT.__init__).parameters if k not in OBJECTIVE_KEYS
)[1:]


def register_model(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    _VARIANTS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_VARIANTS)


def model_args(name: str, **overrides: Any) -> dict[str, Any]:
    """The full architecture of variant `name` with `overrides` (None values ignored)."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    unknown = set(overrides) - set(ARCH_KEYS)
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; allowed: {', '.join(ARCH_KEYS)}")
    defaults = dict(inspect.signature(MaskedAutoencoderViT.__init__).parameters)
    args = {key: defaults[key].default for key in ARCH_KEYS}
    args.update(_VARIANTS[name]())
    args.update({key: value for key, value in overrides.items() if value is not None})
    return args


def create_model(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**model_args(name, **overrides))


_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


@register_model
def mae_vit_base_patch16() -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_PAPER_DECODER)


@register_model
def mae_vit_large_patch16() -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_PAPER_DECODER)


@register_model
def mae_vit_huge_patch14() -> dict[str, Any]:
    return dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_PAPER_DECODER)


@register_model
def mae_vit_giant_patch14() -> dict[str, Any]:
    """ViT-g/14, about 1.0B encoder parameters: Zhai et al., Scaling Vision Transformers (2022),
    Table 2 (width 1408, depth 40, MLP 6144, 16 heads); timm's vit_giant_patch14_224."""
    return dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, **_PAPER_DECODER)


# The Web-SSL family: Fan et al., Scaling Language-Free Visual Representation Learning (2025,
# arXiv 2504.01017), MAE and DINOv2 ViTs of 1B to 7B trained on MetaCLIP's 2B images; widths,
# depths and heads as in its released code (github.com/facebookresearch/webssl, vit_1b to vit_7b
# in dinov2/vision_transformer.py, the MAE encoders in mae/mae.py), MLP 4x, patch 14. The decoder
# is MAE's.
WEB_SSL = {  # name -> (width, depth, heads)
    "mae_vit_1b_patch14": (1536, 40, 24),
    "mae_vit_2b_patch14": (2688, 24, 21),
    "mae_vit_3b_patch14": (3072, 26, 24),
    "mae_vit_5b_patch14": (3584, 32, 28),
    "mae_vit_7b_patch14": (4096, 32, 32),
}


def _web_ssl(embed_dim: int, depth: int, num_heads: int) -> Callable[[], dict[str, Any]]:
    return lambda: dict(
        patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **_PAPER_DECODER
    )


for _name, _shape in WEB_SSL.items():
    _VARIANTS[_name] = _web_ssl(*_shape)


@register_model
def mae_vit_small_patch16() -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_PAPER_DECODER)


@register_model
def mae_vit_tiny_patch16() -> dict[str, Any]:
    return dict(
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    )


@register_model
def mae_vit_demo_patch4() -> dict[str, Any]:
    """CPU-sized: 28x28 grey images (Fashion-MNIST), 49 patches of 4x4."""
    return dict(
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=192,
        depth=6,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_pix_loss=True,
    )


@register_model
def mae_vit_debug() -> dict[str, Any]:
    """For tests: tiny and fast."""
    return dict(
        img_size=32,
        patch_size=8,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )


@register_model
def mae_vit_demo_patch7() -> dict[str, Any]:
    """The CPU demo's model: 28x28 grey images, 16 patches of 7x7, 4 blocks 128 wide."""
    return dict(
        img_size=28,
        patch_size=7,
        in_chans=1,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_pix_loss=True,
    )
