"""Pictures of a pretraining run in TensorBoard: every `log.recon_every` steps the masked images
of a fixed batch with the decoder's reconstruction (pixel targets only: other targets have no
pixels to show) and the encoder's attention maps. The fixed batch is the first readable images
of the first shards, centre-cropped: the same grid all run long."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from mim.data.streams import first_images
from mim.engine.callbacks import Callback
from mim.models.mae import MaskedAutoencoderViT
from mim.visualize import attention_grid, reconstruction_grid

log = logging.getLogger(__name__)


def fixed_batch_loss(
    task: Any, module: MaskedAutoencoderViT, fixed: torch.Tensor | None, normalize: Callable
) -> float | None:
    """The loss of the fixed image batch under masks from a generator seeded with run.seed (None
    where this rank holds no fixed batch)."""
    if fixed is None:
        return None
    was_training = module.training
    module.eval()
    with torch.no_grad():
        images = normalize(fixed)
        generator = torch.Generator(device=images.device).manual_seed(task.config.run.seed)
        noise = torch.rand(images.shape[0], module.num_patches, generator=generator, device=images.device)
        loss = task.masked_loss(module, images, noise)
    module.train(was_training)
    return float(loss)


class Pictures(Callback):
    def __init__(self, task: Any, reconstructs: bool) -> None:
        self.config, self.reconstructs = task.config, reconstructs
        if not reconstructs and self.config.log.recon_every:
            log.info(
                "target.kind=%s predicts no pixels: TensorBoard gets attention maps, no reconstructions",
                self.config.target.kind,
            )
        self.fixed = fixed_images(task.inputs.shards, task.view_spec) if task.env.is_main else None

    def after_step(self, loop) -> None:
        every = self.config.log.recon_every
        if not every or loop.step % every:
            return
        with loop.session.unsharded() as model:  # every rank: at ZeRO 3 the weights are gathered
            if self.fixed is not None:
                self.draw(loop, model)

    def draw(self, loop, model: MaskedAutoencoderViT) -> None:
        mean, std, what = self.config.data.mean, self.config.data.std, f"step {loop.step}"
        if self.reconstructs:
            mask_ratio = self.config.model.mask_ratio
            loop.image(
                "reconstructions", reconstruction_grid(model, self.fixed, mean, std, mask_ratio, what=what)
            )
        loop.image("attention", attention_grid(model, self.fixed, mean, std, what=what))


def fixed_images(shards, view_spec, count: int = 8) -> torch.Tensor | None:
    """The first readable images of the first shards, centre-cropped (None when the first shards
    hold no readable image)."""
    images = first_images(shards, view_spec, count)
    if not images:
        log.warning("no readable image in the first shards: no reconstruction grids in TensorBoard")
        return None
    return torch.stack(images)
