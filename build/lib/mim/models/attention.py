"""Where the cls token looks: its attention over the tokens in one block of a ViT encoder, per
head, recomputed from the block's own weights (fused attention never materialises the matrix).
Works on the MAE model and on timm's VisionTransformer alike: both run `forward_features` through
`blocks` of timm `Block`s."""

from __future__ import annotations

import torch
from torch import nn


def check_block(encoder: nn.Module, block: int) -> int:
    """`block` as a 0-based index (negative counts from the end); ValueError when out of range."""
    depth = len(encoder.blocks)
    if not -depth <= block < depth:
        raise ValueError(
            f"block {block} does not exist: this encoder has {depth} blocks "
            f"(0..{depth - 1}, or -1..-{depth} counted from the end)"
        )
    return block % depth


@torch.no_grad()
def cls_attention(encoder: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """softmax(q_cls k^T / sqrt(d)) in block `block` for normalised images (N, C, H, W):
    (N, heads, 1 + L), the cls token's weights over itself and the L patches; each row sums to 1."""
    target = encoder.blocks[check_block(encoder, block)]
    captured: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        encoder.forward_features(images)
    finally:
        handle.remove()
    tokens = target.norm1(captured[0])  # (N, 1 + L, D): what the block's attention sees
    attention = target.attn
    n, num_tokens, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(n, num_tokens, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
    query, key = attention.q_norm(qkv[0][:, :, :1]), attention.k_norm(qkv[1])  # (N, H, 1, d), (N, H, T, d)
    scores = (query * attention.scale) @ key.transpose(-2, -1)  # (N, H, 1, T)
    return scores.float().softmax(dim=-1)[:, :, 0]
