"""Backbones for the evaluation stages and for export: any of our checkpoints, an official MAE
`.pth`, a timm ViT weights file or a mim export, turned into timm's VisionTransformer.

Weights load only through safetensors or `torch.load(weights_only=True)`. The architecture comes
from the checkpoint's own description (mim meta.json / export config.json) or, for foreign files,
from the tensor shapes; explicit overrides win.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from mim import checkpoint
from mim.errors import UserInputError

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
ARCH_KEYS = checkpoint.ARCH_KEYS


@dataclass
class Weights:
    state: dict[str, torch.Tensor]  # encoder weights, timm / official MAE names
    arch: dict[str, Any]  # img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio
    source: str  # what it was, for messages and model cards
    meta: dict[str, Any]
    decoder: dict[str, torch.Tensor]  # decoder weights when the source had them, else empty
    guessed: frozenset[str] = frozenset()  # arch keys not stored in the source (num_heads of a bare file)


class BadCheckpoint(UserInputError):
    pass


# ----------------------------------------------------------------------------- finding weights


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle of arbitrary objects, or not a torch file at all
        raise BadCheckpoint(
            f"{path} is not a weights file that loads safely (weights_only): {error}"
        ) from None
    if isinstance(loaded, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BadCheckpoint(f"{path} holds no state dict (expected a dict of tensors, or one under 'model')")
    return loaded


def _split_known_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our linear-probe checkpoints keep the encoder under `backbone.`; DDP ones under `module.`."""
    for prefix in ("backbone.", "module."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def infer_arch(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
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
    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64)),
        "mlp_ratio": mlp_ratio,
    }


def _from_mim_checkpoint(path: Path) -> Weights:
    meta = checkpoint.read_meta(path)
    state = checkpoint.load_weights(path)
    arch, _ = checkpoint.architecture(meta)
    state = _split_known_prefixes(state)
    return _weights(state, arch, f"mim {meta.get('stage')} checkpoint {path}", meta)


def _weights(state: dict, arch: dict, source: str, meta: dict) -> Weights:
    decoder = {k: v for k, v in state.items() if k.startswith(ENCODER_DROP_PREFIXES)}
    encoder = {k: v for k, v in state.items() if not k.startswith(ENCODER_DROP_PREFIXES)}
    return Weights(encoder, arch, source, meta, decoder)


def load_weights(spec: str) -> Weights:
    """A mim run dir (newest complete checkpoint), a mim checkpoint dir, a mim export dir, an
    official MAE .pth, or a .safetensors/.pth of timm ViT weights."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"init.from: {path} does not exist")
    if path.is_dir():
        if checkpoint.is_mim_checkpoint(path):
            return _from_mim_checkpoint(checkpoint.resolve(path))
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return _from_export(path)
        raise BadCheckpoint(f"{path} is neither a mim run dir, a mim checkpoint, nor a mim export")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        if (path.parent / "config.json").is_file() and path.name == "model.safetensors":
            return _from_export(path.parent)
    else:
        state = _torch_file(path)
    state = _split_known_prefixes(state)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    weights = _weights(state, infer_arch(state, str(path)), f"weights file {path}", {})
    if weights.arch["embed_dim"] not in HEADS_BY_WIDTH:
        log.warning(
            "%s: num_heads is not stored in the file; guessed %d (64 channels per head): set "
            "model.num_heads if that is wrong",
            path,
            weights.arch["num_heads"],
        )
    weights.guessed = frozenset({"num_heads"})
    return weights


def _from_export(directory: Path) -> Weights:
    config = json.loads((directory / "config.json").read_text())
    arch = {k: config["model_args"][k] for k in ARCH_KEYS}
    state = load_file(str(directory / "model.safetensors"))
    decoder_file = directory / "decoder.safetensors"
    weights = _weights(state, arch, f"mim export {directory}", config)
    if decoder_file.is_file():
        weights.decoder = load_file(str(decoder_file))
    return weights


# ----------------------------------------------------------------------------- timm models


def timm_name(arch: dict[str, Any]) -> str:
    return TIMM_NAMES.get((arch["embed_dim"], arch["depth"], arch["patch_size"]), "vit_base_patch16_224")


def timm_args(arch: dict[str, Any]) -> dict[str, Any]:
    """Everything timm needs to rebuild our encoder, whatever the registered name's defaults."""
    return {k: arch[k] for k in ARCH_KEYS}


def create_vit(
    arch: dict[str, Any], num_classes: int, global_pool: str, fc_norm: bool, drop_path: float = 0.0
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
