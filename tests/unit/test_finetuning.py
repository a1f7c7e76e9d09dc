"""The fine-tuning methods (mim.models.finetuning) on a small timm ViT, and `mim plan` of a
fine-tune: what each trains, that a fresh adapter starts as the backbone, that a LoRA merge gives
the adapted model's outputs, the checks before any work, and the plan's counts."""

from __future__ import annotations

import pytest
import torch

from mim.config import ConfigError, FinetuneMethodConfig
from mim.models.backbone import create_vit
from mim.models.finetuning import method_of, trainable_share, trained_names
from mim.models.registry import model_args
from mim.plan import Setup, plan, saved_bytes
from tests.conftest import run_cli

ARCH = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0)


def model_with(method: str, **options):
    torch.manual_seed(0)
    model = create_vit(ARCH, num_classes=10, global_pool="avg", fc_norm=True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method_of(FinetuneMethodConfig(method=method, **options)).apply(model)
    return model, before


def test_full_changes_nothing():
    model, before = model_with("full")
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "method, trained",
    [
        ("lora", lambda k: k.endswith((".lora_a", ".lora_b"))),
        ("adapter", lambda k: ".adapter." in k),
        ("prompt", lambda k: k.endswith(".prompt.tokens")),
        ("last_blocks", lambda k: k.startswith(("blocks.2.", "norm."))),
    ],
)
def test_each_method_trains_its_weights_and_the_head_only(method, trained):
    model, before = model_with(method, lora_rank=4, adapter_width=8, prompt_tokens=2)
    names = trained_names(model)
    assert names == {k for k in names if trained(k) or k.startswith(("head.", "fc_norm."))}
    assert any(trained(k) for k in names) and "head.weight" in names
    assert set(before) <= set(model.state_dict())  # the backbone's names are kept
    assert 0 < trainable_share(model)["trainable_percent"] < 100


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_fresh_adapter_starts_as_the_backbone(method):
    adapted, before = model_with(method, lora_rank=4, adapter_width=8)
    plain = create_vit(ARCH, num_classes=10, global_pool="avg", fc_norm=True).eval()
    plain.load_state_dict(before)
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(adapted(images), plain(images))


def test_prompts_keep_the_token_count_and_change_the_features():
    adapted, before = model_with("prompt", prompt_tokens=5)
    plain = create_vit(ARCH, num_classes=10, global_pool="avg", fc_norm=True).eval()
    plain.load_state_dict(before)
    images = torch.randn(2, 1, 28, 28)
    features = adapted.forward_features(images)
    assert features.shape == plain.forward_features(images).shape == (2, 17, 32)
    assert not torch.allclose(features, plain.forward_features(images))
    assert len(adapted.forward_intermediates(images, intermediates_only=True)) == 3


def test_a_lora_merge_gives_the_adapted_models_outputs():
    model, _ = model_with("lora", lora_rank=4, lora_alpha=8.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".lora_b"):
                parameter.normal_(std=0.1)  # a trained update, not the zero it starts at
    method = method_of(FinetuneMethodConfig(method="lora", lora_rank=4, lora_alpha=8.0))
    merged = method.merge(model.state_dict())
    plain = create_vit(ARCH, num_classes=10, global_pool="avg", fc_norm=True).eval()
    plain.load_state_dict(merged)  # strict: plain timm names
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (model(images) - plain(images)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="lora", lora_targets=["qkv", "fc3"]), "['fc3'] are not linear layers"),
        (dict(method="lora", lora_targets=[]), "names no layer"),
        (dict(method="lora", lora_rank=33), "finetune.lora_rank must be 1..32"),
        (dict(method="last_blocks", last_blocks=4), "finetune.last_blocks must be 1..3"),
    ],
)
def test_options_that_do_not_fit_the_backbone_are_refused(options, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        method_of(FinetuneMethodConfig(**options)).check(ARCH)


def test_prompts_need_a_model_with_tokens():
    with pytest.raises(ConfigError, match="has no tokens to prepend to"):
        method_of(FinetuneMethodConfig(method="prompt")).apply(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_the_plan_of_a_lora_fine_tune_counts_what_trains_and_holds_less_than_full():
    arch = dict(ARCH, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    lora = (("method", "lora"), ("lora_rank", 4), ("lora_alpha", 16.0), ("lora_dropout", 0.0))
    lora += (("lora_targets", ("qkv", "proj", "fc1", "fc2")),)
    setups = {
        name: Setup(arch, 8, 1, 0, task="finetune", method=method, num_classes=10)
        for name, method in (("full", (("method", "full"),)), ("lora", lora))
    }
    plans = {name: plan(setup) for name, setup in setups.items()}
    model, _ = model_with("lora", lora_rank=4)
    assert plans["lora"].trained == trainable_share(model)["trainable"]
    assert plans["lora"].num_params == sum(p.numel() for p in model.parameters())
    assert plans["lora"].gradients < plans["full"].gradients / 5
    assert plans["lora"].total < plans["full"].total


def test_the_plan_of_a_partial_fine_tune_counts_the_same_every_time():
    """Each storage autograd keeps is counted once, by its address: the counted tensors stay alive
    until the count ends, so a freed one's address, reused, is not mistaken for it (a 7B
    last_blocks fine-tune, whose frozen blocks free their tensors, counted differently before)."""
    arch = model_args("mae_vit_7b_patch14")
    setup = Setup(arch, 8, 1, 0, "bf16", 1, task="finetune", method=(("method", "last_blocks"),))
    counts = [saved_bytes(setup, 8)[0] for _ in range(4)]
    assert len(set(counts)) == 1


def test_plan_cli_plans_a_lora_fine_tune_of_the_7b_on_one_gpu():
    result = run_cli(
        "plan",
        "--config",
        "finetune/mae_vit_7b_p14",
        "--processes",
        "1",
        "model.name=mae_vit_7b_patch14",
        "finetune.method=lora",
        "deepspeed.zero_stage=0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finetune mae_vit_7b_patch14" in result.stdout and "finetune.method=lora" in result.stdout
    assert "fits in 80GB" in result.stdout
    no_name = run_cli("plan", "--config", "finetune/mae_vit_7b_p14", "finetune.method=lora")
    assert no_name.returncode == 2 and "set model.name" in no_name.stderr
