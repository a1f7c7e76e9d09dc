"""Arrays and 16-bit images (mim.data.pixels): decoded into their units with their band count,
refused with the reason where they cannot be used; per-band stats; the patch embedding adapted
from another band count."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mim.config import ConfigError, DataConfig
from mim.data import transforms
from mim.data.indexes import parse_index
from mim.data.pixels import BadPixels, PixelStats, check_pixels
from mim.data.shards import ShardSet
from mim.data.transforms import BadSample, eval_view, normalize_on_device, train_view
from mim.errors import UserInputError
from mim.models.backbone import adapt_patch_embedding


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def test_a_16_bit_4_band_array_keeps_its_bands_and_depth():
    array = np.random.default_rng(0).integers(0, 65536, (40, 30, 4), dtype=np.uint16)
    whole = eval_view(npy(array), "4-band", 30, crop_fraction=1.0)  # the centre 30 x 30: no resize
    assert whole.dtype == torch.float32 and whole.shape == (4, 30, 30)
    expected = torch.from_numpy(array[5:35].astype(np.float32) / 65535).permute(2, 0, 1)
    assert torch.allclose(whole, expected)
    view = train_view(npy(array), "4-band", 16, random.Random(0), (0.2, 1.0), True)
    assert view.shape == (4, 16, 16) and view.dtype == torch.float32


def test_float_arrays_keep_their_values_and_uint8_arrays_stay_uint8():
    values = np.random.default_rng(1).normal(300.0, 50.0, (16, 16, 5)).astype(np.float32)
    view = eval_view(npy(values), "5-band", 16, crop_fraction=1.0)
    assert torch.allclose(view, torch.from_numpy(values).permute(2, 0, 1))
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert torch.equal(eval_view(npy(grey), "L", 16, crop_fraction=1.0)[0], torch.from_numpy(grey))


@pytest.mark.parametrize("format", ["PNG", "TIFF"])
def test_16_bit_grey_png_and_tiff_decode_to_their_units(format):
    array = np.random.default_rng(2).integers(0, 65536, (12, 12), dtype=np.uint16)
    view = eval_view(encoded(array, format), "L", 12, crop_fraction=1.0)
    assert torch.allclose(view[0], torch.from_numpy(array.astype(np.float32) / 65535))


def test_normalisation_takes_uint8_and_float_pixels_in_their_units():
    uint8 = torch.full((1, 2, 4, 4), 51, dtype=torch.uint8)
    units = torch.full((1, 2, 4, 4), 0.2)
    mean, std = [0.1, 0.2], [0.5, 0.25]
    assert torch.allclose(normalize_on_device(uint8, mean, std), normalize_on_device(units, mean, std))
    assert torch.allclose(normalize_on_device(units, mean, std)[0, :, 0, 0], torch.tensor([0.2, 0.0]))


@pytest.mark.parametrize(
    "payload, mode, said",
    [
        (npy(np.array([[np.nan, 1.0], [0.0, 1.0]], dtype=np.float32)), "L", "NaN"),
        (npy(np.zeros((8, 8, 3), dtype=np.uint16)), "4-band", "model takes 4"),
        (npy(np.zeros((8, 8), dtype=np.int64)), "L", "int64"),
        (npy(np.zeros((2, 8, 8, 3), dtype=np.uint8)), "RGB", "shape"),
        (b"\x93NUMPY" + b"\x01\x00garbage", "L", "cannot read"),
        (encoded(np.zeros((8, 8, 3), dtype=np.uint8), "PNG"), "4-band", "8-bit RGB image"),
    ],
    ids=["nan", "bands", "dtype", "shape", "corrupt", "rgb-into-4-bands"],
)
def test_unusable_pixels_are_bad_samples_that_say_why(payload, mode, said):
    with pytest.raises(BadSample, match=said):
        eval_view(payload, mode, 8, crop_fraction=1.0)


def test_stats_are_per_band_mean_and_std_and_refuse_mixed_band_counts():
    rng = np.random.default_rng(3)
    images = [torch.from_numpy(rng.random((3, 6, 7)).astype(np.float32)) for _ in range(4)]
    stats = PixelStats()
    for number, image in enumerate(images):
        stats.add(image, f"image {number}")
    info, every = stats.as_info(), torch.stack(images).double()
    assert info["bands"] == 3 and info["pixels"] == 4 * 6 * 7
    assert np.allclose(info["mean"], every.mean((0, 2, 3)).numpy())
    assert np.allclose(info["std"], every.std((0, 2, 3), unbiased=False).numpy())
    with pytest.raises(BadPixels, match="image 9 has 4 band.*image 0 has 3"):
        stats.add(torch.zeros(4, 2, 2), "image 9")


def test_an_index_whose_stats_do_not_match_its_bands_is_refused():
    entry = b'{"shards": [{"name": "a.tar", "num_samples": 1}], "pixels": {"bands": 4, "mean": [0.1], "std": [1]}}'
    with pytest.raises(UserInputError, match="4 band.*1 mean"):
        parse_index(entry, "shards/_info.json")
    good = entry.replace(b'"mean": [0.1], "std": [1]', b'"mean": [0,0,0,0], "std": [1,1,1,1]')
    assert parse_index(good, "shards/_info.json").pixels["bands"] == 4


def test_normalisation_follows_the_shards_stats_and_refuses_what_does_not_fit():
    stats = {"bands": 4, "mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 2.0, 3.0, 4.0]}
    data = DataConfig(train="shards")
    check_pixels(data, ShardSet([], None, [], pixels=stats), 4)
    assert (data.mean, data.std) == (stats["mean"], stats["std"])
    with pytest.raises(ConfigError, match="holds 4-band images.*takes 3"):
        check_pixels(DataConfig(train="shards"), ShardSet([], None, [], pixels=stats), 3)
    with pytest.raises(ConfigError, match="mim shards --stats"):
        check_pixels(DataConfig(train="shards"), ShardSet([], None, []), 4)
    with pytest.raises(ConfigError, match="data.mean needs 1 or 4 values"):
        check_pixels(DataConfig(train="shards", mean=[0.5, 0.5], std=[1.0]), ShardSet([], None, []), 4)
    grey = DataConfig(train="shards")
    check_pixels(grey, ShardSet([], None, []), 1)
    assert (grey.mean, grey.std) == ([0.485], [0.229])  # ImageNet's first band, as before


def test_an_adapted_patch_embedding_embeds_an_image_alike_in_every_band_as_before():
    generator = torch.Generator().manual_seed(0)
    rgb = torch.randn(32, 3, 7, 7, generator=generator, dtype=torch.float64)
    flat = torch.rand(1, 1, 14, 14, generator=generator, dtype=torch.float64)
    before = torch.nn.functional.conv2d(flat.expand(-1, 3, -1, -1), rgb, stride=7)
    for bands in (1, 4, 13):
        adapted = adapt_patch_embedding(rgb, bands)
        assert adapted.shape == (32, bands, 7, 7)
        after = torch.nn.functional.conv2d(flat.expand(-1, bands, -1, -1), adapted, stride=7)
        assert torch.allclose(before, after, rtol=1e-12, atol=1e-12)


def test_rgb_only_augmentations_are_skipped_on_deep_images_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(transforms, "_SKIPPED", set())  # warned once per process: not yet in this one
    array = np.random.default_rng(4).integers(0, 65536, (20, 20), dtype=np.uint16)

    def augmentation(image):
        raise AssertionError("an RGB augmentation was given a 16-bit image")

    with caplog.at_level("WARNING"):
        plain = train_view(npy(array), "L", 16, random.Random(0), (0.5, 1.0), True)
        view = train_view(npy(array), "L", 16, random.Random(0), (0.5, 1.0), True, extra=augmentation)
    assert torch.equal(view, plain)
    assert "RandAugment and colour jitter work on 8-bit grey or RGB images" in caplog.text
