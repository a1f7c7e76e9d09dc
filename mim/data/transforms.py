"""Decoding and cropping in the data workers. Images stay uint8 (C, H, W) until the training
process normalises them on its device (`normalize_on_device`)."""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

Image.MAX_IMAGE_PIXELS = (
    89_478_485  # PIL's default; refusing larger images guards against decompression bombs
)
warnings.simplefilter("error", Image.DecompressionBombWarning)


class BadSample(ValueError):
    """A sample that cannot be used: not an image, corrupt, too large, or missing its label."""


def decode(payload: bytes, mode: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise BadSample(f"cannot decode image: {error}") from None
    return image.convert(mode) if image.mode != mode else image


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) with the distribution of torchvision's RandomResizedCrop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return left, top, left + crop_width, top + crop_height
    # Fallback: the whole image, clamped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def center_crop_box(width: int, height: int, size: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """Resize the short side to size / crop_fraction, then take the centre size x size, as one box."""
    short = min(width, height)
    crop = short * crop_fraction
    left, top = (width - crop) / 2, (height - crop) / 2
    return round(left), round(top), round(left + crop), round(top + crop)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


def train_view(
    image: Image.Image,
    size: int,
    rng: random.Random,
    scale: tuple[float, float],
    hflip: bool,
    extra: Callable[[Image.Image], Image.Image] | None = None,
) -> torch.Tensor:
    box = random_resized_crop_box(image.width, image.height, rng, scale)
    flip = hflip and rng.random() < 0.5
    view = image.resize((size, size), Image.BICUBIC, box=box)  # crop and resize in one pass
    if flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if extra is not None:
        random.seed(rng.getrandbits(64))  # timm's RandAugment draws from the global RNG: make it per sample
        view = extra(view)
    return to_uint8_tensor(view)


def eval_view(image: Image.Image, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    box = center_crop_box(image.width, image.height, size, crop_fraction)
    return to_uint8_tensor(image.resize((size, size), Image.BICUBIC, box=box))


def normalize_on_device(
    images: torch.Tensor, mean: list[float], std: list[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (N, C, H, W) on any device -> normalised float; mean/std are given per channel in
    [0, 1] units (a single value broadcasts)."""
    channels = images.shape[1]
    mean_t = torch.tensor(mean[:channels] if len(mean) >= channels else mean * channels, device=images.device)
    std_t = torch.tensor(std[:channels] if len(std) >= channels else std * channels, device=images.device)
    scaled = images.float().div_(255.0)
    return ((scaled - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)).to(dtype)
