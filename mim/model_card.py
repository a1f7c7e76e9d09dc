"""The model card of an export: README.md in the folder, which the Hugging Face Hub shows and reads.
Its YAML header carries what the Hub indexes (`library_name: timm`, tags, the licence, the
pretraining data, and the evaluations of the backbone where runs of them are given); its text
says how to load the folder with timm in one line, what the model is by its shape, and where it
came from. It names nothing of the machine that made it: runs and data by their names, never by
absolute paths."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mim.errors import UserInputError
from mim.meta import CheckpointMeta
from mim.models.arch import ViTArch

TAGS = ["image-feature-extraction", "timm", "mim", "mae", "masked-image-modeling", "vision-transformer"]
# what each evaluation stage's metrics.json reports on data.val ("test"), as the Hub names it
EVALUATIONS = {
    "linprobe": ("image-classification", "Linear probe", "accuracy", "top1", "top-1"),
    "finetune": ("image-classification", "Fine-tuning", "accuracy", "top1", "top-1"),
    "segprobe": ("image-segmentation", "Segmentation probe", "mean_iou", "miou", "mIoU"),
}


@dataclass
class CardInfo:
    """What the person exporting adds: the data's name (default: the training shards' folder), the
    licence (a Hub licence key), and evaluation runs of this backbone (their metrics.json)."""

    dataset: str | None = None
    license: str = "other"
    results: list[Path] = field(default_factory=list)


def shape_name(arch: ViTArch) -> str:
    channels = arch["in_chans"]
    return (
        f"ViT, {arch['embed_dim']} wide, {arch['depth']} blocks, {arch['num_heads']} heads, "
        f"{arch['patch_size']} px patches at {arch['img_size']} px, {channels} channel{'s' * (channels != 1)}"
        + (", query/key norm" if arch.get("qk_norm") else "")
    )


def data_name(train: Any) -> str:
    """The training data by its name: the shards' folder (not the path to it)."""
    spec = str(train or "unknown").split("::")[0].rstrip("/")
    path = PurePosixPath(spec)
    if "{" in path.name or path.name.endswith((".tar", ".json")):
        path = path.parent
    return path.name or "unknown"


def run_name(source: Path) -> str:
    """A checkpoint as RUN/checkpoints/step-N (names only)."""
    source = Path(source)
    if source.parent.name == "checkpoints":
        return f"{source.parent.parent.name}/checkpoints/{source.name}"
    return source.name


def read_results(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Each evaluation run's figure on its data.val, from its metrics.json."""
    results = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise UserInputError(
                f"--results {run_dir}: no metrics.json there (expected a linprobe, finetune or segprobe run dir)"
            )
        metrics = json.loads(path.read_text())
        stage, test = metrics.get("stage"), metrics.get("test")
        if stage not in EVALUATIONS or not test:
            raise UserInputError(
                f"--results {run_dir}: {path} holds no data.val figure of a linprobe, finetune or segprobe run "
                f"(stage {stage!r}); has the run evaluated yet?"
            )
        task, name, metric, key, label = EVALUATIONS[stage]
        config_file = Path(run_dir) / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        results.append(
            {
                "task": task,
                "name": name,
                "metric": metric,
                "label": label,
                "value": round(float(test[key]), 2),
                "num_samples": test.get("num_samples"),
                "dataset": data_name(config.get("data", {}).get("val")),
                "run": Path(run_dir).name,
            }
        )
    return results


def hub_metadata(
    arch: ViTArch, info: CardInfo, dataset: str, results: list[dict[str, Any]]
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-feature-extraction",
        "license": info.license,
        "tags": TAGS,
        "datasets": [dataset],
    }
    if results:
        metadata["model-index"] = [
            {
                "name": shape_name(arch),
                "results": [
                    {
                        "task": {"type": r["task"], "name": r["name"]},
                        "dataset": {"name": r["dataset"], "type": r["dataset"]},
                        "metrics": [{"type": r["metric"], "value": r["value"], "name": r["label"]}],
                    }
                    for r in results
                ],
            }
        ]
    return metadata


def model_card(
    config: dict[str, Any], meta: CheckpointMeta, source: Path, dtype: str, with_decoder: bool, info: CardInfo
) -> str:
    arch, run_config, extra = config["model_args"], meta.config, meta.extra
    dataset = info.dataset or data_name(meta.data.get("train"))
    results = read_results(info.results)
    header = yaml.safe_dump(hub_metadata(arch, info, dataset, results), sort_keys=False)
    metrics = extra.get("metrics") or {}
    evaluation = f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}" if metrics else "none"
    lines = [
        "---",
        header.rstrip(),
        "---",
        "",
        f"# {shape_name(arch)}: a mim {meta.stage} backbone",
        "",
        f"timm's `{config['architecture']}` family at this shape, pretrained with mim (masked image modeling).",
        "Load this folder with timm alone, from disk or once it is on the Hugging Face Hub:",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)  # pooled features (N, D)',
        'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)  # after: huggingface-cli upload ORG/NAME PATH/TO/THIS/FOLDER',
        f'maps = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, features_only=True, out_indices={min(4, arch["depth"])})'
        f"  # the last {min(4, arch['depth'])} blocks' maps, for dense heads",
        "```",
        "",
    ]
    if results:
        lines += ["| evaluation | data | figure | run |", "|---|---|---|---|"]
        lines += [
            f"| {r['name']} | {r['dataset']} ({r['num_samples']} images) | {r['label']} {r['value']:.2f} | {r['run']} |"
            for r in results
        ]
        lines.append("")
    lines += [
        "| provenance | |",
        "|---|---|",
        f"| exported from | `{run_name(source)}` |",
        f"| stage | {meta.stage} |",
        f"| training data | {dataset} ({meta.data.get('num_samples')} samples) |",
        f"| steps | {meta.step} |",
        f"| samples seen | {meta.samples_seen} |",
        f"| final training loss | {meta.last_loss} |",
        f"| norm-pix loss | {extra.get('norm_pix_loss', run_config.get('model', {}).get('norm_pix_loss'))} |",
        f"| mask ratio | {run_config.get('model', {}).get('mask_ratio')} |",
        f"| evaluation of this checkpoint | {evaluation} |",
        f"| weights dtype | {dtype} |",
        f"| decoder | {'decoder.safetensors' if with_decoder else 'not exported'} |",
        f"| git sha | {extra.get('git_sha')} |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in extra.get('versions', {}).items())} |",
    ]
    return "\n".join(lines) + "\n"
