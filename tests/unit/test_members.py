"""Which member of a sample is the image and which the label (data.image_key, data.label_key):
samples as webdataset reads them from real tar shards, and the messages for samples that lack
what was asked."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from mim.data.members import check_keys, sample_image, sample_label
from mim.data.reading import stream_samples
from mim.data.transforms import BadSample
from mim.errors import UserInputError


@pytest.fixture()
def foreign_shard(tmp_path, fmnist_shards):
    """img2dataset's layout: <key>.png + <key>.json (label in a field) + <key>.txt, no .cls."""
    originals = list(stream_samples(str(fmnist_shards["val"] / "val-000000.tar")))[:5]
    path = tmp_path / "00000.tar"
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for sample in originals:
            label = int(sample["cls"])
            writer.write(
                {
                    "__key__": sample["__key__"],
                    "png": sample["png"],
                    "json": json.dumps({"label": label, "url": "http://x"}).encode(),
                    "txt": b"a caption",
                }
            )
        writer.close()
    return originals, list(stream_samples(str(path)))


def test_image_and_label_members_are_found_by_key(foreign_shard):
    originals, samples = foreign_shard
    for original, sample in zip(originals, samples, strict=True):
        assert sample_image(sample, "jpg;jpeg;png") == original["png"]  # the first present
        assert sample_label(sample, "json:label") == int(original["cls"]) == sample_label(original, "cls")
        assert sample_label(sample, "cls") is None  # absent: the caller decides
    with pytest.raises(BadSample, match=r"has members json, png, txt and no image among 'jpg;webp'"):
        sample_image(samples[0], "jpg;webp")
    broken = dict(samples[0], json=b'{"label": "cat"}')
    with pytest.raises(BadSample, match=r"label 'cat' \(json:label\) is not an integer"):
        sample_label(broken, "json:label")


def test_bad_keys_are_refused_before_any_work():
    with pytest.raises(UserInputError, match="data.image_key must name at least one member"):
        check_keys(" ; ", "cls")
    with pytest.raises(UserInputError, match="data.label_key must be a member"):
        check_keys("jpg", "json:")
    check_keys("jpg;png", "json:label")
