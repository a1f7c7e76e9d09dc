"""`mim pretrain` and `mim linprobe` on shards behind a real HTTP server (started by the test on
127.0.0.1) and through `pipe:` commands: the same weights and metrics as from local disk, transient
failures absorbed, a missing shard counted as bad with its URL named."""

from __future__ import annotations

import json
import time

import pytest
import torch
import webdataset as wds

from mim import checkpoint
from mim.data.reading import stream_samples
from tests.conftest import GREY, run_cli
from tests.http_server import FlakyServer

pytestmark = pytest.mark.slow
FAST_RETRIES = ("data.read_retries=3", "data.retry_wait=0.05")


@pytest.fixture()
def server(fmnist_shards):
    with FlakyServer(fmnist_shards["train"].parent) as running:
        yield running


def pretrain(run_dir, train, *overrides):
    return run_cli(
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={train}",
        f"run.dir={run_dir}",
        "data.num_workers=2",
        *GREY,
        *FAST_RETRIES,
        *overrides,
    )


def weights(run_dir):
    return checkpoint.load_weights(checkpoint.latest_checkpoint(run_dir))


def test_pretraining_from_http_and_pipe_equals_pretraining_from_disk(tmp_path, server, fmnist_shards):
    for number in range(8):  # every shard: a 503, then a response cut halfway, then served
        server.unavailable[f"train/train-{number:06d}.tar"] = 1
        server.cut[f"train/train-{number:06d}.tar"] = 2
    local = pretrain(tmp_path / "local", fmnist_shards["train"])
    assert local.returncode == 0, local.stderr[-3000:]
    over_http = pretrain(tmp_path / "http", f"{server.url}/train/_info.json")
    assert over_http.returncode == 0, over_http.stderr[-3000:]
    piped = pretrain(
        tmp_path / "pipe",
        f"pipe:curl -sf {server.url}/train/train-{{000000..000007}}.tar",
        "data.samples_per_epoch=64",
    )
    assert piped.returncode == 0, piped.stderr[-3000:]
    expected = weights(tmp_path / "local")
    for run in ("http", "pipe"):
        got = weights(tmp_path / run)
        assert all(torch.equal(expected[k], got[k]) for k in expected), run
    assert "(HTTP 503 Service Unavailable) after 0 sample(s); try 2 of 4" in over_http.stderr
    assert "(the tar file is truncated) after" in over_http.stderr  # the cut response
    assert "skipping bad sample" not in over_http.stderr
    picture = tmp_path / "recon.png"
    shown = run_cli(
        "visualize", str(tmp_path / "http"), "--data", f"{server.url}/train/", "--out", str(picture)
    )
    assert shown.returncode == 0 and picture.stat().st_size > 0, shown.stderr[-3000:]


def test_a_missing_remote_shard_is_counted_as_bad_with_its_url(tmp_path, server, fmnist_shards):
    (fmnist_shards["train"].parent / "train" / "train-000003.tar").rename(tmp_path / "away.tar")
    try:
        two = (f"{server.url}/train/train-{{000002..000003}}.tar", "data.samples_per_epoch=64")
        result = pretrain(tmp_path / "run", *two, "data.max_bad_fraction=0.5")
        strict = pretrain(tmp_path / "strict", *two, "data.max_bad_fraction=0.001")
    finally:
        (tmp_path / "away.tar").rename(fmnist_shards["train"] / "train-000003.tar")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping the rest of shard {server.url}/train/train-000003.tar: HTTP 404" in result.stderr
    assert server.requests["train/train-000003.tar"] >= 1
    assert strict.returncode == 3 and "train-000003.tar" in strict.stderr


PROBE = (
    "data.mean=[0.286]",
    "data.std=[0.353]",
    "schedule.epochs=1",
    "model.name=mae_vit_debug",
    "model.img_size=28",
    "model.patch_size=7",
    "model.in_chans=1",
    "init.from=none",
    *FAST_RETRIES,
)


def linprobe_run(run_dir, train, val, *overrides):
    return run_cli(
        "linprobe",
        "--config",
        "configs/linprobe/debug.yaml",
        f"data.train={train}",
        f"data.val={val}",
        f"run.dir={run_dir}",
        *PROBE,
        *overrides,
        timeout=120,
    )


def linprobe(run_dir, train, val, *overrides):
    result = linprobe_run(run_dir, train, val, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())["test"]


def test_linear_probe_on_remote_splits_equals_local(tmp_path, server, fmnist_shards):
    local = linprobe(tmp_path / "local", fmnist_shards["train"], fmnist_shards["val"])
    remote = linprobe(tmp_path / "http", f"{server.url}/train/_info.json", f"{server.url}/val/")
    assert remote["num_samples"] == 250  # every val sample exactly once
    assert remote == local


def json_labelled(source, target):
    """A copy of mim's shards in img2dataset's layout: the label a field of each sample's .json,
    a caption beside it, no .cls member."""
    target.mkdir(exist_ok=True)
    for shard in sorted(source.glob("*.tar")):
        with open(target / shard.name, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False)
            for sample in stream_samples(str(shard)):
                label = json.dumps({"label": int(sample["cls"])}).encode()
                writer.write({"__key__": sample["__key__"], "png": sample["png"], "json": label, "txt": b"x"})
            writer.close()
    return target


def test_a_probe_reads_labels_from_a_json_field_and_an_unset_label_key_is_named(tmp_path, fmnist_shards):
    train = json_labelled(fmnist_shards["train"], tmp_path / "train")
    val = json_labelled(fmnist_shards["val"], tmp_path / "val")
    expected = linprobe(tmp_path / "cls", fmnist_shards["train"], fmnist_shards["val"])
    got = linprobe(tmp_path / "json", train, val, "data.label_key=json:label", "model.num_classes=10")
    assert got == expected  # the same samples, the same labels: the same probe
    started = time.monotonic()
    unset = linprobe_run(tmp_path / "unset", train, val, "model.num_classes=10")  # no cls labels there
    assert unset.returncode == 3 and time.monotonic() - started < 30, unset.stderr[-3000:]
    assert (
        "has members json, png, txt and no 'cls' label: set data.label_key (e.g. json:label)" in unset.stderr
    )
    assert len(unset.stderr) < 1_000_000 and unset.stderr.count("skipping bad sample") <= 3 * 8 * 2


def test_a_served_index_that_names_a_command_stops_pretraining_before_it_runs(
    tmp_path, server, fmnist_shards
):
    marker = tmp_path / "the-command-ran"
    evil = fmnist_shards["train"].parent / "evil-index"
    evil.mkdir(exist_ok=True)
    entry = f"pipe:touch {marker}; cat {fmnist_shards['train'] / 'train-000000.tar'}"
    shards = [{"name": "train-000000.tar", "num_samples": 120}, {"name": entry, "num_samples": 120}]
    (evil / "_info.json").write_text(json.dumps({"name": "train", "classes": [], "shards": shards}))
    result = pretrain(tmp_path / "run", f"{server.url}/evil-index/_info.json")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"shard entry '{entry}' is not a relative path" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
