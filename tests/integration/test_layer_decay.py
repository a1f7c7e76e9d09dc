"""Layer-wise lr decay really acts under DeepSpeed: read the optimizer's per-group lrs after steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mim.distributed import init_distributed, read_dist_env
from mim.engine.deepspeed_engine import EngineSettings, build_engine, engine_param_groups
from mim.engine.optim import param_groups, vit_layer_id
from mim.engine.schedule import apply_lr, warmup_cosine
from mim.models.backbone import create_vit

pytestmark = pytest.mark.slow
ARCH = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_per_group_lrs_follow_the_layer_decay_formula(zero_stage, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "0")
    init_distributed(read_dist_env({}))
    model = create_vit(ARCH, num_classes=10, global_pool="avg", fc_norm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = build_engine(
        model,
        param_groups(model, 0.05, layer_decay=0.65, num_layers=3),
        EngineSettings(
            micro_batch_size=4,
            accum_steps=1,
            world_size=1,
            zero_stage=zero_stage,
            precision="fp32",
            grad_clip=None,
        ),
    )
    for step in range(3):
        peak = warmup_cosine(step, total_steps=10, warmup_steps=2, peak_lr=1e-3)
        apply_lr(engine_param_groups(engine), peak)
        loss = F.cross_entropy(engine(torch.randn(4, 1, 28, 28)), torch.randint(0, 10, (4,)))
        engine.backward(loss)
        engine.step()
    groups = engine_param_groups(engine)
    assert len({round(g["lr"], 15) for g in groups}) == 5  # embeddings, 3 blocks, head
    for group in groups:
        for name in group["names"]:
            assert group["lr"] == pytest.approx(peak * 0.65 ** (4 - vit_layer_id(name, 3)), rel=1e-12)
    # The scaled lrs are the ones used: the head (scale 1) moved more than the patch embedding (0.65 ** 4).
    after = dict(engine.module.named_parameters())
    head_step = (after["head.weight"] - before["head.weight"]).abs().mean()
    embed_step = (after["patch_embed.proj.weight"] - before["patch_embed.proj.weight"]).abs().mean()
    assert head_step > 3 * embed_step
