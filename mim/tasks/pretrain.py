"""MAE pretraining as a task: the masked-modeling objective (mim.engine.objective: pixels, HOG,
a teacher's or an EMA encoder's features), deterministic masks (a pure function of seed, rank and
step), the EMA teacher as a shared part of the checkpoint, and as callbacks the kNN monitor and
the pictures (reconstructions, attention) in TensorBoard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mim.config import ConfigError, PretrainConfig
from mim.data.pixels import mode_for
from mim.data.shards import ShardSet
from mim.data.streams import ViewSpec, derived_seed
from mim.engine.callbacks import Callback
from mim.engine.data import StreamData
from mim.engine.deepspeed_engine import EngineSettings, resolve_precision
from mim.engine.evaluate import KnnSplits
from mim.engine.monitor import KnnMonitor
from mim.engine.objective import TEACHER_STATE, Objective
from mim.engine.optim import param_groups
from mim.engine.session import Session
from mim.engine.state import CheckpointManager, shared_tensors
from mim.engine.task import Task
from mim.engine.trackers import wants_pictures
from mim.meta import CheckpointMeta
from mim.models.arch import ARCH_DEFAULTS, MaeArch
from mim.models.backbone import Weights, adapt_patch_embedding
from mim.models.mae import MaskedAutoencoderViT
from mim.models.transforms import apply_transforms
from mim.recipe import check_init, check_monitor, check_pretrain
from mim.tasks.pictures import Pictures, fixed_batch_loss
from mim.tasks.registry import TASKS
from mim.weights import load_weights

log = logging.getLogger(__name__)
FIXED_POSITIONS = ("pos_embed", "decoder_pos_embed")


@dataclass
class PretrainInputs:
    arch: MaeArch
    shards: ShardSet
    init_weights: Weights | None
    teacher: Weights | None
    monitor_splits: KnnSplits | None


PATCH_EMBEDDING = "patch_embed.proj.weight"


def initialize_from(model: MaskedAutoencoderViT, weights: Weights) -> dict:
    """Loads what `weights` has (encoder, and decoder when present and of the same shape); the
    rest keeps its fresh initialisation. Fixed sin-cos positions are recomputed for this geometry."""
    own = model.state_dict()
    available = {**weights.state, **weights.decoder}
    embedding, theirs = available.get(PATCH_EMBEDDING), weights.arch["in_chans"]
    if embedding is not None and theirs != model.in_chans:
        available[PATCH_EMBEDDING] = adapt_patch_embedding(embedding, model.in_chans)
        log.info(
            "init.from %s takes %d band(s) and this model %d: each band's patch filter starts as the "
            "mean of its %d filters times %d/%d (mim.models.backbone.adapt_patch_embedding)",
            weights.source, theirs, model.in_chans, theirs, theirs, model.in_chans,
        )  # fmt: skip
    loadable = {
        k: v
        for k, v in available.items()
        if k in own and k not in FIXED_POSITIONS and v.shape == own[k].shape
    }
    model.load_state_dict(loadable, strict=False)
    new = sorted(k for k in own if k not in loadable and k not in FIXED_POSITIONS)
    ignored = sorted(k for k in available if k not in loadable and k not in FIXED_POSITIONS)
    done = {"source": weights.source, "num_loaded": len(loadable), "new": new, "ignored": ignored}
    return done | ({"bands_adapted": [theirs, model.in_chans]} if theirs != model.in_chans else {})


def pretrain_view_spec(arch: MaeArch, config: PretrainConfig) -> ViewSpec:
    return ViewSpec(
        img_size=arch["img_size"],
        mode=mode_for(arch["in_chans"]),
        crop_scale=tuple(config.data.crop_scale),
        hflip=config.data.hflip,
        reduced_decode=config.data.reduced_decode,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
    )


class TeacherState:
    """The EMA teacher as a shared part of the checkpoint."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def state_dict(self) -> dict[str, torch.Tensor]:
        return shared_tensors(self.objective.ema.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.objective.ema.load_state_dict(state)


@TASKS.register("pretrain")
class Pretrain(Task):
    name = "pretrain"
    schema = PretrainConfig

    @classmethod
    def check(cls, config: PretrainConfig) -> PretrainInputs:
        arch, shards = check_pretrain(config)
        init_weights = check_init(config.init.from_, arch)
        teacher = load_weights(config.target.teacher) if config.target.teacher else None
        return PretrainInputs(arch, shards, init_weights, teacher, check_monitor(config.monitor, config.data))

    def __init__(self, config: PretrainConfig, inputs: PretrainInputs, env, device: torch.device) -> None:
        super().__init__(config, inputs, env, device)
        self.arch = inputs.arch
        bf16 = resolve_precision(config.deepspeed.precision) == "bf16"
        self.objective = Objective(config.target, self.arch, inputs.teacher, device, bf16)
        self.view_spec = pretrain_view_spec(self.arch, config)
        self.init: dict | None = None
        self.model: MaskedAutoencoderViT | None = None

    def build(self) -> tuple[MaskedAutoencoderViT, list[dict]]:
        torch.manual_seed(self.config.run.seed)  # the same initial weights for the same seed
        model = MaskedAutoencoderViT(
            **self.arch, pred_dim=self.objective.pred_dim, global_dim=self.objective.global_dim
        )
        apply_transforms(model, self.config)
        self.model = model
        return model, param_groups(model, self.config.optim.weight_decay)

    def prepare(self, resume_from: Path | None, settings: EngineSettings) -> None:
        if self.objective.target.follows_student and settings.resolved_zero_stage == 3:
            raise ConfigError(
                f"target.kind={self.objective.kind} follows the student's weights, which ZeRO stage 3 "
                "partitions: use deepspeed.zero_stage 0, 1 or 2, or target.kind=teacher with a frozen teacher"
            )
        if self.inputs.init_weights is not None and resume_from is None:
            self.init = initialize_from(self.model, self.inputs.init_weights)

    def attach(self, session: Session, checkpoints: CheckpointManager) -> None:
        self.objective.attach(session.engine.module)  # the EMA teacher starts from these weights
        if self.objective.ema is not None:
            checkpoints.add_shared_part(TEACHER_STATE, TeacherState(self.objective))

    def data(self, session: Session) -> StreamData:
        shards = self.inputs.shards
        return StreamData(
            self.config, shards, self.view_spec, self.env.rank, self.device, session.input_dtype
        )

    def callbacks(self, session: Session) -> list[Callback]:
        config, callbacks = self.config, []
        bf16 = session.precision == "bf16"
        pictures = None
        if wants_pictures(config.log) and (config.log.recon_every or self.init is not None):
            pictures = Pictures(self, self.objective.target.predicts_pixels)
        if self.init is not None and pictures is not None:  # its loss is of the pictures' fixed batch
            callbacks.append(InitLoss(self, pictures))
        if self.inputs.monitor_splits is not None:
            monitor = KnnMonitor(
                config.monitor,
                self.inputs.monitor_splits,
                self.view_spec,
                self.env,
                self.device,
                session.run_dir,
                bf16,
            )
            callbacks.append(monitor)
        if pictures is not None:
            callbacks.append(pictures)
        return callbacks

    def masked_loss(self, model: Any, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        inputs = self.objective.step_inputs(images)
        loss, _, _ = model(images, mask_ratio=self.config.model.mask_ratio, noise=noise, **inputs)
        return loss

    def loss(
        self, engine: Any, inputs: torch.Tensor, labels: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(
            derived_seed(self.config.run.seed, self.env.rank, step, micro)
        )
        noise = torch.rand(inputs.shape[0], self.model.num_patches, generator=generator, device=self.device)
        return self.masked_loss(engine, inputs, noise)

    def after_step(self, step: int, total_steps: int) -> None:
        self.objective.after_step(step, total_steps)

    def meta(self) -> dict[str, Any]:
        return {
            "model": {"name": self.config.model.name, "arch": self.arch},
            "init": self.init,
            "norm_pix_loss": self.arch["norm_pix_loss"],
            "target": self.objective.describe(),
            "mean": self.config.data.mean,
            "std": self.config.data.std,
        }

    def check_resumable(self, meta: CheckpointMeta, path: Path) -> None:
        super().check_resumable(meta, path)
        theirs = meta.target
        ours = self.objective.describe()
        # The teacher is compared by its settings, not by where it was read from: a teacher run dir
        # resolves to its newest checkpoint, which may have moved on since.
        if {k: v for k, v in theirs.items() if k != "teacher"} != {
            k: v for k, v in ours.items() if k != "teacher"
        }:
            raise ConfigError(
                f"cannot resume from {path}: it was trained for target {theirs}, this run's is {ours}; "
                "use a new run.dir or the same target.* settings"
            )
        if theirs.get("teacher") != ours.get("teacher"):
            log.warning("the teacher is now %s (it was %s)", ours.get("teacher"), theirs.get("teacher"))
        if {**ARCH_DEFAULTS, **(meta.model or {}).get("arch", {})} != self.arch:
            raise ConfigError(
                f"cannot resume from {path}: it holds model {meta.model}, but this run's model is "
                f"{self.config.model.name} {self.arch}; use a new run.dir or the same model settings"
            )


class InitLoss(Callback):
    """Pretraining from init.from: the loss of the fixed batch before any step, logged and in
    TensorBoard (train/loss_at_init), recorded in meta.json's init."""

    def __init__(self, task: Pretrain, pictures: Pictures) -> None:
        self.task, self.pictures = task, pictures

    def before_loop(self, loop) -> None:
        with loop.session.unsharded() as module:  # every rank: at ZeRO 3 the weights are gathered
            loss = fixed_batch_loss(self.task, module, self.pictures.fixed, loop.data.normalize)
        if loss is None:
            return
        init = self.task.init
        init["loss_at_step0"] = loss
        log.info(
            "initialised from %s: loaded %d tensors, new %s; loss at step 0: %.6f",
            init["source"],
            init["num_loaded"],
            init["new"],
            loss,
        )
        loop.report({"train/loss_at_init": loss})
