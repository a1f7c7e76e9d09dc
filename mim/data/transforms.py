"""Decoding and cropping in the data workers. Images stay uint8 (C, H, W) until the training
process normalises them on its device (`normalize_on_device`); arrays and 16-bit images are float32
in their units (mim.data.pixels).

The crop is chosen from the image header before decoding; JPEGs whose crop is at least twice the
output size decode at a reduced DCT scale; the crop is resized with antialiased bicubic
resampling on uint8 tensors (torch's vectorised kernel, PIL's filter)."""

from __future__ import annotations

import io
import logging
import math
import random
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mim.data.pixels import BadPixels, bands_of, check_bands, decode_deep, is_array, to_units

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = (
    89_478_485  # PIL's default; refusing larger images guards against decompression bombs
)
warnings.simplefilter("error", Image.DecompressionBombWarning)
_TV_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY}


class BadSample(ValueError):
    """A sample that cannot be used: not an image, corrupt, too large, or missing its label."""


Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    RuntimeError,  # torchvision's decoder
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
REDUCTIONS = (8, 4, 2)  # the DCT scales 1/8, 1/4, 1/2 that libjpeg decodes at directly


def open_image(payload: bytes) -> Image.Image:
    """The image's header only (format, size, mode); refuses non-images and decompression bombs
    (more than Image.MAX_IMAGE_PIXELS) before any pixel is decoded."""
    try:
        return Image.open(io.BytesIO(payload))
    except DECODE_ERRORS as error:
        raise BadSample(f"cannot decode image: {error}") from None


def reduction_for(image: Image.Image, box: Box, size: int) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) at which the crop `box` of a JPEG still has at
    least `size` pixels on each side, so that decoding smaller loses nothing the output keeps."""
    if image.format != "JPEG":
        return 1
    short_side = min(box[2] - box[0], box[3] - box[1])
    return next((r for r in REDUCTIONS if short_side >= r * size), 1)


def decode_region(
    payload: bytes, mode: str, box_of: Callable[[int, int], Box], size: int, reduce: bool = True
) -> tuple[torch.Tensor, Box]:
    """Decodes what the crop `box_of(width, height)` needs (the box is chosen from the header,
    before any pixel is decoded): uint8 (C, H, W) pixels and the box in their coordinates.

    JPEGs decode at the smallest DCT scale that keeps the crop at least `size` pixels wide (PIL's
    draft; `reduce=False` always decodes at full size), else with torchvision's libjpeg-turbo
    decoder straight into a tensor; other formats through PIL. Full-size decodes give the same
    pixels either way."""
    image = None if is_array(payload) else open_image(payload)
    try:
        deep = decode_deep(payload, image)
        if deep is not None:  # an array or a 16-bit image: float32 (or uint8 arrays), any band count
            return check_bands(deep, mode), box_of(deep.shape[2], deep.shape[1])
    except BadPixels as error:
        raise BadSample(str(error)) from None
    except DECODE_ERRORS as error:
        raise BadSample(f"cannot decode image: {error}") from None
    if mode not in _TV_MODES:
        raise BadSample(
            f"it is an 8-bit {image.mode} image; the model takes {bands_of(mode)} bands (model.in_chans)"
        )
    box = box_of(*image.size)
    scale = reduction_for(image, box, size) if reduce else 1
    try:
        if scale > 1:
            # draft picks the largest scale whose result is at least the asked size: exactly `scale`
            image.draft(None, (image.width // scale, image.height // scale))
            image.load()
            box = _scaled_box(box, scale, image.width, image.height)
            return _pil_pixels(image, mode), box
        if image.format == "JPEG" and image.mode == mode and mode in _TV_MODES:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            return decode_jpeg(data, mode=_TV_MODES[mode]), box
        image.load()
        return _pil_pixels(image, mode), box
    except DECODE_ERRORS as error:
        raise BadSample(f"cannot decode image: {error}") from None


def _scaled_box(box: Box, scale: int, width: int, height: int) -> Box:
    left, top, right, bottom = (round(c / scale) for c in box)
    return max(0, left), max(0, top), min(width, right), min(height, bottom)


def _pil_pixels(image: Image.Image, mode: str) -> torch.Tensor:
    array = np.asarray(image.convert(mode) if image.mode != mode else image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W) over HWC memory


def resize_region(pixels: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Crops `box` out of uint8 (C, H, W) pixels and resizes it to size x size with antialiased
    bicubic resampling (PIL's filter, a = -0.5), in uint8, without touching pixels outside it."""
    left, top, right, bottom = box
    region = pixels[None, :, top:bottom, left:right]
    if region.shape[-2:] != (size, size):
        region = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)
    return region[0].contiguous()


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
    return _pil_pixels(image, image.mode).contiguous()


def train_view(
    payload: bytes,
    mode: str,
    size: int,
    rng: random.Random,
    scale: tuple[float, float],
    hflip: bool,
    extra: Callable[[Image.Image], Image.Image] | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """RandomResizedCrop + flip (+ `extra`, a PIL transform such as RandAugment), uint8 (C, size, size)."""
    crop = lambda width, height: random_resized_crop_box(width, height, rng, scale)  # noqa: E731
    pixels, box = decode_region(payload, mode, crop, size, reduce)
    flip = hflip and rng.random() < 0.5
    view = resize_region(pixels, box, size)
    if flip:
        view = view.flip(-1)
    if extra is not None and (view.dtype != torch.uint8 or view.shape[0] not in (1, 3)):
        _skip_once("RandAugment and colour jitter work on 8-bit grey or RGB images: skipped for these bands")
    elif extra is not None:
        # timm's RandAugment draws from the global RNGs (its ops from numpy's, their magnitudes and
        # probabilities from Python's): seeded per sample, so a view depends on the sample alone
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        view = to_uint8_tensor(extra(Image.fromarray(view.permute(1, 2, 0).squeeze(-1).numpy(), mode)))
    return view


_SKIPPED: set[str] = set()


def _skip_once(message: str) -> None:
    if message not in _SKIPPED:
        _SKIPPED.add(message)
        log.warning("%s", message)


def eval_view(
    payload: bytes, mode: str, size: int, crop_fraction: float = 0.875, reduce: bool = True
) -> torch.Tensor:
    crop = lambda width, height: center_crop_box(width, height, size, crop_fraction)  # noqa: E731
    pixels, box = decode_region(payload, mode, crop, size, reduce)
    return resize_region(pixels, box, size)


def normalize_on_device(
    images: torch.Tensor, mean: list[float], std: list[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 or float (N, C, H, W) on any device -> normalised float; mean/std are given per band in
    pixel units (mim.data.pixels; a single value broadcasts)."""
    channels = images.shape[1]
    mean_t = torch.tensor(mean[:channels] if len(mean) >= channels else mean * channels, device=images.device)
    std_t = torch.tensor(std[:channels] if len(std) >= channels else std * channels, device=images.device)
    scaled = to_units(images)
    return ((scaled - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)).to(dtype)
