"""A backbone's weights from anything `init.from` takes: a mim run dir or checkpoint (through the
checkpoint format), a mim export, an official MAE `.pth`, or a timm ViT weights file.

Weights load only through safetensors or `torch.load(weights_only=True)`. The architecture comes
from the source's own description (mim meta.json / export config.json) or, for foreign files,
from the tensor shapes; explicit overrides win.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mim import checkpoint
from mim.config import ConfigError
from mim.meta import CheckpointMeta
from mim.models.arch import ViTArch, read_arch
from mim.models.backbone import ENCODER_DROP_PREFIXES, HEADS_BY_WIDTH, BadCheckpoint, Weights, infer_arch
from mim.models.finetuning import from_description

log = logging.getLogger(__name__)


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


def _from_mim_checkpoint(path: Path) -> Weights:
    meta = checkpoint.load_meta(path)
    state = checkpoint.load_weights(path)
    arch, _ = meta.architecture()
    if meta.trained_only:
        state = from_description(meta.extra["finetune"]).merge(with_backbone(state, meta, path))
    state = _split_known_prefixes(state)
    weights = _weights(state, arch, f"mim {meta.stage} checkpoint {path}", checkpoint.read_meta(path))
    weights.path = str(path.resolve())
    return weights


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values: what a checkpoint of trained
    weights alone records of the backbone it adapts."""
    summed = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        summed.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        summed.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return summed.hexdigest()


def backbone_reference(weights: Weights, dropped: list[str]) -> dict[str, Any]:
    """What a checkpoint of trained weights alone records of its backbone: where it was read, its
    digest, and the backbone's keys the fine-tuned model does not have (`dropped`)."""
    return {"path": weights.path, "sha256": digest(weights.state), "dropped": sorted(dropped)}


def check_backbone(recorded: dict[str, Any], weights: Weights, what: str) -> None:
    """ConfigError unless `weights` are the backbone `recorded` (backbone_reference) names."""
    found = digest(weights.state)
    if found != recorded.get("sha256"):
        raise ConfigError(
            f"{what} holds trained weights for the backbone {recorded.get('path')} (sha256 "
            f"{str(recorded.get('sha256'))[:12]}...), but the backbone read now, {weights.source}, "
            f"differs (sha256 {found[:12]}...): it moved or changed. Point init.from at the "
            "backbone the run started from"
        )


def with_backbone(
    trained: dict[str, torch.Tensor], meta: CheckpointMeta, where: Path
) -> dict[str, torch.Tensor]:
    """A checkpoint of trained weights alone (`meta.trained_only`) completed with the frozen
    weights of the backbone it records, checked against its sha256."""
    recorded = (meta.backbone or {}).get("reference") or {}
    path = recorded.get("path")
    if not path or not Path(path).exists():
        raise ConfigError(
            f"{where} holds only the weights a fine-tune trained; the backbone they adapt, "
            f"{path or '(none recorded)'}, is not there"
        )
    backbone = load_weights(path)
    check_backbone(recorded, backbone, str(where))
    dropped = set(recorded.get("dropped", []))
    return {**{k: v for k, v in backbone.state.items() if k not in dropped}, **trained}


def _weights(state: dict, arch: ViTArch, source: str, meta: dict) -> Weights:
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
    weights = _from_file(path)
    weights.path = str(path.resolve())
    return weights


def _from_file(path: Path) -> Weights:
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        if (path.parent / "config.json").is_file() and path.name == "model.safetensors":
            return _from_export(path.parent)
    else:
        state = _torch_file(path)
    state = _split_known_prefixes(state)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    weights = _weights(state, infer_arch(state, str(path)), f"weights file {path}", {})
    if weights.arch["embed_dim"] not in HEADS_BY_WIDTH and not weights.arch["qk_norm"]:
        log.warning(
            "%s: num_heads is not stored in the file; guessed %d (64 channels per head): set "
            "model.num_heads if that is wrong",
            path,
            weights.arch["num_heads"],
        )
    weights.guessed = (
        frozenset() if weights.arch["qk_norm"] else frozenset({"num_heads"})
    )  # q_norm's width tells
    return weights


def _from_export(directory: Path) -> Weights:
    config = json.loads((directory / "config.json").read_text())
    arch = read_arch(config["model_args"])
    state = load_file(str(directory / "model.safetensors"))
    decoder_file = directory / "decoder.safetensors"
    weights = _weights(state, arch, f"mim export {directory}", config)
    weights.path = str(directory.resolve())
    if decoder_file.is_file():
        weights.decoder = load_file(str(decoder_file))
    return weights
