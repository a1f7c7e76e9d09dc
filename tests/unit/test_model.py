"""The MAE model contract (DESIGN.md): patchify, masking, loss, gradients, parameter names."""

from __future__ import annotations

import pytest
import timm
import torch

from mim.meta import CheckpointMeta
from mim.models import create_model, list_models, model_args
from mim.models.arch import read_arch
from mim.models.backbone import create_vit, infer_arch
from mim.models.classifier import build_linear_probe


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mae_vit_debug")


def test_patchify_unpatchify_round_trip_and_layout(model):
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(model.unpatchify(patches), imgs)
    # Channel last within a patch: the first patch's first three values are pixel (0, 0) of each channel.
    assert torch.equal(patches[0, 0, :3], imgs[0, :, 0, 0])
    # Patch 1 is the second patch in the top row.
    assert torch.equal(patches[0, 1, :3], imgs[0, :, 0, 8])


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9, 0.33])
def test_masking_keeps_round_share_of_patches_per_sample(mask_ratio):
    x = torch.randn(4, 49, 8)
    kept, mask, ids_restore = create_model("mae_vit_debug").random_masking(x, mask_ratio)
    expected = round(49 * (1 - mask_ratio))
    assert kept.shape == (4, expected, 8)
    assert torch.equal(mask.sum(dim=1), torch.full((4,), 49.0 - expected))


def test_noise_fixes_the_mask_and_keeps_lowest_noise(model):
    x = torch.randn(2, 16, 4)
    noise = torch.rand(2, 16)
    kept_a, mask_a, _ = model.random_masking(x, 0.75, noise)
    kept_b, mask_b, _ = model.random_masking(x, 0.75, noise.clone())
    assert torch.equal(mask_a, mask_b) and torch.equal(kept_a, kept_b)
    lowest = noise.argsort(dim=1)[:, :4]
    for sample in range(2):
        assert set(torch.nonzero(mask_a[sample] == 0).flatten().tolist()) == set(lowest[sample].tolist())


def test_ids_restore_inverts_the_shuffle(model):
    noise = torch.rand(3, 16)
    x = torch.arange(16.0).view(1, 16, 1).expand(3, -1, -1)
    _, _, ids_restore = model.random_masking(x, 0.5, noise)
    shuffled = torch.gather(x, 1, noise.argsort(dim=1).unsqueeze(-1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1)), x)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_mse_over_masked_patches_only(norm_pix_loss):
    torch.manual_seed(1)
    model = create_model("mae_vit_debug", norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=torch.rand(2, 16))
    target = model.patchify(imgs)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    removed = mask.bool()
    direct = ((pred[removed] - target[removed]) ** 2).mean()
    assert torch.allclose(loss, direct, rtol=1e-6, atol=1e-7)
    # Changing a visible patch's prediction must not change the loss.
    pred_changed = pred.detach().clone()
    pred_changed[~removed] += 100.0
    assert torch.allclose(model.forward_loss(imgs, pred_changed, mask), loss.detach())


def test_every_trainable_parameter_gets_a_gradient(model):
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}


def test_state_dict_names_follow_official_mae_layout():
    names = set(create_model("mae_vit_base_patch16").state_dict())
    official = {
        "cls_token",
        "pos_embed",
        "mask_token",
        "decoder_pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
        "decoder_embed.weight",
        "decoder_norm.weight",
        "decoder_pred.weight",
        "decoder_pred.bias",
    }
    official |= {
        f"blocks.11.{p}"
        for p in (
            "norm1.weight",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc2.bias",
        )
    }
    official |= {f"decoder_blocks.7.{p}" for p in ("attn.qkv.weight", "mlp.fc2.weight")}
    assert official <= names
    assert not [n for n in names if n.startswith(("blocks.12", "decoder_blocks.8"))]


def test_paper_variants_have_paper_sizes():
    sizes = {
        name: sum(p.numel() for p in create_model(name).parameters()) for name in ("mae_vit_base_patch16",)
    }
    assert abs(sizes["mae_vit_base_patch16"] / 1e6 - 111.91) < 0.01  # official MAE ViT-B with decoder
    large = model_args("mae_vit_large_patch16")
    huge = model_args("mae_vit_huge_patch14")
    assert (large["embed_dim"], large["depth"], large["num_heads"]) == (1024, 24, 16)
    assert (huge["patch_size"], huge["embed_dim"], huge["depth"]) == (14, 1280, 32)
    assert (huge["decoder_embed_dim"], huge["decoder_depth"], huge["decoder_num_heads"]) == (512, 8, 16)
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"} <= set(list_models())


def test_overrides_change_geometry_and_unknown_ones_fail():
    model = create_model("mae_vit_debug", img_size=28, patch_size=4, in_chans=1)
    loss, pred, mask = model(torch.randn(2, 1, 28, 28))
    assert pred.shape == (2, 49, 16) and mask.shape == (2, 49)
    with pytest.raises(ValueError, match="unknown model override"):
        create_model("mae_vit_debug", qk_scale=2)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mae_vit_gigantic")
    with pytest.raises(ValueError, match="not a multiple"):
        create_model("mae_vit_debug", img_size=30)


def test_feature_path_is_deterministic_and_matches_timm_vit(model):
    model.eval()
    imgs = torch.randn(2, 3, 32, 32)
    features = model.forward_features(imgs)
    assert features.shape == (2, 17, 32)
    assert torch.equal(features, model.forward_features(imgs))
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    vit.load_state_dict(encoder, strict=True)
    assert torch.allclose(vit.eval().forward_features(imgs), features, atol=1e-6)


def test_norm_pix_prediction_is_unnormalised_per_patch():
    model = create_model("mae_vit_debug", norm_pix_loss=True)
    imgs = torch.rand(1, 3, 32, 32)
    # A perfect prediction of normalised targets maps back to the pixels themselves.
    pixels = model.prediction_to_pixels(imgs, model.targets(imgs))
    assert torch.allclose(pixels, imgs, atol=1e-3)


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_probe_on_last_blocks_concatenates_their_normed_pooled_outputs(global_pool):
    torch.manual_seed(0)
    arch = model_args("mae_vit_debug")
    probe, _ = build_linear_probe(arch, None, num_classes=5, num_heads=2, global_pool=global_pool, blocks=2)
    probe.eval()
    vit = probe.backbone
    imgs = torch.randn(3, 3, 32, 32)
    tokens, outputs = vit.norm_pre(vit._pos_embed(vit.patch_embed(imgs))), []
    for block in vit.blocks:
        tokens = block(tokens)
        normed = vit.norm(tokens)
        outputs.append(normed[:, 1:].mean(1) if global_pool == "avg" else normed[:, 0])
    expected = torch.cat(outputs, dim=1)  # depth 2: both blocks, the last one second
    assert torch.allclose(probe.features(imgs), expected, atol=1e-5)
    assert torch.allclose(expected[:, 32:], vit(imgs), atol=1e-5)  # the last block is the usual feature
    assert probe(imgs).shape == (2, 3, 5) and probe.heads[0][1].in_features == 64
    with pytest.raises(ValueError, match="probe blocks must be 1..2"):
        build_linear_probe(arch, None, num_classes=5, num_heads=1, global_pool="avg", blocks=3)


def test_qk_norm_normalises_queries_and_keys_and_crosses_to_timm_as_an_arch_key():
    model = create_model("mae_vit_debug", qk_norm=True).eval()
    assert (
        model_args("mae_vit_debug")["qk_norm"] is False
        and model_args("mae_vit_debug", qk_norm=True)["qk_norm"]
    )
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"} <= set(encoder)
    assert not any("q_norm" in k for k in model.state_dict() if k.startswith("decoder"))  # the encoder's only
    arch = infer_arch(encoder, "test")
    assert (
        arch["qk_norm"] is True
        and infer_arch(create_model("mae_vit_debug").state_dict(), "test")["qk_norm"] is False
    )
    vit = create_vit(arch, num_classes=0, global_pool="token", fc_norm=False).eval()
    vit.load_state_dict(encoder, strict=True)  # every q_norm / k_norm weight has its place
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.allclose(vit.forward_features(imgs), model.forward_features(imgs), atol=1e-6)


def test_files_written_before_qk_norm_read_as_without_it():
    arch = {k: v for k, v in model_args("mae_vit_debug").items() if k != "qk_norm"}
    assert read_arch(arch)["qk_norm"] is False
    meta = CheckpointMeta(stage="pretrain", config={}, model={"name": "mae_vit_debug", "arch": arch})
    assert meta.architecture()[0]["qk_norm"] is False
