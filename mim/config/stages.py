"""The root schema of each stage (PretrainConfig, LinprobeConfig, FinetuneConfig,
SegprobeConfig), the sections only the evaluation stages read, and SCHEMAS, stage -> schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mim.config.declare import (
    CLASSIFY,
    FINETUNE,
    LINPROBE,
    PRETRAIN,
    SEGPROBE,
    key,
    section,
)
from mim.config.schema import (
    ClassifyOptimConfig,
    EncoderGeometry,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    StageConfig,
    TargetConfig,
)


@dataclass
class PretrainConfig(StageConfig):
    STAGE: ClassVar[str] = PRETRAIN
    model: ModelConfig = section(ModelConfig, "the MAE: encoder and decoder shape, masking")
    optim: OptimConfig = section(OptimConfig, "AdamW and its lr")
    target: TargetConfig = section(TargetConfig, "what the decoder (and the cls token) learn to predict")
    monitor: MonitorConfig = section(MonitorConfig, "online kNN accuracy of the encoder during pretraining")


# ----------------------------------------------------------------------------- evaluation stages


@dataclass
class ClassifierModelConfig(EncoderGeometry):
    name: str = key("", "init.from=none: the registered MAE variant whose encoder is trained from scratch")
    global_pool: Literal["token", "avg"] = key(
        "avg",
        "the feature: token (cls token) or avg (patch tokens' mean)",
        stages=CLASSIFY,
        per_stage={LINPROBE: "token"},
    )
    drop_path: float = key(0.1, "stochastic depth rate of the encoder", bounds="[0, 1)", stages=(FINETUNE,))
    num_classes: int | None = key(
        None,
        "classes of the head (segprobe: background included); null: those in the training shards' _info.json",
        bounds=">= 1",
    )


@dataclass
class ProbeConfig:
    blrs: list[float] = key([0.1], "one head per base lr, trained together; each reported", bounds="> 0")
    cache_features: bool = key(
        False, "run the frozen backbone once on centre crops and train the heads on cached features"
    )
    blocks: int = key(1, "the feature: the last n blocks' pooled outputs side by side", bounds=">= 1")


@dataclass
class FinetuneMethodConfig:
    method: str = key(
        "full",
        "which weights train (the head always does): full, lora, adapter, prompt, last_blocks "
        "(docs/finetuning.md), or your own as package.module:Class",
    )
    lora_rank: int = key(8, "lora: rank of each low-rank update", bounds=">= 1")
    lora_alpha: float = key(16.0, "lora: the update is scaled by lora_alpha / lora_rank", bounds="> 0")
    lora_dropout: float = key(0.0, "lora: dropout on the update's input", bounds="[0, 1)")
    lora_targets: list[str] = key(
        ["qkv", "proj", "fc1", "fc2"],
        "lora: the linear layers of each block that get an update (attention: qkv, proj; MLP: fc1, fc2)",
    )
    adapter_width: int = key(64, "adapter: bottleneck width of each block's parallel adapter", bounds=">= 1")
    adapter_scale: float = key(0.1, "adapter: its output's scale, added to the block's MLP", bounds="> 0")
    prompt_tokens: int = key(10, "prompt: learned tokens prepended in every block (VPT-deep)", bounds=">= 1")
    last_blocks: int = key(
        1, "last_blocks: how many of the last blocks train (with the final norm)", bounds=">= 1"
    )


@dataclass
class AugmentConfig:
    randaug: str = key("rand-m9-mstd0.5-inc1", "a timm RandAugment string; empty: none", stages=(FINETUNE,))
    mixup: float = key(0.8, "mixup alpha; 0: off", bounds=">= 0", stages=(FINETUNE,))
    cutmix: float = key(1.0, "cutmix alpha; 0: off", bounds=">= 0", stages=(FINETUNE,))
    label_smoothing: float = key(
        0.0,
        "label smoothing of the cross-entropy",
        bounds="[0, 1)",
        stages=CLASSIFY,
        per_stage={FINETUNE: 0.1},
    )
    reprob: float = key(0.25, "random erasing probability", bounds="[0, 1]", stages=(FINETUNE,))


@dataclass
class EvalConfig:
    every_epochs: float = key(
        1.0,
        "epochs between evaluations (on the held-out share, see eval.holdout; and at the end)",
        bounds="> 0",
        per_stage={LINPROBE: 5.0},
    )
    crop_fraction: float = key(
        0.875, "resize to img_size / crop_fraction, then centre crop", bounds="(0, 1]", stages=CLASSIFY
    )
    holdout: float = key(
        0.02,
        "share of data.train held out (seeded) to choose the head and epoch on; data.val is then "
        "evaluated only for the choice. 0: choose on data.val itself (its figure is then optimistic)",
        bounds="[0, 0.5]",
    )


@dataclass
class SegConfig:
    head: Literal["linear", "multilevel"] = key(
        "linear",
        "linear: BatchNorm + 1x1 convolution on the frozen patch tokens (DINOv2's linear protocol); "
        "multilevel: a light head that fuses the blocks and upsamples twice",
    )
    blocks: int = key(
        1,
        "the features: patch tokens of the last n blocks, side by side (DINOv2's +ms uses 4)",
        bounds=">= 1",
    )
    hidden: int = key(128, "multilevel: the head's width", bounds=">= 1")
    scale: list[float] = key(
        [0.5, 2.0],
        "the training view's short side is seg.eval_size times a factor in [low, high]; then a "
        "random crop of model.img_size and a flip (data.hflip), image and mask together",
        bounds="> 0",
    )
    eval_size: int | None = key(
        None,
        "evaluation: images are brought to this short side; larger than model.img_size: sliding "
        "windows of model.img_size; null: model.img_size",
        bounds=">= 1",
    )
    eval_stride: int | None = key(
        None, "step between sliding windows; null: two thirds of model.img_size", bounds=">= 1"
    )
    ignore_index: int | None = key(
        None,
        "the mask value no class counts for; null: the training shards' _info.json's, else 255",
        bounds=">= 0",
    )
    cache_features: bool = key(
        False,
        "run the frozen backbone once over the training images' evaluation windows (no scale, crop "
        "or flip augmentation) and train the head on those features; memory grows with the split",
    )


@dataclass
class ClassifyConfig(StageConfig):
    """Linear probing, fine-tuning and the segmentation probe share one schema; the stage decides
    which keys it reads."""

    model: ClassifierModelConfig = section(ClassifierModelConfig, "the backbone's shape and the head")
    optim: ClassifyOptimConfig = section(ClassifyOptimConfig, "optimizer and lr")
    probe: ProbeConfig = section(ProbeConfig, "the linear heads", stages=(LINPROBE,))
    finetune: FinetuneMethodConfig = section(
        FinetuneMethodConfig, "what fine-tuning trains: every weight or a few percent", stages=(FINETUNE,)
    )
    augment: AugmentConfig = section(AugmentConfig, "training augmentation", stages=CLASSIFY)
    seg: SegConfig = section(SegConfig, "the segmentation probe: features, head, views", stages=(SEGPROBE,))
    eval: EvalConfig = section(EvalConfig, "evaluation: the choice of head and epoch, and data.val")


@dataclass
class LinprobeConfig(ClassifyConfig):
    STAGE: ClassVar[str] = LINPROBE


@dataclass
class FinetuneConfig(ClassifyConfig):
    STAGE: ClassVar[str] = FINETUNE


@dataclass
class SegprobeConfig(ClassifyConfig):
    STAGE: ClassVar[str] = SEGPROBE


SCHEMAS: dict[str, type] = {
    PRETRAIN: PretrainConfig,
    LINPROBE: LinprobeConfig,
    FINETUNE: FinetuneConfig,
    SEGPROBE: SegprobeConfig,
}
