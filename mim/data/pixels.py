"""Images that are not 8-bit grey or RGB: NumPy arrays (`.npy` members, (H, W), (H, W, C) with any
number of bands C) and 16-bit PNGs and TIFFs.

Pixel units: 8-bit images stay uint8 (0-255, normalised on the device as value / 255); 16-bit
images become float32 value / 65535; float arrays keep their values. `data.mean` and `data.std`,
and the stats `mim shards --stats` computes (`PixelStats`), are in these units, per band.

A band count is a view mode: "L" (1), "RGB" (3) or "<C>-band" for any other C; 8-bit images are
converted between L and RGB as PIL converts them, the others must have the model's band count."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_png

from mim.config import require

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
FLOAT_KINDS = "f"


class BadPixels(ValueError):
    """An array or a deep image that cannot be used (mim.data.transforms turns it into BadSample)."""


def mode_for(bands: int) -> str:
    return {1: "L", 3: "RGB"}.get(bands, f"{bands}-band")


def bands_of(mode: str) -> int:
    return {"L": 1, "RGB": 3}.get(mode) or int(mode.split("-")[0])


def is_array(payload: bytes) -> bool:
    return payload[:6] == NPY_MAGIC


def is_deep_png(payload: bytes) -> bool:
    """A PNG of 16 bits per sample (IHDR's bit depth, byte 24)."""
    return payload[:8] == PNG_MAGIC and len(payload) > 24 and payload[24] == 16


def decode_deep(payload: bytes, image: Image.Image | None) -> torch.Tensor | None:
    """float32 (C, H, W) pixels of an array or a 16-bit image (None for an 8-bit one, which
    mim.data.transforms decodes). `image`: the payload's PIL header where it has one."""
    if is_array(payload):
        return array_pixels(payload)
    if is_deep_png(payload):
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return decode_png(data, ImageReadMode.UNCHANGED).float().div_(65535.0)
    if image is not None and image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float32) / 65535.0
        return torch.from_numpy(array[None].copy())
    return None


def array_pixels(payload: bytes) -> torch.Tensor:
    """A .npy member as (C, H, W): uint8 stays uint8, uint16 / 65535 and floats as float32."""
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise BadPixels(f"cannot read the .npy array: {error}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise BadPixels(f"the .npy array has shape {array.shape}; expected (H, W) or (H, W, C)")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if array.dtype == np.uint16:
        scaled = array.astype(np.float32) / 65535.0
    elif array.dtype.kind in FLOAT_KINDS:
        scaled = array.astype(np.float32)
        if not np.isfinite(scaled).all():
            raise BadPixels(f"the .npy array holds {int((~np.isfinite(scaled)).sum())} NaN/inf values")
    else:
        raise BadPixels(f"the .npy array is {array.dtype}; expected uint8, uint16 or a float type")
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def check_bands(pixels: torch.Tensor, mode: str) -> torch.Tensor:
    bands = pixels.shape[0]
    if bands != bands_of(mode):
        raise BadPixels(f"it has {bands} band(s); the model takes {bands_of(mode)} (model.in_chans)")
    return pixels


def to_units(images: torch.Tensor) -> torch.Tensor:
    """Pixels in their units as float32: uint8 / 255, anything else as it is."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


@dataclass
class PixelStats:
    """Per-band mean and std of pixels in their units, summed over images in float64."""

    bands: int | None = None
    count: int = 0
    total: list[float] = field(default_factory=list)
    squares: list[float] = field(default_factory=list)
    first: str = ""  # the first image's name, for messages

    def add(self, pixels: torch.Tensor, name: str) -> None:
        values = to_units(pixels).double().flatten(1)
        if self.bands is None:
            self.bands, self.first = values.shape[0], name
            self.total, self.squares = [0.0] * self.bands, [0.0] * self.bands
        if values.shape[0] != self.bands:
            raise BadPixels(
                f"{name} has {values.shape[0]} band(s) and {self.first} has {self.bands}: "
                "one split must have one band count"
            )
        self.count += values.shape[1]
        self.total = [t + s for t, s in zip(self.total, values.sum(1).tolist(), strict=True)]
        self.squares = [t + s for t, s in zip(self.squares, (values**2).sum(1).tolist(), strict=True)]

    def as_info(self) -> dict:
        mean = [t / self.count for t in self.total]
        std = [math.sqrt(max(s / self.count - m * m, 0.0)) for s, m in zip(self.squares, mean, strict=True)]
        return {"bands": self.bands, "mean": mean, "std": std, "pixels": self.count}


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def check_pixels(data: Any, shards: Any, bands: int) -> None:
    """data.mean and data.std resolved where null (the training shards' per-band stats, else
    ImageNet's for grey and RGB), and checked against the model's bands and the shards' stats."""
    stats = shards.pixels
    require(
        stats is None or stats["bands"] == bands,
        f"data.train {data.train} holds {stats and stats['bands']}-band images (its _info.json) and the model "
        f"takes {bands} (model.in_chans, or the backbone's)",
    )
    if data.mean is None or data.std is None:
        require(
            stats is not None or bands in (1, 3),
            f"data.mean/data.std are null and data.train {data.train} has no per-band stats for its "
            f"{bands} bands: run `mim shards --stats` or set data.mean and data.std ({bands} values each)",
        )
        mean, std = (stats["mean"], stats["std"]) if stats else (IMAGENET_MEAN[:bands], IMAGENET_STD[:bands])
        data.mean = mean if data.mean is None else data.mean
        data.std = std if data.std is None else data.std
        log.info(
            "normalising with mean %s, std %s (%s)",
            data.mean,
            data.std,
            "the shards' stats" if stats else "ImageNet's",
        )
    for key in ("mean", "std"):
        values = getattr(data, key)
        require(
            len(values) in (1, bands), f"data.{key} needs 1 or {bands} values (one per band), got {values}"
        )
