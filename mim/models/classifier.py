"""Classification models on a pretrained ViT: the linear probe (frozen backbone in eval mode,
several BatchNorm+Linear heads trained at once) and the fine-tuning ViT (timm's, with its head)."""

from __future__ import annotations

import torch
from torch import nn

from mim.models.arch import ViTArch
from mim.models.backbone import Weights, create_vit, load_encoder


class LinearProbe(nn.Module):
    """Heads = BatchNorm without affine + Linear (MAE's protocol); one per learning rate. The
    feature is the pooled output of the last block, or with `blocks` > 1 the pooled outputs of the
    last `blocks` blocks (each through the final norm) side by side, as DINO probes small ViTs."""

    def __init__(self, backbone: nn.Module, num_classes: int, num_heads: int, blocks: int = 1) -> None:
        super().__init__()
        if not 1 <= blocks <= len(backbone.blocks):
            raise ValueError(f"probe blocks must be 1..{len(backbone.blocks)} (the depth), got {blocks}")
        self.backbone = backbone.requires_grad_(False)
        self.blocks = blocks
        self.takes_features = False  # set by a probe that feeds cached backbone features
        width = backbone.num_features * blocks
        self.heads = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, num_classes))
            for _ in range(num_heads)
        )
        for head in self.heads:
            nn.init.trunc_normal_(head[1].weight, std=0.01)
            nn.init.zeros_(head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no dropout, no drop path, ever
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, blocks * D): the cls token or the patch average of each of the last blocks."""
        if self.blocks == 1:
            return self.backbone(images)
        outputs = self.backbone.forward_intermediates(
            images,
            indices=self.blocks,
            norm=True,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        pooled = [
            patches.mean(1) if self.backbone.global_pool == "avg" else prefix[:, 0]
            for patches, prefix in outputs
        ]
        return torch.cat(pooled, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.takes_features:  # cached features of the frozen backbone: (N, blocks * D)
            return torch.stack([head(images) for head in self.heads])
        with torch.no_grad():
            features = self.features(images)
        return torch.stack([head(features) for head in self.heads])  # (H, N, C)


def build_linear_probe(
    arch: ViTArch,
    weights: Weights | None,
    num_classes: int,
    num_heads: int,
    global_pool: str,
    blocks: int = 1,
) -> tuple[LinearProbe, dict]:
    # No fc_norm: the pretrained final norm is applied to the tokens before pooling, so nothing
    # randomly initialised sits frozen between the backbone and the heads.
    backbone = create_vit(arch, num_classes=0, global_pool=global_pool, fc_norm=False)
    report = load_encoder(backbone, weights, set(), set()) if weights else {"missing": [], "unexpected": []}
    return LinearProbe(backbone, num_classes, num_heads, blocks), report


def build_finetune_vit(
    arch: ViTArch, weights: Weights | None, num_classes: int, global_pool: str, drop_path: float
) -> tuple[nn.Module, dict]:
    fc_norm = global_pool == "avg"  # MAE: average pool + a new fc_norm; the pretrained norm is dropped
    model = create_vit(
        arch, num_classes=num_classes, global_pool=global_pool, fc_norm=fc_norm, drop_path=drop_path
    )
    report = {"missing": [], "unexpected": []}
    if weights:
        missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if fc_norm else set())
        unexpected = {"norm.weight", "norm.bias"} if fc_norm else set()
        report = load_encoder(model, weights, missing, unexpected)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model, report
