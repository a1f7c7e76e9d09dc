"""Schedules are pure functions of the step; param groups decide weight decay and lr scales."""

from __future__ import annotations

import math

import pytest

from mim.engine.optim import param_groups, vit_layer_id
from mim.engine.schedule import apply_lr, warmup_cosine
from mim.models import create_model


def test_warmup_then_cosine():
    values = [warmup_cosine(s, total_steps=110, warmup_steps=10, peak_lr=1.0, min_lr=0.1) for s in range(111)]
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5) and values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))  # monotone after warmup


def test_no_weight_decay_on_norms_biases_tokens():
    groups = param_groups(create_model("mae_vit_debug"), weight_decay=0.05)
    by_decay = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= by_decay[0.0]
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= by_decay[0.05]
    assert not (
        {"pos_embed", "decoder_pos_embed"} & (by_decay[0.0] | by_decay[0.05])
    )  # frozen: not optimised


def test_layer_decay_scales_follow_the_formula():
    groups = param_groups(create_model("mae_vit_debug"), 0.05, layer_decay=0.65, num_layers=2)
    for group in groups:
        for name in group["names"]:
            assert group["lr_scale"] == pytest.approx(0.65 ** (3 - vit_layer_id(name, 2)))
    apply_lr(groups, 2.0)
    assert sorted({round(g["lr"], 12) for g in groups}) == pytest.approx(
        [2.0 * 0.65**3, 2.0 * 0.65**2, 2.0 * 0.65, 2.0]
    )


def test_layer_ids():
    assert vit_layer_id("patch_embed.proj.weight", 12) == 0
    assert vit_layer_id("cls_token", 12) == 0
    assert vit_layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert vit_layer_id("blocks.11.mlp.fc1.weight", 12) == 12
    assert vit_layer_id("fc_norm.weight", 12) == 13 and vit_layer_id("head.weight", 12) == 13
    assert vit_layer_id("backbone.blocks.3.norm1.weight", 12) == 4
    assert vit_layer_id("backbone.patch_embed.proj.bias", 12) == 0


def test_knn_votes_for_the_nearest_class():
    import torch
    import torch.nn.functional as F

    from mim.engine.evaluate import knn_classify

    centres = F.normalize(torch.eye(3, 8), dim=-1)
    train = F.normalize(centres.repeat_interleave(5, 0) + 0.05 * torch.randn(15, 8), dim=-1)
    labels = torch.arange(3).repeat_interleave(5)
    queries = F.normalize(centres + 0.05 * torch.randn(3, 8), dim=-1)
    scores = knn_classify(train, labels, queries, num_classes=3, k=5, temperature=0.1)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]
