"""Shards written by `mim shards` read back right; streams resume exactly; evaluation reads every
sample once across ranks and workers."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from mim.data.batch import StreamPosition
from mim.data.loaders import eval_loader, train_loader
from mim.data.shards import open_shards, with_lengths, write_shards
from mim.data.sources import csv_table, image_folder
from mim.data.streams import EvalStream, TrainStream, ViewSpec, spread_subset
from mim.data.transforms import random_resized_crop_box
from tests.conftest import fashion_mnist_subset, jpeg_source, run_cli


def _read_back(directory):
    samples = list(wds.WebDataset(sorted(str(p) for p in directory.glob("*.tar")), shardshuffle=False))
    return samples


def test_fashion_mnist_shards_keep_counts_labels_and_pixels(tmp_path):
    source = fashion_mnist_subset("test", 50)
    info_path = write_shards(source, tmp_path, name="val", shard_size=16)
    info = json.loads(info_path.read_text())
    assert [s["num_samples"] for s in info["shards"]] == [16, 16, 16, 2]
    assert info["num_samples"] == 50 and info["classes"][9] == "Ankle boot"
    assert info["splits"]["val"]["shard_lengths"] == [16, 16, 16, 2]
    samples = _read_back(tmp_path)
    assert len(samples) == 50
    by_key = {int(s["__key__"]): s for s in samples}
    for index in (0, 17, 49):
        payload, _ = source.records[index].read()
        assert by_key[index]["png"] == payload  # lossless PNG of the idx pixels, unchanged
        assert int(by_key[index]["cls"]) == source.records[index].label
    assert Counter(int(s["cls"]) for s in samples) == Counter(r.label for r in source.records)
    # timm's WebDataset reader takes the same directory through _info.json's splits entry
    from timm.data import create_dataset

    dataset = create_dataset("wds/fmnist", root=str(tmp_path), split="val", is_training=False, batch_size=1)
    assert len(dataset) == 50
    assert Counter(label for _, label in dataset) == Counter(r.label for r in source.records)


def test_limit_writes_a_seeded_subset_or_the_first_records(tmp_path):
    source = fashion_mnist_subset("test", 40)
    keys = lambda directory: sorted(int(s["__key__"]) for s in _read_back(directory))  # noqa: E731
    info = json.loads(write_shards(source, tmp_path / "a", shard_size=4, limit=10).read_text())
    assert info["num_samples"] == 10 and [s["num_samples"] for s in info["shards"]] == [4, 4, 2]
    subset = keys(tmp_path / "a")
    assert len(set(subset)) == 10 and subset != list(range(10))  # a random subset, not the head
    write_shards(source, tmp_path / "b", shard_size=4, limit=10)
    assert keys(tmp_path / "b") == subset  # the same seed, the same subset
    write_shards(source, tmp_path / "c", shard_size=4, limit=10, shuffle_seed=None)
    assert keys(tmp_path / "c") == list(range(10))
    with pytest.raises(ValueError, match="limit must be at least 1 record, got 0"):
        write_shards(source, tmp_path / "d", limit=0)
    # a rerun into the same directory with other options is refused, the shards left as they were
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(ValueError, match=r"holds train shards .*\(limit 10 -> 20\).*another --out"):
        write_shards(source, tmp_path / "a", shard_size=4, limit=20)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_image_folder_and_csv_keep_original_bytes(tmp_path):
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 10), colour).save(tmp_path / "images" / name / f"{i}.jpg", quality=95)
    folder = image_folder(tmp_path / "images")
    assert folder.classes == ["cat", "dog"]
    write_shards(folder, tmp_path / "shards", shard_size=4)
    samples = _read_back(tmp_path / "shards")
    originals = {
        (tmp_path / "images" / n / f"{i}.jpg").read_bytes() for n in ("cat", "dog") for i in range(3)
    }
    assert {s["jpg"] for s in samples} == originals
    rows = ["path,label"] + [f"images/{n}/{i}.jpg,{n}" for n in ("dog", "cat") for i in range(3)]
    (tmp_path / "list.csv").write_text("\n".join(rows))
    table = csv_table(tmp_path / "list.csv")
    assert table.classes == ["cat", "dog"] and [r.label for r in table.records] == [1, 1, 1, 0, 0, 0]


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "bad.csv").write_text("a.jpg,1,extra\n")
    with pytest.raises(ValueError, match="row 1 has 3 fields"):
        csv_table(tmp_path / "bad.csv")


def test_shards_cli_writes_and_resumes(tmp_path, fmnist_shards):
    (tmp_path / "src" / "a").mkdir(parents=True)
    for i in range(5):
        Image.new("L", (8, 8), i * 40).save(tmp_path / "src" / "a" / f"{i}.png")
    result = run_cli(
        "shards",
        "--source",
        f"imagefolder:{tmp_path / 'src'}",
        "--out",
        str(tmp_path / "out"),
        "--shard-size",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        f"train-00000{i}.tar" for i in range(3)
    ]
    first = (tmp_path / "out" / "train-000000.tar").stat().st_mtime_ns
    again = run_cli(
        "shards",
        "--source",
        f"imagefolder:{tmp_path / 'src'}",
        "--out",
        str(tmp_path / "out"),
        "--shard-size",
        "2",
    )
    assert again.returncode == 0 and (tmp_path / "out" / "train-000000.tar").stat().st_mtime_ns == first
    other = run_cli(
        "shards",
        "--source",
        f"imagefolder:{tmp_path / 'src'}",
        "--out",
        str(tmp_path / "out"),
        "--shard-size",
        "3",
    )
    assert other.returncode == 2 and "shard_size 2 -> 3" in other.stderr
    assert (tmp_path / "out" / "train-000000.tar").stat().st_mtime_ns == first
    bad = run_cli("shards", "--source", f"imagefolder:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_shards_max_size_downscales_large_images_only(tmp_path):
    """--max-size S: images with a shorter side over S come back with shorter side S (JPEG), the
    others keep their original bytes."""
    from tests.conftest import jpeg_bytes

    (tmp_path / "src" / "a").mkdir(parents=True)
    large = jpeg_bytes(random.Random(0), (600, 400))
    small = jpeg_bytes(random.Random(1), (120, 90))
    (tmp_path / "src" / "a" / "large.jpg").write_bytes(large)
    (tmp_path / "src" / "a" / "small.jpg").write_bytes(small)
    Image.new("RGB", (300, 500), (10, 200, 30)).save(tmp_path / "src" / "a" / "lossless.png")
    source = f"imagefolder:{tmp_path / 'src'}"
    result = run_cli(
        "shards", "--source", source, "--out", str(tmp_path / "out"), "--max-size", "100", "--no-shuffle"
    )
    assert result.returncode == 0, result.stderr
    samples = {s["__key__"]: s for s in _read_back(tmp_path / "out")}
    by_name = dict(zip(["large", "lossless", "small"], [samples[k] for k in sorted(samples)], strict=True))
    assert Image.open(io.BytesIO(by_name["large"]["jpg"])).size == (150, 100)
    assert Image.open(io.BytesIO(by_name["lossless"]["png"])).size == (100, 167)
    assert by_name["small"]["jpg"] == small
    bad = run_cli("shards", "--source", source, "--out", str(tmp_path / "x"), "--max-size", "0")
    assert bad.returncode == 2 and "max_size must be at least 1" in bad.stderr


def _spec(needs_label=False):
    return ViewSpec(img_size=28, mode="L", crop_scale=(0.2, 1.0), hflip=True, needs_label=needs_label)


def _take(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_stream_resumes_exactly_where_it_stopped(fmnist_shards, num_workers):
    shards = open_shards(str(fmnist_shards["train"]))
    straight = _take(train_loader(TrainStream(shards, _spec(), 16, seed=3, rank=0), num_workers), 12)
    position = StreamPosition(num_workers)
    for batch in straight[:7]:
        position.advance(batch)
    saved = StreamPosition.from_state(position.state_dict(), num_workers)  # as a checkpoint keeps it
    resumed_stream = TrainStream(shards, _spec(), 16, seed=3, rank=0, start=saved)
    resumed = _take(train_loader(resumed_stream, num_workers), 5)
    for expected, got in zip(straight[7:], resumed, strict=True):
        assert torch.equal(expected.images, got.images) and torch.equal(expected.labels, got.labels)


def test_train_stream_differs_by_rank_and_passes_epoch_boundaries(fmnist_shards):
    shards = open_shards(str(fmnist_shards["train"]))
    first = _take(train_loader(TrainStream(shards, _spec(), 32, seed=0, rank=0), 0), 40)  # > 1 epoch of 960
    other = _take(train_loader(TrainStream(shards, _spec(), 32, seed=0, rank=1), 0), 1)
    assert len(first) == 40 and not torch.equal(first[0].images, other[0].images)
    assert first[0].images.dtype == torch.uint8 and first[0].images.shape == (32, 1, 28, 28)


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 0)])
def test_eval_reads_every_sample_exactly_once(fmnist_shards, world_size, num_workers):
    shards = with_lengths(open_shards(str(fmnist_shards["val"])))
    assert shards.num_samples == 250  # does not divide evenly by 3 ranks or 2 workers
    seen = []
    for rank in range(world_size):
        stream = EvalStream(shards, _spec(needs_label=True), rank, world_size, crop_fraction=1.0)
        for _, _, indices in eval_loader(stream, batch_size=7, num_workers=num_workers):
            seen += indices.tolist()
    assert sorted(seen) == list(range(250))


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 0)])
def test_a_subset_is_read_exactly_once_and_only_as_far_as_it_goes(fmnist_shards, world_size, num_workers):
    shards = with_lengths(open_shards(str(fmnist_shards["val"])))  # 3 shards: 100, 100, 50 samples
    subset = spread_subset(shards.lengths, 25)
    assert subset == (*range(0, 10), *range(100, 110), *range(200, 205))  # a tenth of each shard
    seen = []
    for rank in range(world_size):
        stream = EvalStream(shards, _spec(needs_label=True), rank, world_size, 1.0, subset)
        for _, _, indices in eval_loader(stream, batch_size=4, num_workers=num_workers):
            seen += indices.tolist()
    assert sorted(seen) == list(subset)


def test_a_subset_stops_reading_each_shard_after_its_last_wanted_sample(tmp_path, caplog):
    """The tail of the shard past the subset is cut off (a truncated tar): reading the subset
    never reaches it, reading the whole split does and reports it."""
    write_shards(fashion_mnist_subset("test", 100), tmp_path / "one", name="one", shard_size=100)
    shard = next((tmp_path / "one").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shards = open_shards(str(tmp_path / "one"))  # its _info.json still says 100 samples
    subset = spread_subset(shards.lengths, 10)
    assert subset == tuple(range(10))
    with caplog.at_level("WARNING"):
        read = [index for _, _, index in EvalStream(shards, _spec(needs_label=True), 0, 1, 1.0, subset)]
    assert read == list(subset) and "skipping" not in caplog.text
    with caplog.at_level("WARNING"):
        whole = [index for _, _, index in EvalStream(shards, _spec(needs_label=True), 0, 1, 1.0)]
    assert 10 < len(whole) < 100 and "skipping the rest of shard" in caplog.text


def test_spread_subset_keeps_the_count_and_the_whole_split_is_none():
    assert spread_subset([7, 5, 3], None) is None and spread_subset([7, 5, 3], 15) is None
    subset = spread_subset([7, 5, 3], 8)
    assert len(subset) == 8 and len(set(subset)) == 8 and list(subset) == sorted(subset)
    per_shard = Counter(0 if i < 7 else 1 if i < 12 else 2 for i in subset)
    assert per_shard == {0: 4, 1: 3, 2: 1}  # 3.73, 2.67, 1.6 -> largest remainders get the rest


def test_crop_boxes_follow_torchvision_distribution():
    from torchvision.transforms import RandomResizedCrop

    rng = random.Random(0)
    torch.manual_seed(0)
    ours = [random_resized_crop_box(500, 375, rng, (0.2, 1.0)) for _ in range(4000)]
    image = torch.zeros(3, 375, 500)
    theirs = []
    for _ in range(4000):
        top, left, height, width = RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
        theirs.append((left, top, left + width, top + height))

    def stats(boxes):
        areas = torch.tensor(
            [(right - left) * (bottom - top) / (500 * 375) for left, top, right, bottom in boxes]
        )
        aspect = torch.tensor([(right - left) / (bottom - top) for left, top, right, bottom in boxes]).log()
        return areas.mean().item(), areas.std().item(), aspect.mean().item(), aspect.std().item()

    for a, b in zip(stats(ours), stats(theirs), strict=True):
        assert abs(a - b) < 0.02


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    write_shards(jpeg_source(20), tmp_path, shard_size=10)
    victim = tmp_path / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with tarfile.open(tmp_path / "train-000000.tar") as archive:
        assert len(archive.getmembers()) == 20
    stream = TrainStream(
        open_shards(str(tmp_path)), ViewSpec(16, "RGB"), 4, seed=0, rank=0, shards_per_chunk=2
    )
    batches = _take(train_loader(stream, 0), 20)
    bad = Counter()
    for batch in batches:
        bad.update(batch.bad)
    assert len(batches) == 20 and set(bad) == {"train-000001.tar"}
