"""Backbones for downstream teams: `model.safetensors` in timm's key layout (encoder only),
`config.json` (timm architecture and arguments, preprocessing), `README.md` (a model card with
provenance), and optionally `decoder.safetensors` for continued pretraining.

ZeRO-sharded checkpoints are consolidated to fp32 from their optimizer shards first (DeepSpeed's
zero_to_fp32), so the export holds the master weights, not a bf16 copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mim import checkpoint
from mim.errors import UserInputError
from mim.files import atomic_path
from mim.meta import CheckpointMeta
from mim.models.arch import ViTArch
from mim.models.backbone import ENCODER_DROP_PREFIXES, timm_args, timm_name


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


def model_card(
    config: dict[str, Any], meta: CheckpointMeta, source: Path, dtype: str, with_decoder: bool
) -> str:
    run_config, extra = meta.config, meta.extra
    metrics = extra.get("metrics") or {}
    evaluation = f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}" if metrics else "none"
    lines = [
        f"# {config['architecture']} (mim {meta.stage} backbone)",
        "",
        "Load with timm (no mim needed):",
        "",
        "```python",
        "import json, timm",
        "config = json.load(open('config.json'))",
        "model = timm.create_model(config['architecture'], pretrained=True, num_classes=0, **config['model_args'],",
        "                          pretrained_cfg_overlay=dict(config['pretrained_cfg'], file='model.safetensors'))",
        "```",
        "",
        "| provenance | |",
        "|---|---|",
        f"| exported from | `{source}` |",
        f"| stage | {meta.stage} |",
        f"| training data | `{meta.data.get('train')}` ({meta.data.get('num_samples')} samples) |",
        f"| steps | {meta.step} |",
        f"| samples seen | {meta.samples_seen} |",
        f"| final training loss | {meta.last_loss} |",
        f"| norm-pix loss | {extra.get('norm_pix_loss', run_config.get('model', {}).get('norm_pix_loss'))} |",
        f"| mask ratio | {run_config.get('model', {}).get('mask_ratio')} |",
        f"| evaluation | {evaluation} |",
        f"| weights dtype | {dtype} |",
        f"| decoder | {'decoder.safetensors' if with_decoder else 'not exported'} |",
        f"| git sha | {extra.get('git_sha')} |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in extra.get('versions', {}).items())} |",
    ]
    return "\n".join(lines) + "\n"


def export(spec: str, out_dir: Path, dtype: str = "fp32", with_decoder: bool = False) -> Path:
    if dtype not in ("fp32", "bf16"):
        raise UserInputError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    source = checkpoint.resolve(spec)
    meta = checkpoint.load_meta(source)
    encoder, decoder = split_state(checkpoint.consolidated_weights(source))
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
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "mim_stage": meta.stage, "architecture": config["architecture"]}
    _atomic_safetensors(
        {k: v.to(cast).contiguous() for k, v in encoder.items()}, out_dir / "model.safetensors", metadata
    )
    if with_decoder:
        _atomic_safetensors(
            {k: v.to(cast).contiguous() for k, v in decoder.items()},
            out_dir / "decoder.safetensors",
            metadata,
        )
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "README.md").write_text(model_card(config, meta, source, dtype, with_decoder))
    return out_dir


def _atomic_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
