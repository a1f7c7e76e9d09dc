"""`mim segprobe` through the real CLI on real Fashion-MNIST scene shards: the report, the
picture, a frozen backbone, bit-identical resume, cached features, 2 ranks evaluating as 1, and
every bad input a clear error before or at the first batch."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from mim.data.scenes import fashion_mnist_scenes
from mim.data.shards import write_info, write_shards
from mim.models import create_model
from tests.conftest import FASHION_MNIST, run_cli, run_cli_ranks, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist"),
]
TRAIN, VAL = 320, 60
RANDOM = ("init.from=none", "model.name=mae_vit_demo_patch7")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    for split, count in (("train", TRAIN), ("val", VAL)):
        write_shards(
            fashion_mnist_scenes(FASHION_MNIST, split), root / split, name=split, shard_size=160, limit=count
        )
    return {split: root / split for split in ("train", "val")}


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("official") / "mae_pretrain_demo.pth"
    torch.save({"model": create_model("mae_vit_demo_patch7").state_dict(), "epoch": 799}, path)
    return path


def segprobe(scenes, run_dir, *overrides, nproc=1):
    args = (
        "segprobe",
        "--config",
        "configs/segprobe/debug.yaml",
        f"data.train={scenes['train']}",
        f"data.val={scenes['val']}",
        f"run.dir={run_dir}",
        *overrides,
    )
    return run_cli(*args) if nproc == 1 else run_cli_ranks(nproc, *args)


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def held_out(report) -> int:
    """How many training scenes the seeded holdout (about 10 %) set aside, as the report says."""
    return int(re.search(r"\((\d+) samples\)", report["selection"]).group(1))


def test_a_probe_reports_miou_per_class_iou_and_a_picture_and_leaves_the_backbone_untouched(
    tmp_path, scenes, official_checkpoint
):
    result = segprobe(scenes, tmp_path / "run", f"init.from={official_checkpoint}", "data.num_workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = metrics(tmp_path / "run")
    assert report["stage"] == "segprobe" and report["num_classes"] == 11 and report["ignore_index"] == 255
    assert report["classes"][0] == "background" and report["seg"]["eval_window"] == [28, 18]
    assert len(report["evaluations"]) == 2  # epochs 1 and 2
    for record in [*report["evaluations"], report["test"]]:
        assert set(record) >= {"miou", "pixel_accuracy", "iou", "num_samples"}
        assert len(record["iou"]) == 11
        present = [value for value in record["iou"] if value is not None]
        assert record["miou"] == pytest.approx(sum(present) / len(present))
    assert report["test"]["num_samples"] == VAL and report["test"]["chosen_on"].startswith("the held-out 10%")
    assert report["evaluations"][0]["num_samples"] == held_out(report)
    assert f"data.val mIoU {report['test']['miou']:.2f}" in result.stderr
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert [e.value for e in events.Scalars("eval/miou")] == pytest.approx(
        [e["miou"] for e in report["evaluations"]]
    )
    assert events.Scalars("test/miou")[-1].value == pytest.approx(report["test"]["miou"])
    assert "segmentation" in events.Tags()["images"]
    picture = Image.open(tmp_path / "run" / "segmentation.png")
    assert picture.mode == "RGB" and picture.height > 6 * 112
    state = load_file(str(checkpoint.latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    official = torch.load(official_checkpoint, weights_only=True)["model"]
    for name in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "norm.weight", "pos_embed"):
        assert torch.equal(state[f"backbone.{name}"], official[name]), name


def test_a_stopped_probe_resumes_to_the_same_head_and_figures(tmp_path, scenes):
    straight = segprobe(scenes, tmp_path / "straight", *RANDOM, "data.num_workers=1")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = segprobe(scenes, tmp_path / "resumed", *RANDOM, "data.num_workers=1", "run.stop_after=25")
    assert first.returncode == 0, first.stderr[-3000:]
    second = segprobe(scenes, tmp_path / "resumed", *RANDOM, "data.num_workers=1")
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    weights = [
        load_file(str(checkpoint.latest_checkpoint(tmp_path / name) / "model.safetensors"))
        for name in ("straight", "resumed")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if k.startswith("head."))
    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert got["evaluations"] == expected["evaluations"] and got["test"] == expected["test"]


def test_cached_features_train_the_multilevel_head_on_every_window(tmp_path, scenes):
    result = segprobe(scenes, tmp_path / "run", *RANDOM, "seg.cache_features=true", "seg.head=multilevel")
    assert result.returncode == 0, result.stderr[-3000:]
    report = metrics(tmp_path / "run")
    # the training scenes less the held-out ones, each 56 pixels cut in 2 x 2 windows of 28
    assert f"cached features of {(TRAIN - held_out(report)) * 4} training windows" in result.stderr
    assert report["seg"]["head"] == "multilevel" and report["test"]["num_samples"] == VAL


def test_two_ranks_evaluate_every_image_once_and_agree_with_one_rank(tmp_path, scenes):
    figures = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        result = torchrun(nproc, "tests/helpers/segment_eval.py", str(scenes["val"]), str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        figures[nproc] = json.loads(out.read_text())
    assert figures[1]["num_samples"] == figures[2]["num_samples"] == VAL
    assert figures[1] == figures[2]


def test_a_two_rank_probe_counts_every_validation_image_once(tmp_path, scenes):
    result = segprobe(scenes, tmp_path / "run", *RANDOM, "eval.holdout=0", "schedule.epochs=1", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = metrics(tmp_path / "run")
    assert report["test"]["num_samples"] == VAL and report["evaluations"][-1]["num_samples"] == VAL


def _foreign_shards(directory, masks, classes=3, size=(56, 56)):
    """Shards another tool wrote: jpg + mask.png members, an _info.json naming `classes` classes."""
    directory.mkdir()
    with tarfile.open(directory / "data-000000.tar", "w") as archive:
        for number, mask in enumerate(masks):
            members = {"jpg": _encoded(np.zeros((*size, 3), np.uint8), "JPEG")}
            if mask is not None:
                members["mask.png"] = _encoded(mask, "PNG")
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{number:06d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    write_info(directory, "data", ["data-000000.tar"], [len(masks)], [str(c) for c in range(classes)], 255)
    return directory


def _encoded(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_bad_masks_and_splits_are_clear_errors_before_or_at_the_first_batch(tmp_path, scenes):
    good = np.zeros((56, 56), np.uint8)
    outside = good.copy()
    outside[10:20, 10:20] = 9  # 3 classes declared
    cases = {
        "labels": (_foreign_shards(tmp_path / "labels", [good, outside] * 8), "labels [9] outside the 3 classes"),
        "size": (_foreign_shards(tmp_path / "size", [np.zeros((40, 56), np.uint8)] * 16), "the mask is 56x40 pixels but its image 56x56"),
    }  # fmt: skip
    for name, (shards, message) in cases.items():
        # with a data worker the error crosses the DataLoader: it still names the sample and stops
        workers = 1 if name == "labels" else 0
        result = segprobe(
            {"train": shards, "val": scenes["val"]}, tmp_path / f"run-{name}", *RANDOM,
            f"data.num_workers={workers}", "model.num_classes=3", "data.batch_size=4",
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr[-3000:])
        assert "data-000000.tar" in result.stderr
    result = segprobe(scenes, tmp_path / "key", *RANDOM, "data.mask_key=label.png")
    assert result.returncode != 0 and "no mask among 'label.png': set data.mask_key" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    write_info(empty, "val", [], [], ["background"], 255)
    result = segprobe({"train": scenes["train"], "val": empty}, tmp_path / "e", *RANDOM)
    assert result.returncode == 2 and f"data.val {empty} holds no samples" in result.stderr
    result = segprobe(scenes, tmp_path / "b", *RANDOM, "seg.blocks=5")
    assert (
        result.returncode == 2 and "seg.blocks must be at most the encoder's depth 4, got 5" in result.stderr
    )
    assert not (tmp_path / "e").exists() and not (tmp_path / "b").exists()
