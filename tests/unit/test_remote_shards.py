"""Shards read from a real HTTP server (started by the test on 127.0.0.1) and through `pipe:`
commands: the same samples as from disk, retries on transient failures that deliver every sample
exactly once, clear failures where retrying cannot help; and the bounded shuffle buffer."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from mim.data.batch import StreamPosition
from mim.data.loaders import train_loader
from mim.data.reading import ReadPolicy, ShardUnreadable, basename, stream_samples
from mim.data.shards import ShardSet, open_shards, with_lengths
from mim.data.streams import EvalStream, TrainStream, ViewSpec, shuffled
from mim.errors import TrainingStopped
from tests.http_server import FlakyServer

FAST = ReadPolicy(attempts=3, wait=0.05, timeout=10)
SHARD = "train-000001.tar"


@pytest.fixture()
def server(fmnist_shards):
    with FlakyServer(fmnist_shards["train"].parent) as running:
        yield running


def _keys_and_bytes(samples):
    return [(s["__key__"], s["png"] if "png" in s else s.get("jpg"), s["cls"]) for s in samples]


def local_samples(fmnist_shards, name=SHARD):
    return _keys_and_bytes(stream_samples(str(fmnist_shards["train"] / name)))


def test_http_and_pipe_give_the_samples_on_disk(server, fmnist_shards):
    expected = local_samples(fmnist_shards)
    assert len(expected) == 120
    assert _keys_and_bytes(stream_samples(f"{server.url}/train/{SHARD}", FAST)) == expected
    piped = f"pipe:cat {fmnist_shards['train'] / SHARD}"
    assert _keys_and_bytes(stream_samples(piped, FAST)) == expected
    assert basename(piped) == basename(f"{server.url}/train/{SHARD}") == SHARD


def test_503s_are_retried(server, fmnist_shards):
    server.unavailable[f"train/{SHARD}"] = 2
    got = _keys_and_bytes(stream_samples(f"{server.url}/train/{SHARD}", FAST))
    assert got == local_samples(fmnist_shards) and server.requests[f"train/{SHARD}"] == 3


def test_a_connection_cut_mid_shard_resumes_without_repeating_or_losing_a_sample(server, fmnist_shards):
    server.cut[f"train/{SHARD}"] = 2
    got = _keys_and_bytes(stream_samples(f"{server.url}/train/{SHARD}", FAST))
    assert got == local_samples(fmnist_shards)  # the same 120 samples, in order, once each
    assert server.requests[f"train/{SHARD}"] == 3


def test_a_shard_that_keeps_failing_or_is_missing_raises_naming_its_url(server):
    server.unavailable[f"train/{SHARD}"] = 99
    url = f"{server.url}/train/{SHARD}"
    with pytest.raises(ShardUnreadable, match=rf"{url}: HTTP 503 .*gave up after 3 tries"):
        list(stream_samples(url, FAST))
    assert server.requests[f"train/{SHARD}"] == 3
    missing = f"{server.url}/train/train-999999.tar"
    with pytest.raises(ShardUnreadable, match=rf"{missing}: HTTP 404"):
        list(stream_samples(missing, FAST))
    assert server.requests["train/train-999999.tar"] == 1  # not found is final: no retry
    with pytest.raises(ShardUnreadable, match="exited with status 1"):
        list(stream_samples("pipe:cat /nonexistent/shard.tar", FAST))


def test_an_info_json_by_url_lists_remote_shards_with_their_counts(server, fmnist_shards):
    shards = open_shards(f"{server.url}/train/_info.json", FAST)
    local = open_shards(str(fmnist_shards["train"]))
    assert shards.urls == [f"{server.url}/train/{basename(u)}" for u in local.urls]
    assert shards.lengths == local.lengths and shards.classes == local.classes
    assert open_shards(f"{server.url}/train/", FAST).urls == shards.urls
    pattern = open_shards(f"{server.url}/train/train-{{000000..000007}}.tar", FAST)
    assert pattern.urls == shards.urls and with_lengths(pattern).lengths == local.lengths
    with pytest.raises(ValueError, match="cannot read the shard index .*HTTP 404"):
        open_shards(f"{server.url}/nowhere/_info.json", FAST)
    (fmnist_shards["train"].parent / "bad.json").write_text(json.dumps({"shards": 3}))
    with pytest.raises(ValueError, match="is not a shard index mim reads"):
        open_shards(f"{server.url}/bad.json", FAST)


def _index(directory, names):
    directory.mkdir(parents=True, exist_ok=True)
    shards = [{"name": name, "num_samples": 120} for name in names]
    (directory / "_info.json").write_text(json.dumps({"name": "x", "classes": [], "shards": shards}))


@pytest.mark.parametrize(
    "entry",
    [
        "pipe:touch {marker}; cat train-000001.tar",
        "file://{marker}",
        "file:{marker}",
        "ftp://127.0.0.1/train-000001.tar",
        "http://127.0.0.2/train-000001.tar",
        "//127.0.0.2/train-000001.tar",
        "{marker}",
        "../train/train-000001.tar",
        "%2e%2e/train/train-000001.tar",
    ],
)
def test_an_index_served_over_http_never_names_commands_files_or_other_places(
    tmp_path, server, fmnist_shards, entry
):
    marker = tmp_path / "the-command-ran"
    name = entry.format(marker=marker)
    _index(fmnist_shards["train"].parent / "evil", ["train-000000.tar", name])
    with pytest.raises(ValueError, match=rf"evil/_info.json: shard entry '{re.escape(name)}' "):
        open_shards(f"{server.url}/evil/_info.json", FAST)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["../train/train-000001.tar", "/etc/passwd", "pipe:touch {marker}"])
def test_a_local_index_only_names_shards_below_its_directory(tmp_path, monkeypatch, fmnist_shards, entry):
    marker = tmp_path / "the-command-ran"
    name = entry.format(marker=marker)
    _index(tmp_path / "evil", [name])
    monkeypatch.chdir(tmp_path / "evil")  # `./pipe:...` must not come out as a bare `pipe:...`
    with pytest.raises(ValueError, match=rf"_info.json: shard entry '{re.escape(name)}' "):
        open_shards("_info.json")
    assert not marker.exists()
    _index(tmp_path / "good", ["sub/a.tar"])
    (tmp_path / "good" / "sub").mkdir()
    (tmp_path / "good" / "sub" / "a.tar").write_bytes((fmnist_shards["train"] / SHARD).read_bytes())
    assert open_shards(str(tmp_path / "good")).urls == [str(tmp_path / "good" / "sub" / "a.tar")]


def _batches(stream, count, workers=0):
    out = []
    for batch in train_loader(stream, workers):
        out.append(batch)
        if len(out) == count:
            return out
    return out


def test_training_and_evaluation_streams_read_remote_shards_as_local_ones(server, fmnist_shards):
    spec = ViewSpec(28, "L", needs_label=True)
    local = open_shards(str(fmnist_shards["train"]))
    remote = open_shards(f"{server.url}/train/_info.json", FAST)
    piped = open_shards(f"pipe:cat {fmnist_shards['train']}/train-{{000000..000007}}.tar", FAST)
    server.cut[f"train/{SHARD}"] = 1  # one stream cut on the way: no difference
    expected = _batches(TrainStream(local, spec, 32, seed=4, rank=0), 10)
    for shards in (remote, piped):
        got = _batches(TrainStream(shards, spec, 32, seed=4, rank=0), 10)
        assert all(torch.equal(a.images, b.images) for a, b in zip(expected, got, strict=True))
        assert [b.position for b in got] == [b.position for b in expected]
    # resume from the position of batch 6: the same batches 7.. as the uninterrupted stream
    position = StreamPosition(0, {0: expected[5].position})
    resumed = _batches(TrainStream(remote, spec, 32, seed=4, rank=0, start=position), 4)
    assert all(torch.equal(a.images, b.images) for a, b in zip(expected[6:], resumed, strict=True))
    # evaluation: every sample exactly once across 2 ranks, from the remote index's counts
    indices = [i for rank in (0, 1) for _, _, i in EvalStream(remote, spec, rank, 2, crop_fraction=1.0)]
    assert sorted(indices) == list(range(960))


def test_the_shuffle_buffer_holds_at_most_its_size_and_permutes_everything():
    pulled, emitted, ahead = 0, 0, 0

    def source():
        nonlocal pulled
        for i in range(5000):
            pulled += 1
            yield {"i": i}

    out = []
    for sample in shuffled(source(), random.Random(0), 100):
        emitted += 1
        ahead = max(ahead, pulled - emitted)
        out.append(sample["i"])
    assert sorted(out) == list(range(5000)) and out != list(range(5000))
    assert ahead <= 100  # memory: the buffer, whatever the length of the stream
    again = [s["i"] for s in shuffled(({"i": i} for i in range(5000)), random.Random(0), 100)]
    assert again == out  # seeded: a resumed chunk replays the same order


def test_a_training_stream_whose_shards_all_fail_stops_naming_them_instead_of_waiting_forever():
    shards = ShardSet(["pipe:exit 3", "/nonexistent/train-000000.tar"], None, [], ReadPolicy(attempts=1))
    with pytest.raises(TrainingStopped, match=r"no readable sample in 10 chunks .*train-000000.tar"):
        next(iter(TrainStream(shards, ViewSpec(28, "L"), 4, seed=0, rank=0)))
