"""A target of our own: the decoder predicts each patch's edge map (the Sobel gradient magnitude
of every pixel, per channel, standardised per patch), as in edge-guided masked modeling.

    mim pretrain --config pretrain/debug target.kind=my_lab.targets:Edges
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.models.target_kinds import Target, Teachers


class Edges(Target):
    def pred_dim(self, teacher_dim: int | None) -> int | None:
        return self.arch["patch_size"] ** 2 * self.arch["in_chans"]

    def compute(self, images: torch.Tensor, teachers: Teachers) -> torch.Tensor | None:
        n, c, h, w = images.shape
        p = self.arch["patch_size"]
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=images.device)
        kernels = torch.stack([sobel, sobel.T]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
        padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
        gradients = F.conv2d(padded, kernels, groups=c).reshape(n, c, 2, h, w)
        magnitude = gradients.pow(2).sum(dim=2).sqrt()  # (N, C, H, W)
        patches = F.unfold(magnitude, kernel_size=p, stride=p)  # (N, C * p * p, L)
        patches = patches.reshape(n, c, p * p, -1).permute(0, 3, 2, 1).reshape(n, -1, p * p * c)
        mean, std = patches.mean(dim=-1, keepdim=True), patches.std(dim=-1, keepdim=True)
        return (patches - mean) / (std + 1e-6)

    def describe(self) -> dict:
        return {"edges": "sobel magnitude, standardised per patch"}
