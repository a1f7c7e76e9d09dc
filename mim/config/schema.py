"""The config schema's sections that several stages read: one dataclass per concern, every key
declared once with `key(...)`. The root schema of each stage, and the sections only the
evaluation stages read, are in mim.config.stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mim.config.declare import (
    CLASSIFY,
    DEFAULT_IMAGE_KEY,
    DEFAULT_LABEL_KEY,
    DEFAULT_MASK_KEY,
    EVALUATE,
    FINETUNE,
    LINPROBE,
    PRETRAIN,
    SEGPROBE,
    key,
    section,
)

# ----------------------------------------------------------------------------- sections


@dataclass
class EncoderGeometry:
    img_size: int | None = key(
        None, "input size in pixels; null: the variant's (or the backbone's)", bounds=">= 1"
    )
    patch_size: int | None = key(
        None, "patch side in pixels; null: the variant's (or the backbone's)", bounds=">= 1"
    )
    in_chans: int | None = key(
        None,
        "image bands: 1 grey, 3 RGB, any count for arrays and multi-band images; null: the training "
        "data's (`mim shards --stats`), else the variant's (or the backbone's)",
        bounds=">= 1",
    )
    embed_dim: int | None = key(None, "encoder width; null: the variant's (or the backbone's)", bounds=">= 4")
    depth: int | None = key(None, "encoder blocks; null: the variant's (or the backbone's)", bounds=">= 1")
    num_heads: int | None = key(None, "encoder attention heads; null: the variant's", bounds=">= 1")
    mlp_ratio: float | None = key(None, "MLP hidden width / embed_dim; null: the variant's", bounds="> 0")
    qk_norm: bool | None = key(
        None,
        "LayerNorm on the queries and keys of the encoder's attention (ViT-22B), against attention "
        "logits that diverge in large models; null: the variant's (or the backbone's)",
    )
    grad_checkpointing: int = key(
        0,
        "activation checkpointing: recompute every k-th block in backward (1 or true: every block, "
        "of the encoder and the decoder); 0 or false: off",
        bounds=">= 0",
        stages=(PRETRAIN, FINETUNE),
        spellings=((True, 1), (False, 0)),  # timm's and HF's set_grad_checkpointing(True)
    )
    transforms: list[str] = key(
        [],
        "model transforms applied in order once the model is built: registered names or your own "
        "as package.module:function (docs/extending.md)",
        stages=(PRETRAIN, FINETUNE),
    )


@dataclass
class ModelConfig(EncoderGeometry):
    name: str = key("mae_vit_base_patch16", "a registered MAE variant (mim.models.registry)")
    decoder_embed_dim: int | None = key(None, "decoder width; null: the variant's (512)", bounds=">= 4")
    decoder_depth: int | None = key(None, "decoder blocks; null: the variant's (8)", bounds=">= 1")
    decoder_num_heads: int | None = key(None, "decoder attention heads; null: the variant's", bounds=">= 1")
    norm_pix_loss: bool = key(True, "predict each patch's pixels normalised by its own mean and std")
    mask_ratio: float = key(0.75, "fraction of patches hidden from the encoder", bounds="(0, 1)")


@dataclass
class DataConfig:
    train: str = key("", "training shards: a directory, an _info.json, a brace pattern, http(s):// or pipe:")
    val: str = key(
        "",
        "labelled shards the result is reported on (the test split), given as data.train is",
        stages=EVALUATE,
    )
    batch_size: int = key(
        64,
        "samples per process (per GPU) per micro-step",
        bounds=">= 1",
        per_stage={LINPROBE: 512, FINETUNE: 128, SEGPROBE: 16},
    )
    num_workers: int = key(10, "loader worker processes per training process", bounds=">= 0")
    samples_per_epoch: int | None = key(
        None, "samples an epoch counts for the schedule; null: the training split's count", bounds=">= 1"
    )
    shards_per_chunk: int = key(2, "shards one worker reads and shuffles together", bounds=">= 1")
    shuffle_buffer: int = key(1000, "samples a worker holds to shuffle them (its memory)", bounds=">= 1")
    read_retries: int = key(4, "further tries of a remote shard after a transient failure", bounds=">= 0")
    retry_wait: float = key(1.0, "seconds before the first retry, doubled for each next", bounds=">= 0")
    crop_scale: list[float] = key(
        [0.2, 1.0],
        "RandomResizedCrop area range [low, high] of the training view (segprobe: seg.scale)",
        bounds="(0, 1]",
        stages=(PRETRAIN, *CLASSIFY),
        per_stage={LINPROBE: [0.08, 1.0], FINETUNE: [0.08, 1.0]},
    )
    hflip: bool = key(True, "random horizontal flips of the training view")
    mean: list[float] | None = key(
        None,
        "per-band mean for normalisation, in pixel units (8-bit: [0, 1]), 1 value or one per band; "
        "null: the training shards' (`mim shards --stats`), else ImageNet's for grey and RGB",
    )
    std: list[float] | None = key(
        None, "per-band std for normalisation, as data.mean; null: as data.mean", bounds="> 0"
    )
    max_bad_fraction: float = key(
        0.01, "stop when more than this fraction of the samples read is unreadable", bounds="[0, 1)"
    )
    reduced_decode: bool = key(
        True, "decode JPEGs at 1/2, 1/4 or 1/8 scale where the crop stays sharp", stages=(PRETRAIN, *CLASSIFY)
    )
    image_key: str = key(
        DEFAULT_IMAGE_KEY, "the sample's image: the first of these members present (;-separated)"
    )
    label_key: str = key(
        DEFAULT_LABEL_KEY,
        "the label (classification, kNN monitor): a member (cls) or json:FIELD of the .json",
        stages=(PRETRAIN, *CLASSIFY),
    )
    mask_key: str = key(
        DEFAULT_MASK_KEY,
        "the sample's segmentation mask (a PNG of class indices): the first of these members present",
        stages=(SEGPROBE,),
    )


@dataclass
class OptimConfig:
    blr: float = key(
        1.5e-4,
        "base lr: lr = blr x effective batch / 256 (linprobe: probe.blrs)",
        bounds="> 0",
        stages=(PRETRAIN, FINETUNE, SEGPROBE),
        per_stage={FINETUNE: 5e-4, SEGPROBE: 1e-3},
    )
    lr: float | None = key(
        None, "absolute lr; overrides blr when set", bounds="> 0", stages=(PRETRAIN, FINETUNE, SEGPROBE)
    )
    min_lr: float = key(
        0.0, "lr at the end of the cosine schedule", bounds=">= 0", per_stage={FINETUNE: 1e-6}
    )
    weight_decay: float = key(
        0.05,
        "decoupled weight decay (not on biases and norms)",
        bounds=">= 0",
        per_stage={LINPROBE: 0.0, SEGPROBE: 1e-4},
    )
    betas: list[float] = key(
        [0.9, 0.95], "Adam betas [beta1, beta2]", bounds="[0, 1)", per_stage={FINETUNE: [0.9, 0.999]}
    )
    grad_clip: float | None = key(
        None, "clip the global gradient norm to this; null: no clipping", bounds="> 0"
    )
    accum_steps: int = key(1, "micro-steps per optimizer step (gradient accumulation)", bounds=">= 1")


@dataclass
class ClassifyOptimConfig(OptimConfig):
    optimizer: Literal["adamw", "lars"] = key(
        "adamw",
        "adamw, or lars (MAE's linear probe)",
        per_stage={LINPROBE: "lars"},
    )
    layer_decay: float | None = key(
        0.65,
        "lr x layer_decay ** (depth + 1 - layer); null: one lr for all layers",
        bounds="(0, 1]",
        stages=(FINETUNE,),
    )


@dataclass
class ScheduleConfig:
    epochs: float = key(
        800,
        "length of the run in epochs of data.samples_per_epoch",
        bounds="> 0",
        per_stage={LINPROBE: 90, FINETUNE: 100, SEGPROBE: 40},
    )
    warmup_epochs: float = key(
        40,
        "linear lr warm-up, then cosine decay",
        bounds=">= 0",
        per_stage={LINPROBE: 10, FINETUNE: 5, SEGPROBE: 1},
    )


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3, "auto"] = key(
        "auto",
        "ZeRO stage (3: the weights partitioned too); auto: the lowest whose model states fit half the device memory",
        per_stage={LINPROBE: 0, SEGPROBE: 0},
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = key(
        "auto", "auto: bf16 (autocast, fp32 weights) on CUDA, fp32 elsewhere"
    )
    compile: Literal[True, False, "auto"] = key("auto", "torch.compile the model; auto: on CUDA only")


@dataclass
class RunConfig:
    dir: str = key("", "the run directory: checkpoints, logs, TensorBoard events (required)")
    seed: int = key(0, "seed of the model's init, the masks and the data order")
    checkpoint_every: int = key(
        1000, "steps between checkpoints (and at the end and on a stop)", bounds=">= 1"
    )
    keep_last: int = key(3, "checkpoints kept; older ones are deleted", bounds=">= 1")
    stop_after: int | None = key(
        None, "stop with a checkpoint after this step; the schedule is unchanged", bounds=">= 1"
    )
    stop_check_every: int = key(10, "steps between the ranks' agreement on a stop signal", bounds=">= 1")
    on_divergence: Literal["rollback", "stop"] = key(
        "rollback",
        "a non-finite loss/gradient or a loss spike: rollback (to the newest checkpoint before it, "
        "skipping its data) or stop (exit 3)",
    )
    max_rollbacks: int = key(
        3, "rollbacks allowed in the whole run; one more divergence stops it", bounds=">= 0"
    )
    skip_window: int = key(
        10, "steps of data skipped on a rollback beyond those read since the checkpoint", bounds=">= 0"
    )
    spike_threshold: float = key(
        2.0,
        "a loss above this times its mean over the last spike_window steps is a spike; 0: off (the "
        "classifier stages' default: a probe's heads sweep lrs, a fine-tune's mixed loss is noisy)",
        bounds=">= 0",
        per_stage={LINPROBE: 0.0, FINETUNE: 0.0, SEGPROBE: 0.0},
    )
    spike_window: int = key(100, "steps whose mean loss a spike is measured against", bounds=">= 2")
    rollback_lr_scale: float = key(
        1.0, "the lr is multiplied by this for rollback_lr_steps steps after a rollback", bounds="(0, 1]"
    )
    rollback_lr_steps: int = key(0, "steps after a rollback at rollback_lr_scale", bounds=">= 0")
    hang_timeout: float = key(
        900.0,
        "seconds without a completed step (outside start-up, evaluation and checkpoints) after which "
        "every rank writes its stacks to run.dir/stacks and exits to be requeued; 0: off",
        bounds=">= 0",
    )


@dataclass
class LogConfig:
    every: int = key(50, "steps between console and TensorBoard lines (host syncs only there)", bounds=">= 1")
    tensorboard: bool = key(True, "write TensorBoard event files under run.dir/tb")
    recon_every: int = key(
        5000, "steps between reconstruction grids in TensorBoard; 0: never", bounds=">= 0", stages=(PRETRAIN,)
    )
    wandb: str = key(
        "",
        "Weights & Biases project that also gets the scalars, pictures and config (mim-mae[wandb]); empty: off",
    )
    wandb_entity: str = key("", "W&B team or user the project belongs to; empty: the API key's default")
    wandb_mode: Literal["", "online", "offline"] = key(
        "",
        "online, or offline (files in run.dir/wandb, uploaded later by `wandb sync`); empty: W&B's own default",
    )
    mlflow: str = key(
        "",
        "MLflow tracking URI that also gets the scalars, pictures and config (http://HOST:5000, "
        "file:PATH, ...; mim-mae[mlflow]); empty: off",
    )
    mlflow_experiment: str = key("mim", "MLflow experiment the run is logged under")


@dataclass
class MonitorConfig:
    bank: str = key("", "labelled shards whose features are the kNN neighbours; empty: monitor off")
    val: str = key("", "labelled shards that the kNN monitor classifies; empty: monitor off")
    bank_samples: int | None = key(None, "bank size, spread over its shards; null: all", bounds=">= 1")
    val_samples: int | None = key(None, "val size, spread over its shards; null: all", bounds=">= 1")
    every: int = key(1000, "steps between evaluations (also at step 0 and at the last step)", bounds=">= 1")
    k: int = key(20, "neighbours that vote", bounds=">= 1")
    temperature: float = key(0.07, "softmax temperature of the neighbours' cosine similarities", bounds="> 0")
    global_pool: Literal["avg", "token"] = key(
        "avg", "the feature: avg (patch tokens' mean) or token (cls token)"
    )
    batch_size: int = key(256, "images per feature-extraction batch", bounds=">= 1")
    num_workers: int = key(2, "loader workers of the monitor", bounds=">= 0")
    crop_fraction: float = key(0.875, "resize to img_size / crop_fraction, then centre crop", bounds="(0, 1]")


@dataclass
class TargetConfig:
    kind: str = key(
        "pixels",
        "what the decoder predicts at masked patches: pixels (MAE), hog (MaskFeat), teacher (a frozen "
        "backbone's tokens), ema (data2vec: an EMA of the encoder), or your own as package.module:Class",
    )
    teacher: str = key("", "the frozen teacher (kind=teacher, or the global objective): what init.from takes")
    loss: Literal["auto", "mse", "cosine", "smooth_l1"] = key(
        "auto", "auto: the target's own (cosine for teacher, mse for the others)"
    )
    hog_bins: int = key(9, "HOG orientation bins over [0, 180) degrees", bounds=">= 2")
    hog_cell: int | None = key(
        None, "HOG cell side in pixels, dividing the patch; null: 8 if it can", bounds=">= 1"
    )
    ema_decay: float = key(0.9998, "the EMA teacher's momentum at step 0", bounds="(0, 1)")
    ema_end_decay: float = key(0.99999, "its momentum at the last step (linear in between)", bounds="(0, 1]")
    ema_top_k: int = key(
        8, "EMA targets: the average of the last k blocks (at most the depth)", bounds=">= 1"
    )
    global_weight: float = key(
        0.0, "weight of the cls token predicting the teacher's (EMA or target.teacher); 0: off", bounds=">= 0"
    )


@dataclass
class InitConfig:
    from_: str = key(
        "",
        "weights to start from: a mim run or checkpoint, an official MAE .pth, timm weights, a mim export "
        "(linprobe/finetune: required; none trains from scratch)",
        yaml_name="from",
    )


@dataclass
class StageConfig:
    """The sections every training stage has; a stage's schema narrows `model` and `optim`."""

    STAGE: ClassVar[str] = ""
    model: EncoderGeometry = section(EncoderGeometry, "the model's shape")
    init: InitConfig = section(InitConfig, "weights to start from")
    data: DataConfig = section(DataConfig, "shards, loader and training view")
    optim: OptimConfig = section(OptimConfig, "optimizer and lr")
    schedule: ScheduleConfig = section(ScheduleConfig, "warm-up and cosine lr schedule")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "ZeRO, precision, compilation")
    run: RunConfig = section(RunConfig, "run directory, checkpoints, stopping")
    log: LogConfig = section(LogConfig, "console, TensorBoard, W&B and MLflow")
