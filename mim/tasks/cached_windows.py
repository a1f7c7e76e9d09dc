"""seg.cache_features: the frozen backbone runs once over the training images at the evaluation
size, cut into the windows that cover them (no scale, crop or flip augmentation); the head then
trains for many epochs on those features and the masks' windows. The evaluation still runs the
backbone on the images (in sliding windows, as without the cache). What it holds grows with the
training split: windows x blocks x width x tokens x 2 bytes (the features are kept in 16 bits)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mim.data.loaders import eval_loader
from mim.data.segmentation import as_lists, resize_mask
from mim.data.streams import EvalStream, eval_spec
from mim.models.segmentation import window_starts
from mim.runtime import interruptible
from mim.tasks.cached import CachedFeatures

log = logging.getLogger(__name__)


class CachedWindows(CachedFeatures):
    def __init__(self, stream: Any, session: Any, task: Any) -> None:
        self.task = task
        super().__init__(stream, session, task.inputs.splits)

    def extract(self, module: Any, splits: Any) -> None:
        size = self.task.window[0]
        spec, data = eval_spec(self.stream.view_spec), self.config.data
        stream = EvalStream(self.stream.shards, spec, self.env.rank, self.env.world_size, 1.0)
        features, masks = [], []
        probe = self.task.inputs
        small = probe.num_classes <= 256 and probe.ignore_index <= 255  # masks kept in a byte
        with interruptible("extracting features"):
            for images, image_masks, _ in eval_loader(
                stream, data.batch_size, data.num_workers, collate=as_lists
            ):
                windows, mask_windows = [], []
                for image, mask in zip(images, image_masks, strict=True):
                    mask = resize_mask(mask, tuple(image.shape[-2:]))
                    for top in window_starts(image.shape[-2], size, size):
                        for left in window_starts(image.shape[-1], size, size):
                            windows.append(_window(image, top, left, size, 0))
                            mask_windows.append(_window(mask, top, left, size, self.task.inputs.ignore_index))
                inputs = self.stream.normalize(torch.stack(windows))
                features.append(module.features(inputs).to(torch.float16))
                masks.append(torch.stack(mask_windows).to(self.device, torch.uint8 if small else torch.long))
        width = module.backbone.num_features * module.blocks
        self.train_features = (
            torch.cat(features) if features else torch.zeros(0, width, 1, 1, device=self.device)
        )
        self.train_labels = torch.cat(masks) if masks else torch.zeros(0, size, size, dtype=torch.long)
        log.info(
            "cached features of %d training windows (this rank): %.2f GiB",
            len(self.train_labels),
            self.train_features.numel() * 2 / 2**30,
        )

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.device, self.dtype)

    def evaluate_split(self, split: str) -> dict:
        """On the images, as without the cache (the probe in eval mode takes images)."""
        return self.task.evaluate_split(split)


def _window(pixels: torch.Tensor, top: int, left: int, size: int, fill: int) -> torch.Tensor:
    """A size x size window at (top, left); where the image is smaller, filled with `fill`."""
    part = pixels[..., top : top + size, left : left + size]
    if part.shape[-2:] == (size, size):
        return part
    padded = torch.full((*pixels.shape[:-2], size, size), fill, dtype=pixels.dtype)
    padded[..., : part.shape[-2], : part.shape[-1]] = part
    return padded
