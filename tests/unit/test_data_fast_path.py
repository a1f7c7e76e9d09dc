"""The data path's fast decode and its robustness: crops drawn from the header before decoding,
reduced-scale JPEG decoding only where the crop keeps the output resolution, pixels equal to the
reference path elsewhere; every kind of bad sample skipped and counted per shard, in real tars."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mim.data.loaders import train_loader
from mim.data.shards import open_shards
from mim.data.streams import TrainStream, ViewSpec
from mim.data.transforms import (
    BadSample,
    decode_region,
    eval_view,
    open_image,
    random_resized_crop_box,
    reduction_for,
    resize_region,
    train_view,
)
from tests.conftest import jpeg_bytes


def photo_jpeg(seed: int, size=(1200, 900)) -> bytes:
    return jpeg_bytes(random.Random(seed), size)


def test_reduction_only_where_the_crop_keeps_the_output_size():
    image = open_image(photo_jpeg(0))
    assert reduction_for(image, (0, 0, 1200, 900), 224) == 4  # 900 >= 4 * 224
    assert reduction_for(image, (0, 0, 600, 460), 224) == 2
    assert reduction_for(image, (0, 0, 447, 900), 224) == 1  # one side under 2 * 224
    png = io.BytesIO()
    Image.new("RGB", (1200, 900)).save(png, format="PNG")
    assert reduction_for(open_image(png.getvalue()), (0, 0, 1200, 900), 224) == 1  # not a JPEG


@pytest.mark.parametrize("size", [64, 224])
def test_fast_path_has_the_reference_crops_and_pixels(size):
    """Same RNG -> same crop boxes; identical pixels where no reduction applies, and close pixels
    (the reduced DCT decode is a good low-pass) where one does."""
    payloads = [photo_jpeg(seed, (random.Random(seed).randint(300, 1200), 700)) for seed in range(24)]
    reduced = identical = 0
    for index, payload in enumerate(payloads):
        fast_boxes, reference_boxes = [], []
        for boxes, reduce in ((fast_boxes, True), (reference_boxes, False)):
            rng = random.Random(index)

            def crop(width, height, rng=rng, boxes=boxes):
                boxes.append(random_resized_crop_box(width, height, rng, (0.2, 1.0)))
                return boxes[-1]

            pixels, box = decode_region(payload, "RGB", crop, size, reduce)
            boxes.append(resize_region(pixels, box, size))
        assert fast_boxes[0] == reference_boxes[0]
        fast, reference = fast_boxes[1], reference_boxes[1]
        assert fast.shape == reference.shape == (3, size, size) and fast.dtype == torch.uint8
        if reduction_for(open_image(payload), fast_boxes[0], size) == 1:
            identical += 1
            assert torch.equal(fast, reference)
        else:
            reduced += 1
            difference = (fast.int() - reference.int()).abs().float()
            assert difference.mean() < 4.0, difference.mean()  # box snapped to the reduced grid
    assert reduced > 0 and (identical > 0 or size < 100)  # both cases were exercised at 224


def test_train_view_crop_statistics_match_torchvision():
    """The boxes the fast path decodes for follow RandomResizedCrop's distribution (area and log
    aspect), and flips are drawn half the time."""
    from torchvision.transforms import RandomResizedCrop

    payload = photo_jpeg(1, (500, 375))
    boxes, flips = [], 0
    rng = random.Random(0)
    for _ in range(1500):
        box = random_resized_crop_box(500, 375, rng, (0.2, 1.0))
        boxes.append(box)
        flips += rng.random() < 0.5
    torch.manual_seed(0)
    theirs = []
    for _ in range(1500):
        top, left, height, width = RandomResizedCrop.get_params(
            torch.zeros(3, 375, 500), (0.2, 1.0), (3 / 4, 4 / 3)
        )
        theirs.append((left, top, left + width, top + height))

    def stats(found):
        area = np.array([(r - left) * (b - t) / (500 * 375) for left, t, r, b in found])
        aspect = np.log([(r - left) / (b - t) for left, t, r, b in found])
        return area.mean(), area.std(), aspect.mean(), aspect.std()

    for ours, reference in zip(stats(boxes), stats(theirs), strict=True):
        assert abs(ours - reference) < 0.03
    assert 0.45 < flips / 1500 < 0.55
    # and train_view draws exactly this box and flip from the same RNG
    view = train_view(payload, "RGB", 32, random.Random(0), (0.2, 1.0), hflip=True, reduce=False)
    pixels, box = decode_region(payload, "RGB", lambda w, h: boxes[0], 32, reduce=False)
    expected = resize_region(pixels, box, 32)
    rng = random.Random(0)
    random_resized_crop_box(500, 375, rng, (0.2, 1.0))
    assert torch.equal(view, expected.flip(-1) if rng.random() < 0.5 else expected)


def test_resize_matches_pil_bicubic():
    """The uint8 antialiased bicubic resize is PIL's filter: the official pipeline's pixels, to
    within rounding."""
    payload = photo_jpeg(2, (500, 375))
    image = Image.open(io.BytesIO(payload)).convert("RGB")
    for box, size in (((50, 40, 450, 340), 224), ((10, 10, 110, 90), 224), ((0, 0, 500, 375), 64)):
        reference = torch.from_numpy(np.asarray(image.resize((size, size), Image.BICUBIC, box=box)).copy())
        pixels, _ = decode_region(payload, "RGB", lambda w, h, b=box: b, size, reduce=False)
        ours = resize_region(pixels, box, size).permute(1, 2, 0)
        difference = (ours.int() - reference.int()).abs()
        assert difference.float().mean() < 0.1 and difference.max() <= 8


def test_eval_view_reduces_large_images_and_keeps_small_ones_exact():
    large, small = photo_jpeg(3, (1600, 1200)), photo_jpeg(4, (500, 375))
    fast, reference = eval_view(large, "RGB", 224), eval_view(large, "RGB", 224, reduce=False)
    assert (fast.int() - reference.int()).abs().float().mean() < 2.0
    assert torch.equal(eval_view(small, "RGB", 224), eval_view(small, "RGB", 224, reduce=False))
    grey = eval_view(large, "L", 224)
    assert grey.shape == (1, 224, 224)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(BadSample, match="decompression bomb|exceeds limit"):
        open_image(png_header_only(20000, 20000))
    with pytest.raises(BadSample):
        train_view(png_header_only(20000, 20000), "RGB", 32, random.Random(0), (0.2, 1.0), True)


# ----------------------------------------------------------------------------- bad samples


def write_tar(path, samples):
    with wds.TarWriter(str(path), encoder=False) as writer:
        for key, fields in samples:
            writer.write({"__key__": key, **fields})


def good(index: int) -> tuple[str, dict]:
    return f"{index:06d}", {"jpg": jpeg_bytes(random.Random(index), (48, 40)), "cls": b"1"}


BAD_KINDS = {
    "corrupt JPEG": lambda i: (f"{i:06d}", {"jpg": b"\xff\xd8\xff\xe0" + bytes(200), "cls": b"1"}),
    "truncated JPEG": lambda i: (
        f"{i:06d}",
        {"jpg": jpeg_bytes(random.Random(i), (48, 40))[:300], "cls": b"1"},
    ),
    "not an image": lambda i: (f"{i:06d}", {"jpg": b"this is text, not pixels" * 4, "cls": b"1"}),
    "no image at all": lambda i: (f"{i:06d}", {"txt": b"a caption", "cls": b"1"}),
    "no label": lambda i: (f"{i:06d}", {"jpg": jpeg_bytes(random.Random(i), (48, 40))}),
    "bad label": lambda i: (f"{i:06d}", {"jpg": jpeg_bytes(random.Random(i), (48, 40)), "cls": b"cat"}),
    "decompression bomb": lambda i: (f"{i:06d}", {"png": png_header_only(20000, 20000), "cls": b"1"}),
}


def bad_counts(directory, batches: int, batch_size: int) -> Counter:
    stream = TrainStream(
        open_shards(str(directory)),
        ViewSpec(16, "RGB", needs_label=True),
        batch_size,
        seed=0,
        rank=0,
        shards_per_chunk=1,
    )
    counts: Counter = Counter()
    for batch in list(_take(train_loader(stream, 0), batches)):
        assert batch.images.shape == (batch_size, 3, 16, 16) and (batch.labels == 1).all()
        counts.update(batch.bad)
    return counts


def _take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_each_kind_of_bad_sample_is_skipped_and_counted_per_shard(tmp_path, kind):
    """A shard of 6 good and 3 bad samples, read 4 times (one shard per chunk, batches of 6): the
    batches hold only good samples and the bad ones are counted against that shard, 3 per read."""
    samples = [good(i) for i in range(6)] + [BAD_KINDS[kind](100 + i) for i in range(3)]
    random.Random(0).shuffle(samples)
    write_tar(tmp_path / "mixed-000000.tar", samples)
    counts = bad_counts(tmp_path, batches=4, batch_size=6)
    assert set(counts) == {"mixed-000000.tar"}
    assert 9 <= counts["mixed-000000.tar"] <= 12  # the 4th read's bad samples may follow its batch


def test_empty_shard_and_truncated_tar_are_counted(tmp_path):
    write_tar(tmp_path / "a-000000.tar", [good(i) for i in range(8)])
    (tmp_path / "a-000001.tar").write_bytes(b"")  # empty file
    write_tar(tmp_path / "a-000002.tar", [])  # a tar with no members
    write_tar(tmp_path / "a-000003.tar", [good(i) for i in range(8, 40)])
    whole = (tmp_path / "a-000003.tar").read_bytes()
    (tmp_path / "a-000003.tar").write_bytes(whole[: len(whole) // 2])
    counts = bad_counts(tmp_path, batches=30, batch_size=4)
    assert counts["a-000001.tar"] > 0 and counts["a-000002.tar"] > 0 and counts["a-000003.tar"] > 0
    assert "a-000000.tar" not in counts
