"""`mim export` and `init.from`: backbones that load strictly in timm with the same features, from
any checkpoint (ZeRO-sharded included), and official checkpoints that start pretraining."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from mim import checkpoint
from mim.data.shards import ShardSet, with_lengths
from mim.data.streams import EvalStream, ViewSpec
from mim.data.transforms import normalize_on_device
from mim.models import create_model
from tests.conftest import cli_env, run_cli, run_cli_ranks

pytestmark = pytest.mark.slow
GREY = ("data.mean=[0.286]", "data.std=[0.353]")


def pretrain(run_dir, shards, *overrides):
    result = run_cli(
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={shards}",
        f"run.dir={run_dir}",
        "run.checkpoint_every=100",
        "schedule.warmup_epochs=0",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def export(source, out, *flags):
    result = run_cli("export", str(source), "--out", str(out), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "config.json").read_text())


def timm_from_export(out, config):
    """The three lines of the model card, plus timm's strict check (num_classes equal in the overlay)."""
    return timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=0,
        **config["model_args"],
        pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=str(out / "model.safetensors")),
    )


def assert_same_features(run_dir, out, config, channels, size):
    model = timm_from_export(out, config).eval()
    exported = load_file(str(out / "model.safetensors"))
    assert set(model.state_dict()) == set(exported)  # strict: nothing missing, nothing unexpected
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run_dir))
    mae = create_model(meta["model"]["name"], **meta["model"]["arch"]).eval()
    mae.load_state_dict(checkpoint.load_weights(checkpoint.latest_checkpoint(run_dir)))
    images = torch.randn(3, channels, size, size)
    with torch.no_grad():
        difference = (model.forward_features(images) - mae.forward_features(images)).abs().max()
    assert difference <= 1e-5


def assert_dense_heads_can_take_it(run_dir, out):
    """What docs/export.md tells a segmentation or detection team: timm's `features_only` and
    `forward_intermediates` on the export give the encoder's patch tokens as feature maps, at the
    pretraining size and at another (the position embeddings resampled as timm loads them)."""
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run_dir))
    mae = create_model(meta["model"]["name"], **meta["model"]["arch"]).eval()
    mae.load_state_dict(checkpoint.load_weights(checkpoint.latest_checkpoint(run_dir)))
    width, depth = mae.blocks[0].norm1.normalized_shape[0], len(mae.blocks)
    images = torch.randn(2, 1, 28, 28)
    backbone = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True, out_indices=(0, -1))
    assert backbone.feature_info.channels() == [width, width] and backbone.feature_info.reduction() == [4, 4]
    with torch.no_grad():
        maps = backbone(images)
        tokens = mae.forward_features(images)[:, 1:]  # the final norm over the last block's tokens
        last = mae.norm(maps[-1].flatten(2).transpose(1, 2))
    assert [tuple(m.shape) for m in maps] == [(2, width, 7, 7)] * 2
    assert (last - tokens).abs().max() <= 1e-5
    larger = timm.create_model(f"local-dir:{out}", pretrained=True, img_size=56).eval()
    with torch.no_grad():
        levels = larger.forward_intermediates(
            torch.randn(2, 1, 56, 56), indices=depth, output_fmt="NCHW", intermediates_only=True
        )
    assert [tuple(level.shape) for level in levels] == [(2, width, 14, 14)] * depth


def test_default_geometry_round_trip(tmp_path, jpeg_shards):
    """224 x 224 RGB, patch 16 (a narrow encoder, to stay fast)."""
    run = tmp_path / "run"
    pretrain(
        run,
        jpeg_shards,
        "model.img_size=224",
        "model.patch_size=16",
        "schedule.epochs=0.25",
        "data.batch_size=4",
        "data.samples_per_epoch=32",
    )
    config = export(run, tmp_path / "out", "--with-decoder")
    assert config["architecture"] == "vit_base_patch16_224"
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert_same_features(run, tmp_path / "out", config, channels=3, size=224)
    decoder = load_file(str(tmp_path / "out" / "decoder.safetensors"))
    assert "mask_token" in decoder and "decoder_pred.weight" in decoder
    card = (tmp_path / "out" / "README.md").read_text()
    assert "samples seen" in card and "git sha" in card
    assert (
        f"| training data | {jpeg_shards.name} (" in card
        and "| exported from | `run/checkpoints/step-" in card
    )
    assert str(tmp_path) not in card and str(tmp_path) not in (tmp_path / "out" / "config.json").read_text()
    assert (
        "# ViT, 32 wide, 2 blocks, 2 heads, 16 px patches at 224 px, 3 channels: a mim pretrain backbone"
        in card
    )


def test_grey_28px_patch4_round_trip_and_bf16(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    pretrain(
        run, fmnist_shards["train"], "model.img_size=28", "model.patch_size=4", "model.in_chans=1", *GREY
    )
    config = export(run, tmp_path / "out")
    assert config["model_args"]["in_chans"] == 1 and config["pretrained_cfg"]["mean"] == [0.286]
    assert_same_features(run, tmp_path / "out", config, channels=1, size=28)
    assert_dense_heads_can_take_it(run, tmp_path / "out")
    export(run, tmp_path / "bf16", "--dtype", "bf16")
    assert all(
        v.dtype == torch.bfloat16 for v in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()
    )


def test_zero2_two_rank_checkpoint_exports_the_engine_weights(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    result = run_cli_ranks(
        2,
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={fmnist_shards['train']}",
        f"run.dir={run}",
        "deepspeed.zero_stage=2",
        "schedule.epochs=0.5",
        "schedule.warmup_epochs=0",
        "model.img_size=28",
        "model.patch_size=7",
        "model.in_chans=1",
        *GREY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    latest = checkpoint.latest_checkpoint(run)
    assert len(list(latest.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # really sharded over 2 ranks
    export(run, tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    held = checkpoint.load_weights(latest)  # what rank 0's engine module held when it saved
    assert exported.keys() == {k for k in held if not k.startswith(("decoder", "mask_token"))}
    assert all(torch.equal(exported[k], held[k]) for k in exported)


def test_probe_and_finetune_checkpoints_export_too(tmp_path, fmnist_shards):
    run = tmp_path / "pre"
    pretrain(
        run, fmnist_shards["train"], "model.img_size=28", "model.patch_size=7", "model.in_chans=1", *GREY
    )
    for stage in ("linprobe", "finetune"):
        result = run_cli(
            stage,
            "--config",
            f"configs/{stage}/debug.yaml",
            f"data.train={fmnist_shards['train']}",
            f"data.val={fmnist_shards['val']}",
            f"run.dir={tmp_path / stage}",
            f"init.from={run}",
            "schedule.epochs=0.5",
            *GREY,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        config = export(tmp_path / stage, tmp_path / f"{stage}-out")
        model = timm_from_export(tmp_path / f"{stage}-out", config)
        assert set(model.state_dict()) == set(load_file(str(tmp_path / f"{stage}-out" / "model.safetensors")))
        assert "top-1" in (tmp_path / f"{stage}-out" / "README.md").read_text()
    assert config["global_pool"] == "avg" and "fc_norm.weight" in model.state_dict()
    # The pretraining run's card with the evaluations of its backbone, and the one line that loads it
    out = tmp_path / "hub"
    results = ("--results", str(tmp_path / "linprobe"), str(tmp_path / "finetune"))
    export(run, out, "--dataset", "fashion-mnist", "--license", "apache-2.0", *results)
    header = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert header["library_name"] == "timm" and header["license"] == "apache-2.0"
    assert header["datasets"] == ["fashion-mnist"] and "image-feature-extraction" in header["tags"]
    [index] = header["model-index"]
    figures = [(r["task"]["name"], r["dataset"]["name"], r["metrics"][0]["value"]) for r in index["results"]]
    expected = [
        (name, "val", round(json.loads((tmp_path / stage / "metrics.json").read_text())["test"]["top1"], 2))
        for name, stage in (("Linear probe", "linprobe"), ("Fine-tuning", "finetune"))
    ]
    assert figures == expected
    assert_loads_in_one_line(out, tmp_path / "empty")


def assert_loads_in_one_line(out, empty):
    """The card's loading lines as written (but the Hub's, which needs the internet), run by a fresh
    Python from an empty directory: the features equal those of the longer form that spells out
    the architecture."""
    empty.mkdir()
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    lines = [
        line.replace("PATH/TO/THIS/FOLDER", str(out)) for line in code.splitlines() if "hf-hub:" not in line
    ]
    program = "\n".join(
        [
            *lines,
            "import json, torch",
            f"config = json.load(open('{out}/config.json'))",
            "old = timm.create_model(config['architecture'], pretrained=True, num_classes=0, **config['model_args'],",
            f"    pretrained_cfg_overlay=dict(config['pretrained_cfg'], file='{out}/model.safetensors')).eval()",
            "images = torch.randn(2, *model.pretrained_cfg['input_size'])",
            "assert torch.equal(model.eval()(images), old(images)), 'the one line and the longer form differ'",
            "print(tuple(model(images).shape), [tuple(m.shape) for m in maps.eval()(images)])",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=empty, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, program + result.stderr[-3000:]
    assert result.stdout.strip() == "(2, 32) [(2, 32, 4, 4), (2, 32, 4, 4)]"  # pooled (N, D); 2 blocks' maps


def test_export_of_a_non_checkpoint_fails_clearly(tmp_path):
    result = run_cli("export", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "neither a mim run dir nor a complete mim checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def _fixed_batch_loss(model, shards_dir, seed, mean, std):
    first = with_lengths(ShardSet([str(sorted(shards_dir.glob("*.tar"))[0])], None, []))
    spec = ViewSpec(model.patch_embed.img_size[0], "L")
    images = torch.stack([image for image, _, _ in list(EvalStream(first, spec, 0, 1, 1.0))[:8]])
    normalized = normalize_on_device(images, mean, std)
    noise = torch.rand(8, model.num_patches, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(normalized, mask_ratio=0.75, noise=noise)[0].item()


@pytest.mark.parametrize("with_decoder", [True, False])
def test_official_checkpoint_initialises_pretraining(tmp_path, fmnist_shards, with_decoder):
    torch.manual_seed(5)
    official = create_model("mae_vit_demo_patch7")
    state = official.state_dict()
    if not with_decoder:  # released MAE checkpoints have no decoder
        state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": state}, tmp_path / "official.pth")
    run = tmp_path / "run"
    pretrain(
        run,
        fmnist_shards["train"],
        "model.name=mae_vit_demo_patch7",
        "model.img_size=28",
        f"init.from={tmp_path / 'official.pth'}",
        "run.seed=3",
        "schedule.epochs=0.25",
        *GREY,
    )
    init = checkpoint.read_meta(checkpoint.latest_checkpoint(run))["init"]
    if with_decoder:
        assert init["new"] == []
        expected = _fixed_batch_loss(official, fmnist_shards["train"], 3, [0.286], [0.353])
        assert init["loss_at_step0"] == pytest.approx(expected, rel=1e-6)
    else:
        assert "decoder_pred.weight" in init["new"] and "mask_token" in init["new"]
        assert not any(k.startswith(("blocks", "patch_embed", "cls_token")) for k in init["new"])
