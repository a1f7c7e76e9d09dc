"""Fixed 2-D sine-cosine position embeddings (MAE paper, as in MoCo v3)."""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): half sines, half cosines over geometric frequencies."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.double().reshape(-1)[:, None] * frequencies[None, :]  # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, with_cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] grid_size**2, embed_dim); the cls slot, when present, is zeros."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    # The first half of the channels encodes the column (x), the second the row (y), as in MAE.
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if with_cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)
