"""`mim shards --source wds:SHARDS` on mim's own shards (png + cls): each sample read in place
once, with its label; what it cannot read is a clear error."""

from __future__ import annotations

import pytest

from mim.data.foreign import webdataset_source
from mim.data.reading import stream_samples
from mim.errors import UserInputError


def test_every_sample_becomes_one_record_read_in_place(fmnist_shards):
    source = webdataset_source(str(fmnist_shards["val"]))
    expected = [
        (s["png"], int(s["cls"]))
        for url in sorted(fmnist_shards["val"].glob("*.tar"))
        for s in stream_samples(str(url))
    ]
    assert [(r.read()[0], r.label) for r in source.records] == expected
    assert {r.read()[1] for r in source.records} == {"png"}
    assert len(source.classes) == 10  # the index's class names


def test_a_key_without_that_member_is_named(fmnist_shards):
    with pytest.raises(UserInputError, match=r"no sample has an image among 'jpg'"):
        webdataset_source(str(fmnist_shards["val"]), image_key="jpg")


def test_remote_shards_are_refused_with_what_to_do_instead():
    with pytest.raises(UserInputError, match="re-shards local shards only.*data.train takes http"):
        webdataset_source("http://127.0.0.1:9/{0..1}.tar")
