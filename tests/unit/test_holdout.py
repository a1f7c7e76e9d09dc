"""eval.holdout: a seeded share of a training split that the training stream never reads and the
selection split reads exactly, on real Fashion-MNIST shards."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from mim.data.holdout import Holdout
from mim.data.loaders import eval_loader, train_loader
from mim.data.shards import open_shards, with_lengths
from mim.data.streams import EvalStream, TrainStream, ViewSpec

WHOLE_IMAGE = ViewSpec(img_size=28, mode="L", crop_scale=(1.0, 1.0), hflip=False, needs_label=True)


@pytest.fixture()
def train(fmnist_shards):
    return with_lengths(open_shards(str(fmnist_shards["train"])))  # 960 samples in 8 shards


def read(stream, num_workers=0):
    """{global index: (image bytes, label)} of everything an EvalStream yields."""
    return {
        int(index): (bytes(image.numpy()), int(label))
        for images, labels, indices in eval_loader(stream, batch_size=16, num_workers=num_workers)
        for image, label, index in zip(images, labels, indices, strict=True)
    }


def test_the_holdout_is_seeded_about_its_share_and_keeps_every_class(train):
    held = Holdout(0.25, seed=0).indices(train.urls, train.lengths)
    assert held == Holdout(0.25, seed=0).indices(train.urls, train.lengths)
    assert held != Holdout(0.25, seed=1).indices(train.urls, train.lengths)
    assert list(held) == sorted(held) and 180 <= len(held) <= 300  # 240 expected
    labels = Counter(label for _, label in read(EvalStream(train, WHOLE_IMAGE, 0, 1, 1.0, held)).values())
    assert len(labels) == 10 and min(labels.values()) >= 10  # each class about its 10 % share


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 2)])
def test_streams_over_a_holdout_skip_it_and_the_selection_split_reads_only_it(train, world_size, num_workers):
    with_holdout = replace(train, held_out=Holdout(0.2, seed=0))
    held = set(with_holdout.held_out_indices())
    assert with_holdout.num_usable == 960 - len(held)
    kept, chosen = {}, {}
    for rank in range(world_size):
        kept |= read(EvalStream(with_holdout, WHOLE_IMAGE, rank, world_size, 1.0), num_workers)
        selection = EvalStream(train, WHOLE_IMAGE, rank, world_size, 1.0, sorted(held))
        chosen |= read(selection, num_workers)
    assert set(chosen) == held and set(kept) == set(range(960)) - held
    # The training stream reads the kept samples only: over more than an epoch, no held-out image.
    held_images = {image for image, _ in chosen.values()}
    stream = TrainStream(with_holdout, WHOLE_IMAGE, 32, seed=0, rank=0)
    seen = set()
    for number, batch in enumerate(train_loader(stream, num_workers)):
        seen |= {bytes(image.numpy()) for image in batch.images}
        if number == 40:  # 1,312 samples
            break
    assert len(seen) > 400 and not seen & held_images  # shards are resampled: not all 779 come up
