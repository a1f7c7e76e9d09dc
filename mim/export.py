"""Backbones for downstream teams: `model.safetensors` in timm's key layout (encoder only),
`config.json` (timm architecture and arguments, preprocessing), `README.md` (a model card with
provenance), and optionally `decoder.safetensors` for continued pretraining.

A parameter-efficient fine-tune (`finetune.method`, mim.models.finetuning) exports its trained
weights alone as `adapter.safetensors` with `adapter.json` (the method, the classifier, the
backbone they adapt and its sha256), which `load_adapted` puts back on the backbone; where the
method merges (lora, last_blocks), also the merged plain timm weights as above.

ZeRO-sharded checkpoints are consolidated to fp32 from their optimizer shards first (DeepSpeed's
zero_to_fp32), so the export holds the master weights, not a bf16 copy."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mim import checkpoint
from mim.config import ConfigError
from mim.errors import UserInputError
from mim.files import atomic_path
from mim.meta import CheckpointMeta
from mim.model_card import CardInfo, model_card
from mim.models.arch import ViTArch
from mim.models.backbone import ENCODER_DROP_PREFIXES, timm_args, timm_name
from mim.models.classifier import build_finetune_vit
from mim.models.finetuning import from_description
from mim.weights import check_backbone, load_weights, with_backbone

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
log = logging.getLogger(__name__)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(encoder in timm names without any classifier head, decoder) of a stage's model state (a
    linear probe's backbone is under `backbone.`)."""
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    decoder = {k: v for k, v in state.items() if k.startswith(ENCODER_DROP_PREFIXES)}
    encoder = {
        k: v
        for k, v in state.items()
        if not k.startswith(ENCODER_DROP_PREFIXES) and not k.startswith("head.")
    }
    return encoder, decoder


def timm_config(arch: ViTArch, global_pool: str, mean: list[float], std: list[float]) -> dict[str, Any]:
    channels = arch["in_chans"]
    model_args = dict(timm_args(arch), global_pool=global_pool)
    return {
        "architecture": timm_name(arch),
        "num_classes": 0,
        "num_features": arch["embed_dim"],
        "global_pool": global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [channels, arch["img_size"], arch["img_size"]],
            "mean": (mean * channels)[:channels] if len(mean) == 1 else mean,
            "std": (std * channels)[:channels] if len(std) == 1 else std,
            "num_classes": 0,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def export(
    spec: str,
    out_dir: Path,
    dtype: str = "fp32",
    with_decoder: bool = False,
    adapter_only: bool = False,
    card: CardInfo | None = None,
) -> list[str]:
    """Writes the export of a run or checkpoint into `out_dir`; returns the files written. `card`:
    what the model card adds (the data's name, the licence, evaluation runs)."""
    if dtype not in ("fp32", "bf16"):
        raise UserInputError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    source = checkpoint.resolve(spec)
    meta = checkpoint.load_meta(source)
    state = checkpoint.consolidated_weights(source)
    if adapter_only and not meta.trained_only:
        raise UserInputError(
            f"--adapter-only: {source} is not a parameter-efficient fine-tune (finetune.method), "
            "it holds every weight"
        )
    written = []
    if meta.trained_only:
        written += _export_adapter(state, meta, source, out_dir)
        method = from_description(meta.extra["finetune"])
        if adapter_only:
            return written
        if not method.mergeable:
            try:
                method.merge(state)
            except ConfigError as error:
                log.warning("no merged model.safetensors: %s", error)
            return written
        state = method.merge(with_backbone(state, meta, source))
    encoder, decoder = split_state(state)
    if with_decoder and not decoder:
        raise UserInputError(f"{source} is a {meta.stage} checkpoint: it has no decoder to export")
    arch, global_pool = meta.architecture()
    run_config = meta.config.get("data", {})
    config = timm_config(
        arch,
        global_pool,
        run_config.get("mean", [0.485, 0.456, 0.406]),
        run_config.get("std", [0.229, 0.224, 0.225]),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "mim_stage": meta.stage, "architecture": config["architecture"]}
    for name, part in (("model", encoder), ("decoder", decoder if with_decoder else None)):
        if part is not None:
            _atomic_safetensors(_cast(part, dtype), out_dir / f"{name}.safetensors", metadata)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "README.md").write_text(
        model_card(config, meta, source, dtype, with_decoder, card or CardInfo())
    )
    extra = ["decoder.safetensors"] if with_decoder else []
    return list(dict.fromkeys([*written, "model.safetensors", *extra, "config.json", "README.md"]))


def _cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {k: v.to(cast).contiguous() for k, v in state.items()}


def _export_adapter(
    state: dict[str, torch.Tensor], meta: CheckpointMeta, source: Path, out_dir: Path
) -> list[str]:
    """adapter.safetensors (the trained weights, the head included) and adapter.json."""
    arch, global_pool = meta.architecture()
    description = {
        "method": meta.extra["finetune"],
        "arch": arch,
        "num_classes": meta.extra.get("num_classes"),
        "global_pool": global_pool,
        "backbone": meta.backbone["reference"],
        "exported_from": str(source),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "mim_stage": meta.stage, "method": meta.extra["finetune"]["method"]}
    _atomic_safetensors({k: v.contiguous() for k, v in state.items()}, out_dir / ADAPTER_FILE, metadata)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(description, indent=1))
    (out_dir / "README.md").write_text(adapter_card(description))  # a merged export's card replaces it
    return [ADAPTER_FILE, ADAPTER_CONFIG, "README.md"]


def adapter_card(description: dict[str, Any]) -> str:
    method = description["method"]
    options = ", ".join(f"{k} {v}" for k, v in method.items() if k != "method") or "none"
    return (
        "\n".join(
            [
                f"# {method['method']} fine-tune (mim adapter weights)",
                "",
                "The trained weights alone (the head included); the backbone's frozen weights are not here.",
                "Put them back on the backbone they were trained on (checked by its sha256) with mim:",
                "",
                "```python",
                "from mim.export import load_adapted",
                "model = load_adapted(BACKBONE, 'THIS_DIR')  # BACKBONE: the pretraining run, checkpoint or export",
                "```",
                "",
                f"- method: {method['method']} ({options})",
                f"- classes: {description['num_classes']}, pooling: {description['global_pool']}",
                f"- backbone: `{description['backbone']['path']}` (sha256 {description['backbone']['sha256']})",
            ]
        )
        + "\n"
    )


def load_adapted(backbone: str, adapter_dir: str | Path) -> torch.nn.Module:
    """The fine-tuned classifier (eval mode) of an adapter export: `backbone` (anything init.from
    takes: the pretraining run, its checkpoint or export) with the method's modules and trained
    weights from `adapter_dir`. The backbone must be the one the adapter was trained on (sha256)."""
    adapter_dir = Path(adapter_dir)
    files = [adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_FILE]
    if not all(path.is_file() for path in files):
        raise UserInputError(
            f"{adapter_dir} is not an adapter export: expected {ADAPTER_CONFIG} and {ADAPTER_FILE} "
            "(mim export of a fine-tune with finetune.method other than full)"
        )
    try:
        description = json.loads(files[0].read_text())
        trained_state = load_file(str(files[1]))
    except (ValueError, OSError, SafetensorError) as error:  # a damaged JSON or safetensors file
        raise UserInputError(f"{adapter_dir}: cannot read the adapter export: {error}") from None
    weights = load_weights(backbone)
    check_backbone(description["backbone"], weights, str(adapter_dir))
    model, _ = build_finetune_vit(
        description["arch"], weights, description["num_classes"], description["global_pool"], 0.0
    )
    from_description(description["method"]).apply(model)
    result = model.load_state_dict(trained_state, strict=False)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if result.unexpected_keys or trained & set(result.missing_keys):
        raise UserInputError(
            f"{adapter_dir / ADAPTER_FILE} does not fit the adapted model: missing "
            f"{sorted(trained & set(result.missing_keys))[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def _atomic_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
