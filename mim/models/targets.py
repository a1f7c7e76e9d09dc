"""What a masked-modeling decoder can predict besides pixels, and the losses between prediction
and target at the masked patches. Pure tensor functions: no parameters, no state.

- HOG (MaskFeat, Wei et al. 2022): per channel, Sobel gradients (reflect padding), unsigned
  orientation in [0, 180) degrees hard-binned into `bins`, magnitudes summed over cells of
  `cell` x `cell` pixels, each cell's histogram L2-normalised; a patch's target is its cells'
  histograms side by side ((patch / cell)^2 x channels x bins values). MaskFeat also weights
  magnitudes by a Gaussian window per patch; mim does not.
- Teacher tokens (EVA, MILAN; data2vec for the EMA teacher): the teacher's patch tokens,
  resampled to the student's patch grid where the grids differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hog_cell(patch_size: int, requested: int | None) -> int:
    """The HOG cell side: `requested`, else 8 where it divides the patch (MaskFeat's), else the patch."""
    if requested is not None:
        return requested
    return 8 if patch_size % 8 == 0 else patch_size


def hog_dim(patch_size: int, in_chans: int, cell: int, bins: int) -> int:
    return (patch_size // cell) ** 2 * in_chans * bins


def hog(images: torch.Tensor, patch_size: int, cell: int, bins: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, (p / cell)^2 * C * bins): each patch's HOG, row-major patches."""
    n, c, h, w = images.shape
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    # Sobel as a difference, then the [1, 2, 1] smoothing across it: where the difference is
    # zero (an edge row under reflect padding) the gradient is exactly zero, not rounding noise
    # that would flip its orientation between 0 and 180 degrees.
    across = padded[..., :, :-2] - padded[..., :, 2:]  # left - right: (N, C, H + 2, W)
    gx = across[..., :-2, :] + 2 * across[..., 1:-1, :] + across[..., 2:, :]
    down = padded[..., :-2, :] - padded[..., 2:, :]  # top - bottom: (N, C, H, W + 2)
    gy = down[..., :, :-2] + 2 * down[..., :, 1:-1] + down[..., :, 2:]
    magnitude = torch.sqrt(gx**2 + gy**2)
    orientation = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned: [0, pi)
    index = torch.clamp((orientation / math.pi * bins).floor().long(), max=bins - 1)
    histogram = torch.zeros(n, c, bins, h, w, device=images.device)
    histogram.scatter_(2, index.unsqueeze(2), magnitude.unsqueeze(2))
    cells = F.avg_pool2d(histogram.reshape(n, c * bins, h, w), cell) * cell**2  # sums per cell
    cells = F.normalize(cells.reshape(n, c, bins, h // cell, w // cell), p=2, dim=2)
    per_side, grid_h, grid_w = patch_size // cell, h // patch_size, w // patch_size
    cells = cells.reshape(n, c, bins, grid_h, per_side, grid_w, per_side)
    # (N, grid_h, grid_w, cell row, cell column, C, bins): a patch's cells, then channels, then bins
    return cells.permute(0, 3, 5, 4, 6, 1, 2).reshape(n, grid_h * grid_w, -1)


def resample_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (N, L, D) on a square grid, bilinearly resampled to `grid` x `grid`."""
    n, length, dim = tokens.shape
    side = math.isqrt(length)
    if side == grid:
        return tokens
    maps = tokens.transpose(1, 2).reshape(n, dim, side, side).float()
    maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
    return maps.reshape(n, dim, grid * grid).transpose(1, 2)


def instance_normed_average(block_outputs: list[torch.Tensor]) -> torch.Tensor:
    """data2vec's target: each block's patch tokens (N, L, D) normalised per sample and channel
    over the tokens (instance norm), then averaged."""
    normed = [F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2) for x in block_outputs]
    return torch.stack(normed).mean(dim=0)


def layer_normed(tokens: torch.Tensor) -> torch.Tensor:
    """Each token normalised over its features, no affine: a teacher's target scale."""
    return F.layer_norm(tokens.float(), tokens.shape[-1:])


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over the masked patches (mask 1 = removed) of a per-patch loss: mse (mean over
    features), smooth_l1 (the same, Huber with beta 1), cosine (1 - cosine similarity)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        per_patch = ((pred - target) ** 2).mean(dim=-1)
    elif kind == "smooth_l1":
        per_patch = F.smooth_l1_loss(pred, target, reduction="none").mean(dim=-1)
    elif kind == "cosine":
        per_patch = 1 - F.cosine_similarity(pred, target, dim=-1)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return (per_patch * mask).sum() / mask.sum()


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged over the batch: the global (cls-token) objective."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
