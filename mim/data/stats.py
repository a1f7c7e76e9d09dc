"""`mim shards --stats`: the per-band mean and std of a split's pixels, in their units
(mim.data.pixels), written into its _info.json as `pixels`, where the stages take their
normalisation from by default (data.mean / data.std null)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mim.data.members import sample_image
from mim.data.pixels import BadPixels, PixelStats, decode_deep, is_array
from mim.data.reading import stream_samples
from mim.data.transforms import BadSample, open_image, to_uint8_tensor
from mim.errors import UserInputError
from mim.files import atomic_write_text


def pixel_stats(urls: list[str], image_key: str, on_image: Callable[[], None] = lambda: None) -> dict:
    """Every image of the shards, decoded whole. Arrays and 16-bit images count as they are and must
    all have one band count; 8-bit images count as the first one's mode (L or RGB), as the loader
    converts them."""
    stats, mode = PixelStats(), None
    for url in urls:
        for sample in stream_samples(url):
            name = f"sample {sample['__key__']} in {url}"
            try:
                payload = sample_image(sample, image_key)
                image = None if is_array(payload) else open_image(payload)
                pixels = decode_deep(payload, image)
                if pixels is None:
                    mode = mode or ("L" if image.mode in ("L", "LA", "1") else "RGB")
                    pixels = to_uint8_tensor(image.convert(mode) if image.mode != mode else image)
            except (BadPixels, BadSample, OSError, ValueError) as error:
                raise UserInputError(f"{name}: {error}") from None
            try:
                stats.add(pixels, name)
            except BadPixels as error:  # it names both images
                raise UserInputError(str(error)) from None
            on_image()
    if stats.bands is None:
        raise UserInputError(f"no image in {urls[0] if urls else 'the shards'}: no stats to compute")
    return stats.as_info()


def add_to_index(index: Path, pixels: dict) -> None:
    info = json.loads(index.read_text())
    info["pixels"] = pixels
    atomic_write_text(index, json.dumps(info, indent=1))
