"""Segmentation samples: an image and its mask, one class index per pixel (`ignore_index` where
no class counts: a border, an unlabelled region), and the views that transform both together.

Masks are single-channel PNGs: mode L, or a palette image (P, as Pascal VOC's), whose palette
indices are the classes. The training view scales the pair by a random factor of the evaluation
size, takes a random crop of the model's input size (padding the image with zeros and the mask
with `ignore_index` where the scaled pair is smaller) and flips both; images are resampled
bilinearly, masks by nearest neighbour, so a class never blends into another. The evaluation
view resizes the image to the evaluation size and keeps the mask at its own resolution: the
prediction is brought to the mask, so mIoU is measured on the labels as they are."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mim.data.transforms import DECODE_ERRORS, decode_region
from mim.errors import UserInputError

MASK_MEMBER = "seg.png"  # what `mim shards` writes for a segmentation source
DEFAULT_IGNORE_INDEX = 255


class BadMask(UserInputError):
    """A mask that cannot stand for its image: undecodable, not single-channel, another size than
    the image, or labels outside the declared classes. It stops the run: a probe that skipped such
    masks would report a figure of the wrong data."""


@dataclass(frozen=True)
class SegmentSpec:
    """What a segmentation view needs beside the image's: where the mask is, the evaluation size
    (the short side images are brought to; the training view scales around it), the training
    view's scale range, and the classes a mask may hold."""

    mask_key: str
    eval_size: int
    scale: tuple[float, float]
    num_classes: int
    ignore_index: int = DEFAULT_IGNORE_INDEX


def decode_mask(payload: bytes) -> np.ndarray:
    """(H, W) class indices of a single-channel mask (L, or P: its palette indices)."""
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except DECODE_ERRORS as error:
        raise BadMask(f"the mask does not decode ({error})") from None
    if image.mode not in ("L", "P"):
        raise BadMask(
            f"the mask is a {image.mode} image; a mask holds one class index per pixel "
            "(mode L, or a palette image as Pascal VOC's): convert colour-coded masks to indices first"
        )
    return np.asarray(image, dtype=np.uint8)


def check_mask(mask: np.ndarray, image_size: tuple[int, int], num_classes: int, ignore_index: int) -> None:
    """`image_size`: (width, height) of its image."""
    if (mask.shape[1], mask.shape[0]) != tuple(image_size):
        raise BadMask(
            f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image {image_size[0]}x{image_size[1]}"
        )
    values = np.unique(mask)
    outside = values[(values >= num_classes) & (values != ignore_index)]
    if len(outside):
        raise BadMask(
            f"the mask holds labels {outside.tolist()[:8]} outside the {num_classes} classes "
            f"(0..{num_classes - 1}, and {ignore_index} to ignore); are the classes and the ignore index right?"
        )


def _pair(image_payload: bytes, mask_payload: bytes, mode: str, spec: SegmentSpec):
    pixels, _ = decode_region(image_payload, mode, lambda width, height: (0, 0, width, height), 0, False)
    mask = decode_mask(mask_payload)
    check_mask(mask, (pixels.shape[2], pixels.shape[1]), spec.num_classes, spec.ignore_index)
    return pixels, torch.from_numpy(mask.astype(np.int64))


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    factor = short_side / min(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize_image(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, *size), bilinear, antialiased when shrinking."""
    if tuple(pixels.shape[1:]) == tuple(size):
        return pixels
    return F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True)[0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) class indices -> `size`, nearest neighbour: every pixel keeps one of the mask's labels."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def train_pair(
    image_payload: bytes,
    mask_payload: bytes,
    mode: str,
    crop: int,
    rng: random.Random,
    spec: SegmentSpec,
    hflip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint training view: uint8 (C, crop, crop) and its int64 (crop, crop) mask."""
    pixels, mask = _pair(image_payload, mask_payload, mode, spec)
    short = max(1, round(spec.eval_size * rng.uniform(*spec.scale)))
    size = scaled_size(pixels.shape[1], pixels.shape[2], short)
    pixels, mask = resize_image(pixels, size), resize_mask(mask, size)
    pad_h, pad_w = max(0, crop - size[0]), max(0, crop - size[1])
    if pad_h or pad_w:
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=spec.ignore_index)
    top = rng.randint(0, mask.shape[0] - crop)
    left = rng.randint(0, mask.shape[1] - crop)
    pixels = pixels[:, top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    if hflip and rng.random() < 0.5:
        pixels, mask = pixels.flip(-1), mask.flip(-1)
    return pixels.contiguous(), mask.contiguous()


def eval_pair(
    image_payload: bytes, mask_payload: bytes, mode: str, spec: SegmentSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation view: the image with its short side at the evaluation size, the mask as it is."""
    pixels, mask = _pair(image_payload, mask_payload, mode, spec)
    size = scaled_size(pixels.shape[1], pixels.shape[2], spec.eval_size)
    return resize_image(pixels, size).contiguous(), mask


def as_lists(batch: list[tuple]) -> tuple[list, ...]:
    """An evaluation batch of images of different sizes: (images, masks, indices) as lists."""
    return tuple(list(column) for column in zip(*batch, strict=True))
