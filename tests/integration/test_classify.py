"""`mim linprobe` and `mim finetune` through the real CLI on real Fashion-MNIST shards."""

from __future__ import annotations

import functools
import json
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file

from mim import checkpoint
from mim.data.holdout import Holdout
from mim.data.shards import open_shards, with_lengths, write_shards
from mim.models import create_model
from tests.conftest import fashion_mnist_subset, run_cli, run_cli_ranks

pytestmark = pytest.mark.slow
GREY = (
    "data.mean=[0.286]",
    "data.std=[0.353]",
    "model.num_heads=4",
)  # 128 wide: heads are not the usual 64 wide


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """An official-layout MAE checkpoint: {'model': state dict with official names, decoder included}."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("official") / "mae_pretrain_demo.pth"
    torch.save({"model": create_model("mae_vit_demo_patch7").state_dict(), "epoch": 799}, path)
    return path


def classify(stage, shards, run_dir, *overrides, config=None, nproc=1):
    run = run_cli if nproc == 1 else functools.partial(run_cli_ranks, nproc)
    return run(
        stage,
        "--config",
        config or f"configs/{stage}/debug.yaml",
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        f"run.dir={run_dir}",
        *GREY,
        *overrides,
    )


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_probe_learns_far_above_chance_and_leaves_the_backbone_untouched(
    tmp_path, fmnist_shards, official_checkpoint
):
    result = classify(
        "linprobe",
        fmnist_shards,
        tmp_path / "probe",
        f"init.from={official_checkpoint}",
        "model.global_pool=avg",
        "probe.blrs=[10.0,100.0,1000.0]",
        "probe.blocks=2",
        "schedule.epochs=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = metrics(tmp_path / "probe")
    assert report["load_report"] == {"missing": [], "unexpected": []} and report["probe_blocks"] == 2
    assert report["test"]["num_samples"] == 250 and len(report["evaluations"]) == 8
    assert report["test"]["top1"] > 40.0  # chance is 10 %; a random 4-block encoder, 8 short epochs
    assert report["test"]["top5"] >= report["test"]["top1"]
    # The head and epoch are chosen on the held-out 2 % of data.train; data.val is reported.
    train = with_lengths(open_shards(str(fmnist_shards["train"])))
    held = Holdout(0.02, seed=0).indices(train.urls, train.lengths)
    assert all(e["num_samples"] == len(held) for e in report["evaluations"])
    chosen = report["test"]  # the first evaluation whose best head no other beats
    before = [max(e["top1"]) for e in report["evaluations"] if e["step"] < chosen["step"]]
    after = [max(e["top1"]) for e in report["evaluations"] if e["step"] >= chosen["step"]]
    assert chosen["selection_top1"] == after[0] == max(after) and all(v < after[0] for v in before)
    assert chosen["chosen_on"] == f"the held-out 2% of data.train ({len(held)} samples)"
    assert "loss per head " in result.stderr
    assert re.search(
        r"data.val top-1 \d+\.\d\d \(head \d at epoch \d+, chosen on the held-out", result.stderr
    )
    probe_weights = load_file(str(checkpoint.latest_checkpoint(tmp_path / "probe") / checkpoint.WEIGHTS_FILE))
    original = torch.load(official_checkpoint, weights_only=True)["model"]
    backbone = {k[len("backbone.") :]: v for k, v in probe_weights.items() if k.startswith("backbone.")}
    assert backbone.keys() == {k for k in original if not k.startswith(("decoder", "mask_token"))}
    assert all(torch.equal(backbone[k], original[k]) for k in backbone)


def test_official_checkpoint_fine_tunes_and_reports_what_it_adds(
    tmp_path, fmnist_shards, official_checkpoint
):
    result = classify(
        "finetune",
        fmnist_shards,
        tmp_path / "ft",
        f"init.from={official_checkpoint}",
        "augment.randaug=rand-m9-mstd0.5-inc1",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "augment.reprob=0.25",
        "model.drop_path=0.1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = metrics(tmp_path / "ft")
    assert report["load_report"] == {
        "missing": ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"],
        "unexpected": ["norm.bias", "norm.weight"],
    }
    assert report["test"]["num_samples"] == 250


def test_from_scratch_and_a_different_eval_size_resample_positions(
    tmp_path, fmnist_shards, official_checkpoint
):
    scratch = classify(
        "finetune",
        fmnist_shards,
        tmp_path / "scratch",
        "init.from=none",
        "model.name=mae_vit_demo_patch7",
        "schedule.epochs=1",
    )
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    assert metrics(tmp_path / "scratch")["backbone"] == "random init (init.from=none)"
    bigger = classify(
        "linprobe",
        fmnist_shards,
        tmp_path / "bigger",
        f"init.from={official_checkpoint}",
        "model.img_size=35",
        "schedule.epochs=1",
    )  # 5x5 patches instead of 4x4
    assert bigger.returncode == 0, bigger.stderr[-3000:]
    assert metrics(tmp_path / "bigger")["arch"]["img_size"] == 35


def test_same_seed_gives_the_same_probe_and_another_seed_does_not(tmp_path, fmnist_shards):
    """A random encoder and its probe heads come from run.seed: same seed, same table (on CPU)."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = classify(
            "linprobe",
            fmnist_shards,
            tmp_path / name,
            "init.from=none",
            "model.name=mae_vit_demo_patch7",
            f"run.seed={seed}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [e["top1"] for e in metrics(tmp_path / name)["evaluations"]]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_a_resumed_probe_holds_out_the_same_samples_and_makes_the_same_choice(tmp_path, fmnist_shards):
    """Stopped after its first evaluation and resumed, a probe trains on the same samples, evaluates
    the same held-out ones and reports the same choice as one that ran straight through."""
    common = ("init.from=none", "model.name=mae_vit_demo_patch7")
    straight = classify("linprobe", fmnist_shards, tmp_path / "straight", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = classify("linprobe", fmnist_shards, tmp_path / "resumed", *common, "run.stop_after=40")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(metrics(tmp_path / "resumed")["evaluations"]) == 1  # the first epoch's, at step 29
    second = classify("linprobe", fmnist_shards, tmp_path / "resumed", *common)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert got["evaluations"] == expected["evaluations"] and got["test"] == expected["test"]


def test_a_fine_tune_with_every_augmentation_is_reproducible_and_resumes_bit_identically(
    tmp_path, fmnist_shards, official_checkpoint
):
    """RandAugment, mixup, cutmix, random erasing and drop path (the debug recipe keeps the
    defaults) draw from the global RNGs: seeded by run.seed and kept in the checkpoint, a run
    repeats and a stopped run resumes to the same weights, with data workers or without."""
    common = (f"init.from={official_checkpoint}", "data.num_workers=1", "run.checkpoint_every=5")
    common += ("schedule.epochs=0.5",)
    runs = {}
    for name, extra in (("straight", ()), ("again", ()), ("resumed", ("run.stop_after=5",)), ("resumed", ())):
        result = classify("finetune", fmnist_shards, tmp_path / name, *common, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_file(str(checkpoint.latest_checkpoint(tmp_path / name) / "model.safetensors"))
    for name in ("again", "resumed"):
        assert all(torch.equal(runs["straight"][k], runs[name][k]) for k in runs["straight"]), name


def test_wrong_checkpoints_fail_clearly_before_work(tmp_path, fmnist_shards):
    not_a_vit = tmp_path / "other.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(3, 3)}}, not_a_vit)
    result = classify("linprobe", fmnist_shards, tmp_path / "a", f"init.from={not_a_vit}")
    assert result.returncode == 2 and "does not hold a ViT encoder" in result.stderr
    arbitrary = tmp_path / "arbitrary.pth"
    arbitrary.write_bytes(pickle.dumps({"model": object()}))
    result = classify("finetune", fmnist_shards, tmp_path / "b", f"init.from={arbitrary}")
    assert result.returncode == 2 and "loads safely (weights_only)" in result.stderr
    result = classify("linprobe", fmnist_shards, tmp_path / "c", f"init.from={tmp_path / 'missing.pth'}")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = classify(
        "linprobe",
        fmnist_shards,
        tmp_path / "d",
        "init.from=none",
        "model.name=mae_vit_demo_patch7",
        "probe.blocks=5",
    )
    assert (
        result.returncode == 2
        and "probe.blocks must be at most the encoder's depth 4, got 5" in result.stderr
    )
    result = classify(
        "linprobe",
        fmnist_shards,
        tmp_path / "e",
        "init.from=none",
        "model.name=mae_vit_demo_patch7",
        "eval.holdout=0.0001",
    )
    assert result.returncode == 2
    assert "eval.holdout=0.0001 of data.train's 960 samples holds out 0: choose a share" in result.stderr
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_two_ranks_count_every_validation_sample_once(tmp_path, fmnist_shards, official_checkpoint):
    val = tmp_path / "val101"
    write_shards(fashion_mnist_subset("test", 101), val, name="val", shard_size=40)
    result = run_cli_ranks(
        2,
        "linprobe",
        "--config",
        "configs/linprobe/debug.yaml",
        f"data.train={fmnist_shards['train']}",
        f"data.val={val}",
        f"run.dir={tmp_path / 'run'}",
        f"init.from={official_checkpoint}",
        "data.num_workers=2",
        "schedule.epochs=1",
        "eval.holdout=0",  # chosen on data.val itself, and said so
        *GREY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = metrics(tmp_path / "run")
    assert report["test"]["num_samples"] == 101 and report["evaluations"][-1]["num_samples"] == 101
    assert report["test"]["chosen_on"] == "data.val itself (optimistic: eval.holdout=0)"


def test_knn_on_frozen_features_of_a_checkpoint(tmp_path, fmnist_shards, official_checkpoint):
    result = run_cli(
        "knn",
        "--k",
        "10",
        "--out",
        str(tmp_path / "knn.json"),
        f"init.from={official_checkpoint}",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        "data.num_workers=0",
        "model.global_pool=avg",
        *GREY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "knn.json").read_text())
    assert report["num_samples"] == 250 and report["k"] == 10
    assert report["top1"] > 40.0  # chance is 10 %; even random ViT features cluster Fashion-MNIST classes
