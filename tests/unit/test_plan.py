"""The registered large sizes (built on the meta device), activation checkpointing's wiring, the
ZeRO stage auto picks, and `mim plan` (its arithmetic, its largest micro-batch, its CLI)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch

from mim.engine.deepspeed_engine import choose_zero_stage, model_state_bytes
from mim.models import create_model
from mim.models.checkpointing import checkpoint_blocks, checkpointed_blocks
from mim.models.registry import model_args
from mim.plan import USABLE_SHARE, Setup, largest_micro_batch, parse_bytes, plan, saved_bytes
from tests.conftest import run_cli

# Published encoder shapes: (width, depth, heads, MLP width), patch 14.
PUBLISHED = {
    "mae_vit_giant_patch14": (1408, 40, 16, 6144),  # ViT-g/14, Zhai et al. 2022
    "mae_vit_1b_patch14": (1536, 40, 24, 6144),  # Web-SSL, Fan et al. 2025
    "mae_vit_2b_patch14": (2688, 24, 21, 10752),
    "mae_vit_3b_patch14": (3072, 26, 24, 12288),
    "mae_vit_5b_patch14": (3584, 32, 28, 14336),
    "mae_vit_7b_patch14": (4096, 32, 32, 16384),
}


def encoder_count(model) -> int:
    return sum(p.numel() for k, p in model.named_parameters() if not k.startswith(("decoder", "mask_token")))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_large_sizes_build_on_meta_with_the_published_parameter_count(name):
    width, depth, heads, mlp = PUBLISHED[name]
    with torch.device("meta"):
        mae = create_model(name)
        vit = timm.create_model(
            "vit_base_patch16_224",
            patch_size=14,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp / width,
            num_classes=0,
        )
    assert all(p.is_meta for p in mae.parameters())
    # Each block: qkv, proj, two MLP matrices with biases, two norms; plus the patch projection,
    # cls token, position table (257 x width, fixed) and final norm.
    per_block = (
        3 * width * width + 3 * width + width * width + width + 2 * width * mlp + mlp + width + 4 * width
    )
    closed_form = depth * per_block + (14 * 14 * 3 + 1) * width + width + 257 * width + 2 * width
    assert encoder_count(mae) == sum(p.numel() for p in vit.parameters()) == closed_form
    if name == "mae_vit_7b_patch14":
        assert 6.4e9 < encoder_count(mae) < 6.5e9  # "ViT-7B": 6.45B in the encoder


def test_checkpoint_blocks_wraps_every_kth_block_and_keeps_the_names():
    model = create_model("mae_vit_debug", depth=5)
    names = list(model.state_dict())
    assert checkpoint_blocks(model.blocks, 2) == 3
    assert checkpointed_blocks(model.blocks) == [0, 2, 4]
    assert list(model.state_dict()) == names
    with pytest.raises(ValueError, match="grad_checkpointing must be >= 0"):
        checkpoint_blocks(model.decoder_blocks, -1)


def test_checkpointing_keeps_fewer_tensors_for_backward():
    setup = Setup(model_args("mae_vit_small_patch16"), 8, 1, 0)
    whole, _, _ = saved_bytes(setup, 8)
    every, _, _ = saved_bytes(replace(setup, grad_checkpointing=1), 8)
    assert every < 0.2 * whole


def test_qk_norm_is_planned_with_the_queries_and_keys_its_norms_keep_for_backward():
    setup = Setup(model_args("mae_vit_small_patch16"), 8, 1, 0)
    plain, _, _ = saved_bytes(setup, 8)
    normed, _, _ = saved_bytes(replace(setup, arch={**setup.arch, "qk_norm": True}), 8)
    visible, width, depth = round(196 * 0.25) + 1, 384, 12
    # each encoder block's norms keep their inputs (q and k, fp32); the rest of their saving is small
    assert normed - plain >= depth * 2 * 8 * visible * width * 4


def test_auto_picks_stage_3_only_where_stage_2_does_not_fit():
    params, gpu = 6_500_000_000, 80e9
    assert choose_zero_stage(100_000_000, 8, gpu) == 0
    assert model_state_bytes(params, 8, 2) < 0.5 * gpu  # 39 GB: stage 2 on 8 devices
    assert choose_zero_stage(params, 8, gpu) == 2
    assert model_state_bytes(params, 4, 2) > 0.5 * gpu  # 52 GB: the whole fp32 weights are 26 GB
    assert choose_zero_stage(params, 4, gpu) == 3
    assert model_state_bytes(params, 64, 3) == pytest.approx(params * 20 / 64)


def test_plan_partitions_by_stage():
    arch = model_args("mae_vit_large_patch16")
    plans = {stage: plan(Setup(arch, 32, 8, stage, "bf16")) for stage in (0, 1, 2, 3)}
    assert plans[1].optimizer < plans[0].optimizer / 4  # moments and master copy over 8 processes
    assert plans[2].gradients < plans[1].gradients / 4
    assert len({round(p.activations) for p in plans.values()}) == 1  # the stage does not change them
    # DeepSpeed keeps what it gathers for the step (up to 1e9 values): below that, stage 3 holds
    # the whole weights besides its slices; far above it, a slice and 1e9 values.
    assert plans[3].parameters > plans[0].parameters
    huge = Setup(model_args("mae_vit_7b_patch14"), 1, 64, 0, "bf16")
    whole, sliced = plan(huge).parameters, plan(replace(huge, zero_stage=3)).parameters
    assert sliced < whole / 4 and sliced > 4 * 1e9


def test_bf16_keeps_a_bf16_copy_of_each_weight_until_the_forward_ends():
    setup = Setup(model_args("mae_vit_huge_patch14"), 1, 1, 0, "bf16", grad_checkpointing=1)
    _, _, casts = saved_bytes(setup, 1)
    with torch.device("meta"):
        model = create_model("mae_vit_huge_patch14")
    matrices = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and p.requires_grad)
    assert casts == pytest.approx(2 * matrices, rel=0.01)


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    setup = Setup(model_args("mae_vit_large_patch16"), 1, 8, 0, "bf16")
    memory = 24e9
    batch = largest_micro_batch(setup, memory)
    assert batch > 0
    assert plan(replace(setup, micro_batch=batch)).total <= USABLE_SHARE * memory
    assert plan(replace(setup, micro_batch=batch + 1)).total > USABLE_SHARE * memory


def test_parse_bytes():
    assert (
        parse_bytes("80GB") == 80e9 and parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("141e9") == 141e9
    )
    with pytest.raises(ValueError, match="is not a size such as 80GB"):
        parse_bytes("lots")


def test_plan_cli_fits_the_7b_recipe_and_names_what_fits_when_a_config_does_not():
    fits = run_cli("plan", "--config", "pretrain/mae_vit_7b_p14", "--processes", "4")
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "mae_vit_7b_patch14 (6.48B parameters), 4 process(es), ZeRO 3 (auto), bf16" in fits.stdout
    assert "fits in 80GB" in fits.stdout and "activations" in fits.stdout
    too_big = run_cli(
        "plan",
        "--config",
        "pretrain/mae_vit_7b_p14",
        "--processes",
        "8",
        "deepspeed.zero_stage=0",
        "model.grad_checkpointing=0",
        "data.batch_size=256",
    )
    assert too_big.returncode == 1
    assert "does not fit in 80GB" in too_big.stdout
    assert "fits: deepspeed.zero_stage=3 model.grad_checkpointing=1" in too_big.stdout
    bad = run_cli("plan", "--config", "pretrain/mae_vit_7b_p14", "--device-memory", "lots")
    assert bad.returncode == 2 and "--device-memory" in bad.stderr
