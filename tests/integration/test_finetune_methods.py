"""Parameter-efficient fine-tuning (`finetune.method`) through the real CLI and a real DeepSpeed
engine: only the method's weights and the head train, the frozen ones never change, checkpoints
hold the trained weights and a checksummed reference to the backbone, a resumed run ends
bit-identical, 2 ranks equal 1, the export merges where the method does (strict in timm, the
adapted model's features) and writes the adapter weights alone where it does not."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from mim import checkpoint
from mim.errors import UserInputError
from mim.export import load_adapted
from mim.models import create_model
from mim.weights import load_weights
from tests.conftest import run_cli, torchrun
from tests.integration.test_classify import classify

pytestmark = pytest.mark.slow
PARTIAL = ("lora", "adapter", "prompt", "last_blocks")
SMALL = ("finetune.lora_rank=4", "finetune.adapter_width=8", "finetune.prompt_tokens=4")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """An official-layout MAE checkpoint of the demo's shape."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "mae_pretrain_demo.pth"
    torch.save({"model": create_model("mae_vit_demo_patch7").state_dict()}, path)
    return path


def finetune(shards, run_dir, backbone, *overrides):
    return classify(
        "finetune", shards, run_dir, f"init.from={backbone}", "schedule.epochs=1", *SMALL, *overrides
    )


# what each method's run composes with besides the debug recipe's augmentation and layer decay
COMPOSED = {
    "lora": ("optim.accum_steps=2", "data.batch_size=16"),
    "adapter": ("model.grad_checkpointing=1",),
    "prompt": ("model.grad_checkpointing=1",),
    "last_blocks": (),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards, backbone):
    """One finished fine-tune per method."""
    root = tmp_path_factory.mktemp("methods")
    for method in PARTIAL:
        result = finetune(
            fmnist_shards, root / method, backbone, f"finetune.method={method}", *COMPOSED[method]
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize("method", PARTIAL)
def test_checkpoints_hold_the_trained_weights_and_a_reference_to_the_backbone(runs, method):
    last = checkpoint.latest_checkpoint(runs / method)
    meta = checkpoint.read_meta(last)
    assert meta["trained_only"] is True and meta["finetune"]["method"] == method
    reference = meta["backbone"]["reference"]
    assert reference["path"].endswith("mae_pretrain_demo.pth") and len(reference["sha256"]) == 64
    held = set(load_file(str(last / "model.safetensors")))
    report = json.loads((runs / method / "metrics.json").read_text())
    share = report["finetune"]
    assert share["method"] == method and 0 < share["trainable_percent"] < 100
    assert sum(1 for _ in held) < share["total"]
    expected = {
        "lora": lambda k: k.endswith((".lora_a", ".lora_b")),
        "adapter": lambda k: ".adapter." in k,
        "prompt": lambda k: k.endswith(".prompt.tokens"),
        "last_blocks": lambda k: k.startswith(("blocks.3.", "norm.")),
    }[method]
    assert held == {k for k in held if expected(k) or k.startswith(("head.", "fc_norm."))}
    assert any(expected(k) for k in held) and {"head.weight", "fc_norm.weight"} <= held
    assert report["cost"]["peak_memory_gib"] > 0 and report["cost"]["step_seconds"] > 0
    assert report["test"]["top1"] > 10.0  # above chance after an epoch


@pytest.mark.parametrize(
    "method, zero_stage", [("lora", 0), ("adapter", 3), ("prompt", 0), ("last_blocks", 1)]
)
def test_only_the_methods_weights_change_under_deepspeed(tmp_path, method, zero_stage):
    result = torchrun(1, "tests/helpers/finetune_steps.py", str(tmp_path), method, str(zero_stage))
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = (
        load_file(str(tmp_path / "initial.safetensors")),
        load_file(str(tmp_path / "final.safetensors")),
    )
    trained = set(json.loads((tmp_path / "trained.json").read_text()))
    assert before.keys() == after.keys()
    frozen = set(before) - trained
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bit for bit
    moved = [k for k in trained if not torch.equal(before[k], after[k])]
    assert "head.weight" in moved and len(moved) > 2


@pytest.mark.parametrize("method, zero_stage", [("lora", 2), ("prompt", 3)])
def test_two_ranks_equal_one(tmp_path, method, zero_stage):
    for nproc in (1, 2):
        result = torchrun(
            nproc, "tests/helpers/finetune_steps.py", str(tmp_path / str(nproc)), method, str(zero_stage)
        )
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(str(tmp_path / n / "final.safetensors")) for n in ("1", "2"))
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_lora_export_merges_into_plain_timm_weights_with_the_adapted_features(runs, tmp_path, backbone):
    out = tmp_path / "export"
    result = run_cli("export", str(runs / "lora"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.safetensors", "adapter.safetensors", "adapter.json", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    merged = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()  # strict
    assert not any("lora" in k for k in merged.state_dict())
    adapted = load_adapted(str(backbone), out)
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        difference = (merged.forward_features(images) - adapted.forward_features(images)).abs().max()
    assert difference <= 1e-5
    # the merge moved the weights: the update is not zero after training
    plain = load_file(str(out / "model.safetensors"))
    original = torch.load(backbone, weights_only=True)["model"]
    assert not torch.equal(plain["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert torch.equal(plain["patch_embed.proj.weight"], original["patch_embed.proj.weight"])


def test_adapter_export_writes_the_adapter_alone_and_says_why(runs, tmp_path, backbone):
    out = tmp_path / "export"
    result = run_cli("export", str(runs / "adapter"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot be merged" in result.stderr and not (out / "model.safetensors").exists()
    assert {"adapter.safetensors", "adapter.json", "README.md"} <= {p.name for p in out.iterdir()}
    model = load_adapted(str(backbone), out)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    damaged = (out / "adapter.safetensors").read_bytes()
    (out / "adapter.safetensors").write_bytes(damaged[: len(damaged) // 2])
    with pytest.raises(UserInputError, match="cannot read the adapter export"):
        load_adapted(str(backbone), out)
    with pytest.raises(UserInputError, match="is not an adapter export"):
        load_adapted(str(backbone), tmp_path)


def test_a_resumed_lora_run_ends_bit_identical(tmp_path, fmnist_shards, backbone):
    common = ("finetune.method=lora", "run.checkpoint_every=5", "schedule.epochs=0.5")
    straight = finetune(fmnist_shards, tmp_path / "straight", backbone, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = finetune(fmnist_shards, tmp_path / "resumed", backbone, *common, "run.stop_after=5")
    assert first.returncode == 0, first.stderr[-3000:]
    second = finetune(fmnist_shards, tmp_path / "resumed", backbone, *common)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    expected, got = (
        load_file(str(checkpoint.latest_checkpoint(tmp_path / name) / "model.safetensors"))
        for name in ("straight", "resumed")
    )
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_lora_run_moves_to_another_zero_stage_on_resume(tmp_path, fmnist_shards, backbone):
    run = tmp_path / "run"
    first = finetune(fmnist_shards, run, backbone, "finetune.method=lora", "run.stop_after=3")
    assert first.returncode == 0, first.stderr[-3000:]
    moved = finetune(fmnist_shards, run, backbone, "finetune.method=lora", "deepspeed.zero_stage=2")
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "moving the optimizer state" in moved.stderr and "resumed from" in moved.stderr
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["trained_only"] and meta["engine"]["zero_stage"] == 2


def test_init_from_an_adapted_run_reads_its_backbone_with_the_update_merged(runs, tmp_path):
    """What a later stage (a full fine-tune continuing from it) gets from
    init.from=RUN: the backbone completed with the trained weights, the low-rank updates merged."""
    weights = load_weights(str(runs / "lora"))
    assert not any("lora" in k for k in weights.state) and "head.weight" in weights.state
    out = tmp_path / "export"
    assert run_cli("export", str(runs / "lora"), "--out", str(out)).returncode == 0
    merged = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights.state[k], merged[k]) for k in merged)


def test_resuming_with_another_method_or_a_changed_backbone_is_refused(
    runs, tmp_path, fmnist_shards, backbone
):
    run = tmp_path / "run"
    first = finetune(fmnist_shards, run, backbone, "finetune.method=lora", "run.stop_after=2")
    assert first.returncode == 0, first.stderr[-3000:]
    other = finetune(fmnist_shards, run, backbone, "finetune.method=adapter")
    assert other.returncode != 0
    assert "written by finetune.method=lora" in other.stderr
    changed = tmp_path / "changed.pth"
    state = torch.load(backbone, weights_only=True)
    state["model"]["blocks.0.attn.qkv.weight"] += 1e-3
    torch.save(state, changed)
    moved = finetune(fmnist_shards, run, changed, "finetune.method=lora")
    assert moved.returncode != 0 and "it moved or changed" in moved.stderr, moved.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.method=lorra"], "did you mean 'lora'"),
        (["finetune.method=lora", "finetune.lora_targets=[qkv,fc3]"], "['fc3'] are not linear layers"),
        (["finetune.method=lora", "finetune.lora_rank=0"], "finetune.lora_rank"),
        (["finetune.method=lora", "finetune.lora_rank=200"], "finetune.lora_rank must be 1..128"),
        (["finetune.method=last_blocks", "finetune.last_blocks=9"], "finetune.last_blocks must be 1..4"),
        (["finetune.method=prompt", "init.from=none", "model.name=mae_vit_demo_patch7"], "init.from=none"),
    ],
)
def test_bad_method_settings_fail_before_any_work(tmp_path, fmnist_shards, backbone, overrides, message):
    result = finetune(fmnist_shards, tmp_path / "run", backbone, *overrides)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
