"""Shard indexes other tools write, read by mim (timm's `splits`, open_clip's `sizes.json`,
img2dataset's per-shard `_stats.json`), on real tar shards, locally and from a real HTTP server
on 127.0.0.1; and what an index may not name."""

from __future__ import annotations

import json
import os

import pytest

from mim.data.reading import ReadPolicy
from mim.data.shards import ShardSet, open_shards, with_lengths
from tests.http_server import FlakyServer

FAST = ReadPolicy(attempts=2, wait=0.05, timeout=10)


@pytest.fixture()
def server(fmnist_shards):
    with FlakyServer(fmnist_shards["train"].parent) as running:
        yield running


def linked(directory, shards, rename=lambda name: name):
    """`directory` holding links to the given shard files (new names through `rename`)."""
    directory.mkdir(exist_ok=True)
    names = []
    for path in shards:
        name = rename(path.name)
        if not (directory / name).exists():
            os.symlink(path, directory / name)
        names.append(name)
    return names


def counted(directory, names):
    return with_lengths(ShardSet([str(directory / n) for n in names], None, [])).lengths


def test_a_timm_index_gives_each_split_with_its_counts(fmnist_shards, server):
    root = fmnist_shards["train"].parent / "timm-layout"
    train = linked(root, sorted(fmnist_shards["train"].glob("*.tar")))
    val = linked(root, sorted(fmnist_shards["val"].glob("*.tar")))
    splits = {
        split: {
            "name": split,
            "num_samples": sum(counted(root, names)),
            "filenames": names,
            "shard_lengths": counted(root, names),
        }
        for split, names in (("train", train), ("validation", val))
    }
    (root / "_info.json").write_text(json.dumps({"name": "fmnist", "splits": splits}))
    default = open_shards(str(root))  # several splits: train
    assert [os.path.basename(u) for u in default.urls] == train and default.num_samples == 960
    validation = open_shards(f"{root}::validation")
    assert validation.lengths == counted(root, val) and validation.num_samples == 250
    (root / "_info.json").rename(root / "info.json")  # timm's other name
    assert open_shards(f"{root}::validation").urls == validation.urls
    remote = open_shards(f"{server.url}/timm-layout/info.json::validation", FAST)
    assert remote.urls == [f"{server.url}/timm-layout/{name}" for name in val]
    assert remote.lengths == validation.lengths
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits: \['train', 'validation'\]"):
        open_shards(f"{root}::test")
    mine = open_shards(f"{fmnist_shards['val']}::val")  # mim's own index carries its split for timm
    assert mine.urls == open_shards(str(fmnist_shards["val"])).urls and mine.num_samples == 250
    with pytest.raises(ValueError, match="picks a split of an index"):
        open_shards(f"{root}/{train[0]}::train")


def test_open_clip_sizes_json_gives_the_counts(fmnist_shards):
    root = fmnist_shards["train"].parent / "openclip-layout"
    names = linked(root, sorted(fmnist_shards["val"].glob("*.tar")), lambda n: n.replace("val-", "shard-"))
    (root / "sizes.json").write_text(json.dumps(dict(zip(names, counted(root, names), strict=True))))
    shards = open_shards(str(root))
    assert shards.lengths == counted(root, names) == [100, 100, 50]


def img2dataset_layout(fmnist_shards, with_stats=True):
    root = fmnist_shards["train"].parent / ("i2d" if with_stats else "i2d-bare")
    names = linked(root, sorted(fmnist_shards["train"].glob("*.tar")), lambda n: f"{int(n[6:12]):05d}.tar")
    if with_stats:
        for name, count in zip(names, counted(root, names), strict=True):
            stats = {"count": count + 3, "successes": count, "failed_to_download": 3, "status_dict": {}}
            (root / name.replace(".tar", "_stats.json")).write_text(json.dumps(stats))
    return root, names


def test_img2dataset_stats_give_the_counts_locally_and_over_http(fmnist_shards, server):
    root, names = img2dataset_layout(fmnist_shards)
    expected = counted(root, names)
    assert open_shards(str(root)).lengths == expected
    assert open_shards(f"{root}/{{00000..00007}}.tar").lengths == expected
    remote = open_shards(f"{server.url}/i2d/{{00000..00007}}.tar", FAST)
    assert remote.lengths == expected and server.requests["i2d/00003_stats.json"] == 1
    bare, _ = img2dataset_layout(fmnist_shards, with_stats=False)
    assert open_shards(str(bare)).lengths is None  # counted from the tars when needed
    assert open_shards(f"{server.url}/i2d-bare/{{00000..00007}}.tar", FAST).lengths is None
    assert server.requests["i2d-bare/00000_stats.json"] == 1  # one look, not one per shard
    assert server.requests["i2d-bare/00001_stats.json"] == 0


@pytest.mark.parametrize(
    "index",
    [
        {
            "splits": {
                "train": {
                    "name": "t",
                    "num_samples": 1,
                    "filenames": ["pipe:touch MARKER"],
                    "shard_lengths": [1],
                }
            }
        },
        {"../x.tar": 3},
    ],
)
def test_other_formats_name_no_commands_or_files_elsewhere(tmp_path, index):
    marker = tmp_path / "ran"
    (tmp_path / "_info.json").write_text(json.dumps(index).replace("MARKER", str(marker)))
    with pytest.raises(ValueError, match="shard entry .* (is not a relative path|climbs out)"):
        open_shards(str(tmp_path))
    assert not marker.exists()
