"""The segmentation probe: a frozen ViT in eval mode whose patch tokens (of the last block, or of
the last n blocks side by side, each through the final norm) a small head turns into per-class
logits on the token grid; the loss and the evaluation bring them to the mask bilinearly.

Heads: `linear`, DINOv2's linear protocol (BatchNorm and a 1x1 convolution: what the frozen
features hold, nothing learned on top); `multilevel`, a light head that projects each block's
tokens, fuses them with a 3x3 convolution and upsamples twice (a second choice when the
linear head is the bottleneck). Images larger than the model's input are predicted in sliding
windows (`predict`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mim.models.arch import ViTArch
from mim.models.backbone import Weights, create_vit, load_encoder


class LinearHead(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


class MultiLevelHead(nn.Module):
    """Each block's tokens projected to `hidden`, summed, a 3x3 conv, upsampled x2, a 3x3 conv
    again, then the classes: logits at twice the token grid's resolution."""

    def __init__(self, width: int, levels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.levels = levels
        self.project = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(width), nn.Conv2d(width, hidden, 1)) for _ in range(levels)
        )
        self.fuse = _conv_block(hidden)
        self.refine = _conv_block(hidden)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        fused = sum(
            project(level)
            for project, level in zip(self.project, features.chunk(self.levels, 1), strict=True)
        )
        fused = F.interpolate(self.fuse(fused), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classifier(self.refine(fused))


def _conv_block(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.GELU())


class SegmentationProbe(nn.Module):
    def __init__(
        self, backbone: nn.Module, num_classes: int, blocks: int = 1, head: str = "linear", hidden: int = 128
    ) -> None:
        super().__init__()
        if not 1 <= blocks <= len(backbone.blocks):
            raise ValueError(f"seg.blocks must be 1..{len(backbone.blocks)} (the depth), got {blocks}")
        self.backbone = backbone.requires_grad_(False)
        self.blocks, self.num_classes = blocks, num_classes
        # set by a probe that trains on cached backbone features; evaluation always takes images
        self.takes_features = False
        width = backbone.num_features
        if head == "linear":
            self.head: nn.Module = LinearHead(width * blocks, num_classes)
        elif head == "multilevel":
            self.head = MultiLevelHead(width, blocks, num_classes, hidden)
        else:
            raise ValueError(f"seg.head must be linear or multilevel, got {head!r}")

    def train(self, mode: bool = True) -> SegmentationProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no dropout, no drop path, ever
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, blocks * D, h, w): the normed patch tokens of the last blocks on the token grid."""
        outputs = self.backbone.forward_intermediates(
            images, indices=self.blocks, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return torch.cat(outputs, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, num_classes, h', w') logits on the token grid (twice it for the multilevel head)."""
        features = images if self.takes_features and self.training else self.features(images)
        return self.head(features)


def build_segmentation_probe(
    arch: ViTArch, weights: Weights | None, num_classes: int, blocks: int, head: str, hidden: int
) -> tuple[SegmentationProbe, dict]:
    # As the linear probe: the pretrained final norm is kept and applied to every block's tokens.
    backbone = create_vit(arch, num_classes=0, global_pool="avg", fc_norm=False)
    report = load_encoder(backbone, weights, set(), set()) if weights else {"missing": [], "unexpected": []}
    return SegmentationProbe(backbone, num_classes, blocks, head, hidden), report


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Where windows of `window` pixels start to cover `length` pixels with steps of at most
    `stride`, the last one flush with the end (one window at 0 when `length` fits)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def predict(
    logits_of, images: list[torch.Tensor], window: int, stride: int, chunk: int = 64
) -> list[torch.Tensor]:
    """Per-class logits (K, H, W) of each image (C, H, W), any size: every image is cut into
    windows of `window` pixels (an image smaller than that is padded with zeros), the windows
    of all images are run `chunk` at a time through `logits_of` ((n, C, window, window) ->
    (n, K, h, w)), upsampled bilinearly to the window and averaged where they overlap."""
    crops, places = [], []
    for number, image in enumerate(images):
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, max(0, window - width), 0, max(0, window - height)))
        for top in window_starts(height, window, stride):
            for left in window_starts(width, window, stride):
                crops.append(padded[:, top : top + window, left : left + window])
                places.append((number, top, left))
    sums: list[torch.Tensor | None] = [None] * len(images)
    counts = [torch.zeros(1, max(window, im.shape[-2]), max(window, im.shape[-1])) for im in images]
    for start in range(0, len(crops), chunk):
        logits = logits_of(torch.stack(crops[start : start + chunk])).float()
        logits = F.interpolate(logits, size=(window, window), mode="bilinear", align_corners=False)
        for window_logits, (number, top, left) in zip(logits, places[start : start + chunk], strict=True):
            if sums[number] is None:
                sums[number] = window_logits.new_zeros(window_logits.shape[0], *counts[number].shape[1:])
            sums[number][:, top : top + window, left : left + window] += window_logits
            counts[number][:, top : top + window, left : left + window] += 1
    return [
        (total / count.to(total.device))[:, : image.shape[-2], : image.shape[-1]]
        for total, count, image in zip(sums, counts, images, strict=True)
    ]
