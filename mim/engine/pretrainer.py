"""MAE pretraining: the shared loop with the masked-modeling objective (mim.engine.objective:
pixels, HOG, a teacher's or an EMA encoder's features), deterministic masks (a pure function of
seed, rank and step) and reconstruction grids in TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mim import checkpoint
from mim.config import ConfigError, PretrainConfig
from mim.data.shards import ShardSet
from mim.data.streams import ViewSpec, derived_seed, first_images
from mim.distributed import DistEnv
from mim.engine.deepspeed_engine import resolve_precision
from mim.engine.evaluate import KnnSplits
from mim.engine.monitor import KnnMonitor
from mim.engine.objective import TEACHER_STATE, Objective
from mim.engine.optim import param_groups
from mim.engine.trainer import Outcome, Trainer
from mim.models.backbone import Weights
from mim.models.checkpointing import checkpoint_blocks
from mim.models.mae import MaskedAutoencoderViT
from mim.runtime import StopSignal
from mim.visualize import attention_grid, reconstruction_grid

__all__ = ["Outcome", "Pretrainer"]
log = logging.getLogger(__name__)
FIXED_POSITIONS = ("pos_embed", "decoder_pos_embed")


def initialize_from(model: MaskedAutoencoderViT, weights: Weights) -> dict:
    """Loads what `weights` has (encoder, and decoder when present and of the same shape); the
    rest keeps its fresh initialisation. Fixed sin-cos positions are recomputed for this geometry."""
    own = model.state_dict()
    available = {**weights.state, **weights.decoder}
    loadable = {
        k: v
        for k, v in available.items()
        if k in own and k not in FIXED_POSITIONS and v.shape == own[k].shape
    }
    model.load_state_dict(loadable, strict=False)
    new = sorted(k for k in own if k not in loadable and k not in FIXED_POSITIONS)
    ignored = sorted(k for k in available if k not in loadable and k not in FIXED_POSITIONS)
    return {"source": weights.source, "num_loaded": len(loadable), "new": new, "ignored": ignored}


def pretrain_view_spec(arch: dict, config: PretrainConfig) -> ViewSpec:
    return ViewSpec(
        img_size=arch["img_size"],
        mode="L" if arch["in_chans"] == 1 else "RGB",
        crop_scale=tuple(config.data.crop_scale),
        hflip=config.data.hflip,
        reduced_decode=config.data.reduced_decode,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
    )


class Pretrainer(Trainer):
    stage = "pretrain"

    def __init__(
        self,
        config: PretrainConfig,
        arch: dict,
        shards: ShardSet,
        env: DistEnv,
        device: torch.device,
        stop: StopSignal | None = None,
        model: MaskedAutoencoderViT | None = None,
        init_weights: Weights | None = None,
        monitor_splits: KnnSplits | None = None,
        teacher_weights: Weights | None = None,
    ) -> None:
        bf16 = resolve_precision(config.deepspeed.precision) == "bf16"
        self.objective = Objective(config.target, arch, teacher_weights, device, bf16)
        torch.manual_seed(config.run.seed)  # the same initial weights for the same seed
        if model is None:
            model = MaskedAutoencoderViT(
                **arch, pred_dim=self.objective.pred_dim, global_dim=self.objective.global_dim
            )
        for blocks in (model.blocks, model.decoder_blocks):
            checkpoint_blocks(blocks, config.model.grad_checkpointing)
        self.arch = arch
        self.init_weights, self.init = init_weights, None
        super().__init__(
            config,
            shards,
            env,
            device,
            model,
            param_groups(model, config.optim.weight_decay),
            pretrain_view_spec(arch, config),
            stop,
        )
        if self.objective.kind == "ema" and self.engine_settings.resolved_zero_stage == 3:
            raise ConfigError(
                "target.kind=ema follows the student's weights, which ZeRO stage 3 partitions: "
                "use deepspeed.zero_stage 0, 1 or 2, or target.kind=teacher with a frozen teacher"
            )
        self.objective.attach(self.engine.module)  # the EMA teacher starts from these weights
        self.monitor = (
            KnnMonitor(
                config.monitor,
                monitor_splits,
                self.view_spec,
                env,
                device,
                self.run_dir,
                bf16=self.precision == "bf16",
            )
            if monitor_splits is not None
            else None
        )
        self.reconstructs = self.objective.kind == "pixels"  # other targets have no pixels to show
        if not self.reconstructs and config.log.recon_every:
            log.info(
                "target.kind=%s predicts no pixels: TensorBoard gets attention maps, no reconstructions",
                self.objective.kind,
            )
        self.draws = bool(config.log.tensorboard and config.log.recon_every)  # alike on every rank
        wants_fixed = self.writer is not None and (config.log.recon_every or self.init is not None)
        self.fixed = self.fixed_images() if wants_fixed else None

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.init_weights is not None and self.resume_from is None:
            self.init = initialize_from(model, self.init_weights)

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(
            derived_seed(self.config.run.seed, self.env.rank, self.step, micro)
        )
        noise = torch.rand(images.shape[0], self.model.num_patches, generator=generator, device=self.device)
        loss, _, _ = self.engine(
            images, mask_ratio=self.config.model.mask_ratio, noise=noise, **self.objective.step_inputs(images)
        )
        return loss

    def run(self) -> Outcome:
        if self.init is not None:
            with self.unsharded() as module:
                loss = self.fixed_batch_loss(module) if self.fixed is not None else None
        if self.init is not None and loss is not None:
            self.init["loss_at_step0"] = loss
            log.info(
                "initialised from %s: loaded %d tensors, new %s; loss at step 0: %.6f",
                self.init["source"],
                self.init["num_loaded"],
                self.init["new"],
                self.init["loss_at_step0"],
            )
            self.scalar("train/loss_at_init", self.init["loss_at_step0"])
        return super().run()

    def fixed_batch_loss(self, module: MaskedAutoencoderViT) -> float:
        """The loss of the fixed image batch under masks from a generator seeded with run.seed."""
        was_training = module.training
        module.eval()
        with torch.no_grad():
            images = self.normalize(self.fixed)
            generator = torch.Generator(device=self.device).manual_seed(self.config.run.seed)
            noise = torch.rand(images.shape[0], module.num_patches, generator=generator, device=self.device)
            inputs = self.objective.step_inputs(images)
            loss, _, _ = module(images, mask_ratio=self.config.model.mask_ratio, noise=noise, **inputs)
        module.train(was_training)
        return float(loss)

    def before_loop(self) -> None:
        if self.monitor is not None:
            self.monitor.start_at(self.step)
            if self.step == 0:  # the starting point of the curve: the encoder before any training
                self.evaluate_monitor()

    def evaluate_monitor(self) -> None:
        with self.unsharded() as module:
            record = self.monitor.evaluate(
                module, self.normalize, self.step, self.step * self.plan.effective_batch
            )
        for name in ("top1", "top5"):
            self.scalar(f"monitor/knn_{name}", record[name])
        self.scalar("monitor/seconds", record["seconds"])
        if self.writer is not None:
            self.writer.flush()

    def after_step(self) -> None:
        self.objective.after_step(self.step, self.plan.total_steps)
        if self.monitor is not None and self.monitor.due(self.step, self.plan.total_steps):
            self.evaluate_monitor()
        if self.draws and self.step % self.config.log.recon_every == 0:
            with self.unsharded() as model:  # every rank: at ZeRO 3 the weights are gathered
                if self.fixed is not None:
                    self.draw(model)

    def draw(self, model: MaskedAutoencoderViT) -> None:
        mean, std = self.config.data.mean, self.config.data.std
        if self.reconstructs:
            mask_ratio, what = self.config.model.mask_ratio, f"step {self.step}"
            grid = reconstruction_grid(model, self.fixed, mean, std, mask_ratio, what=what)
            self.writer.add_image("reconstructions", grid, self.step)
        attention = attention_grid(model, self.fixed, mean, std, what=f"step {self.step}")
        self.writer.add_image("attention", attention, self.step)

    def meta(self) -> dict:
        return dict(
            super().meta(),
            model={"name": self.config.model.name, "arch": self.arch},
            init=self.init,
            norm_pix_loss=self.arch["norm_pix_loss"],
            target=self.objective.describe(),
            mean=self.config.data.mean,
            std=self.config.data.std,
        )

    def shared_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.objective.state()

    def load_shared_state(self, checkpoint_dir: Path) -> None:
        self.objective.load_state(checkpoint.load_shared(checkpoint_dir, [TEACHER_STATE]))

    def check_resumable(self, meta: dict, path: Path) -> None:
        super().check_resumable(meta, path)
        theirs = meta.get("target", {"kind": "pixels", "loss": "mse", "global_weight": 0.0})
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
        if meta.get("model", {}).get("arch") != self.arch:
            raise ConfigError(
                f"cannot resume from {path}: it holds model {meta.get('model')}, but this run's model is "
                f"{self.config.model.name} {self.arch}; use a new run.dir or the same model settings"
            )

    def fixed_images(self, count: int = 8) -> torch.Tensor | None:
        """The first readable images of the first shards, centre-cropped: the same grid all run
        long (None when the first shards hold no readable image)."""
        images = first_images(self.shards, self.view_spec, count)
        if not images:
            log.warning("no readable image in the first shards: no reconstruction grids in TensorBoard")
            return None
        return torch.stack(images)
