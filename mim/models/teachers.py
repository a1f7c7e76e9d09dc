"""Teachers whose features a student MAE learns to predict: a frozen backbone (anything
`init.from` takes) and an exponential moving average of the student's own encoder (data2vec).
Both run without gradients, in eval mode, and never become part of the student's weights."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mim.models.backbone import Weights, create_vit, load_encoder
from mim.models.mae import MaskedAutoencoderViT


class FrozenTeacher(nn.Module):
    """A pretrained ViT, frozen: its global feature (the cls token, or a classifier's pooled
    feature) and its patch tokens."""

    def __init__(self, weights: Weights) -> None:
        super().__init__()
        self.arch = dict(weights.arch)
        self.source = weights.source
        # A fine-tuned classifier (fine-tuning's layout: average pooling, fc_norm instead of the
        # final norm, a head) teaches with its pooled feature; the head is not used.
        classifier = "fc_norm.weight" in weights.state
        self.vit = create_vit(
            self.arch, num_classes=0, global_pool="avg" if classifier else "token", fc_norm=classifier
        )
        head = {k for k in weights.state if k.startswith("head.")}
        load_encoder(self.vit, weights, set(), head)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return self.arch["embed_dim"]

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # always eval: no dropout, no drop path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global feature (N, D), patch tokens (N, L_teacher, D)) of `images` (the student's input: resized to
        the teacher's size, grey repeated to RGB where the teacher wants three channels)."""
        size, channels = self.arch["img_size"], self.arch["in_chans"]
        if images.shape[1] != channels:
            images = (
                images.expand(-1, channels, -1, -1) if images.shape[1] == 1 else images.mean(1, keepdim=True)
            )
        if images.shape[-1] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        tokens = self.vit.forward_features(images.to(next(self.vit.parameters()).dtype))
        return self.vit.forward_head(tokens, pre_logits=True), tokens[:, self.vit.num_prefix_tokens :]


class EmaTeacher(nn.Module):
    """An exponential moving average of a student MAE's encoder (patch embedding, cls token,
    positions, blocks, final norm), updated after every optimizer step."""

    def __init__(self, student: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.patch_embed = copy.deepcopy(student.patch_embed)
        self.cls_token = nn.Parameter(student.cls_token.detach().clone())
        self.pos_embed = nn.Parameter(student.pos_embed.detach().clone())
        self.blocks = copy.deepcopy(student.blocks)
        self.norm = copy.deepcopy(student.norm)
        self.requires_grad_(False)
        self.eval()
        own = dict(self.named_parameters())
        followed = dict(student.named_parameters())
        self._pairs = [(own[name], followed[name]) for name in own]

    @property
    def dim(self) -> int:
        return self.cls_token.shape[-1]

    def train(self, mode: bool = True) -> EmaTeacher:
        return super().train(False)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """teacher = decay * teacher + (1 - decay) * student, for every tensor."""
        teacher = [t for t, _ in self._pairs]
        torch._foreach_lerp_(teacher, [s.detach().to(t.dtype) for t, s in self._pairs], 1.0 - decay)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, top_k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(cls token after the final norm (N, D), the patch tokens of the last `top_k` blocks'
        outputs, before the final norm: a list of (N, L, D))."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - top_k:
                outputs.append(x[:, 1:])
        return self.norm(x)[:, 0], outputs


def ema_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """data2vec 2.0's momentum schedule: linear from `start` to `end` over the run."""
    return start + (end - start) * min(1.0, step / max(1, total_steps))
