"""A backbone's weights from anything `init.from` takes: a mim run dir or checkpoint (through the
checkpoint format), a mim export, an official MAE `.pth`, or a timm ViT weights file.

Weights load only through safetensors or `torch.load(weights_only=True)`. The architecture comes
from the source's own description (mim meta.json / export config.json) or, for foreign files,
from the tensor shapes; explicit overrides win.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from mim import checkpoint
from mim.models.arch import ARCH_KEYS, ViTArch
from mim.models.backbone import ENCODER_DROP_PREFIXES, HEADS_BY_WIDTH, BadCheckpoint, Weights, infer_arch

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
    state = _split_known_prefixes(state)
    return _weights(state, arch, f"mim {meta.stage} checkpoint {path}", checkpoint.read_meta(path))


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
