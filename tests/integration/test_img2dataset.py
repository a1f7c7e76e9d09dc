"""Shards written by img2dataset itself (the real tool, from PyPI, in the virtual environment
scripts/bootstrap.sh --for-tests makes for it), from Fashion-MNIST images it fetches from a real
HTTP server on 127.0.0.1, in its usual layout: NNNNN.tar of <key>.jpg + <key>.json (the label a
field of the json, from --save_additional_columns) + NNNNN_stats.json + NNNNN.parquet. mim
pretrains on them locally and over http without data.samples_per_epoch, probes them with
data.label_key=json:label over 2 ranks counting each val sample once, and re-shards them."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess

import pytest

from mim import checkpoint
from mim.data.reading import stream_samples
from mim.data.shards import open_shards
from tests.conftest import GREY, REPO, fashion_mnist_subset, run_cli, run_cli_ranks
from tests.http_server import FlakyServer

pytestmark = pytest.mark.slow
IMG2DATASET = REPO / os.environ.get("MIM_IMG2DATASET_VENV", ".venv-img2dataset") / "bin" / "img2dataset"
COUNTS = {"train": 240, "val": 100}
PER_SHARD = {"train": 100, "val": 40}  # 100 100 40 and 40 40 20


def img2dataset(url_list, out_dir, per_shard):
    if not IMG2DATASET.is_file():
        pytest.fail(f"{IMG2DATASET} not found: run scripts/bootstrap.sh --for-tests (make test does)")
    result = subprocess.run(
        [
            str(IMG2DATASET),
            f"--url_list={url_list}",
            "--input_format=csv",
            "--url_col=url",
            '--save_additional_columns=["label"]',
            "--output_format=webdataset",
            f"--output_folder={out_dir}",
            f"--number_sample_per_shard={per_shard}",
            "--processes_count=1",
            "--thread_count=4",
            "--resize_mode=no",
            "--enable_wandb=False",
            "--distributor=multiprocessing",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root, server): Fashion-MNIST PNGs served over http, img2dataset's shards of them written
    to root/i2d/{train,val}, the same server serving those too."""
    root = tmp_path_factory.mktemp("img2dataset")
    with FlakyServer(root) as server:
        for split, source_split in (("train", "train"), ("val", "test")):
            (root / "images" / split).mkdir(parents=True)
            rows = ["url,label"]
            for number, record in enumerate(fashion_mnist_subset(source_split, COUNTS[split]).records):
                payload, _ = record.read()
                (root / "images" / split / f"{number}.png").write_bytes(payload)
                rows.append(f"{server.url}/images/{split}/{number}.png,{record.label}")
            (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
            img2dataset(root / f"{split}.csv", root / "i2d" / split, PER_SHARD[split])
        yield root, server


def pattern(split):
    last = -(-COUNTS[split] // PER_SHARD[split]) - 1
    return f"{{00000..{last:05d}}}.tar"


def test_the_shards_are_img2datasets_layout(served):
    root, _ = served
    train = root / "i2d" / "train"
    assert sorted(p.name for p in train.iterdir() if p.suffix == ".tar") == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    assert (train / "00000_stats.json").is_file() and (train / "00000.parquet").is_file()
    sample = next(stream_samples(str(train / "00000.tar")))
    assert {"jpg", "json"} <= set(sample) and "cls" not in sample
    assert isinstance(json.loads(sample["json"])["label"], int)


def test_pretraining_on_them_locally_and_over_http_needs_no_samples_per_epoch(tmp_path, served):
    root, server = served
    for name, train in (
        ("local", root / "i2d" / "train"),
        ("http", f"{server.url}/i2d/train/{pattern('train')}"),
    ):
        result = run_cli(
            "pretrain",
            "--config",
            "configs/pretrain/debug.yaml",
            f"data.train={train}",
            f"run.dir={tmp_path / name}",
            "data.samples_per_epoch=null",  # the counts come from img2dataset's _stats.json
            "data.num_workers=2",
            "run.stop_after=4",
            *GREY,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(30 per epoch of 240 samples)" in result.stderr
        assert "bad sample" not in result.stderr  # the jpg is found as the image
        meta = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path / name))
        assert meta["data"]["num_samples"] == 240 and meta["step"] == 4


def test_a_linear_probe_reads_the_json_label_and_counts_each_val_sample_once_over_2_ranks(tmp_path, served):
    root, server = served
    result = run_cli_ranks(
        2,
        "linprobe",
        "--config",
        "configs/linprobe/debug.yaml",
        f"data.train={root / 'i2d' / 'train'}",
        f"data.val={server.url}/i2d/val/{pattern('val')}",
        f"run.dir={tmp_path / 'probe'}",
        "data.label_key=json:label",
        "model.num_classes=10",
        "model.name=mae_vit_debug",
        "init.from=none",
        "schedule.epochs=1",
        *GREY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "probe" / "metrics.json").read_text())["test"]
    assert final["num_samples"] == COUNTS["val"]


def contents(urls, label_of):
    """The multiset of (image digest, label) of the shards' samples."""
    return collections.Counter(
        (hashlib.sha256(sample.get("jpg") or sample["png"]).hexdigest(), label_of(sample))
        for url in urls
        for sample in stream_samples(url)
    )


def test_mim_shards_reshards_them_into_mims_layout(tmp_path, served):
    root, _ = served
    source = root / "i2d" / "train"
    out = tmp_path / "resharded"
    result = run_cli(
        "shards", f"--source=wds:{source}", "--label-key=json:label", f"--out={out}", "--shard-size=64"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "_info.json").read_text())
    assert info["num_samples"] == 240 and [s["num_samples"] for s in info["shards"]] == [64, 64, 64, 48]
    assert info["classes"] == [str(label) for label in range(10)]
    resharded = open_shards(str(out))
    before = contents(open_shards(str(source)).urls, lambda s: json.loads(s["json"])["label"])
    after = contents(resharded.urls, lambda s: int(s["cls"]))
    assert after == before  # every sample once, with its label, its image bytes untouched
