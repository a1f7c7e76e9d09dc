"""Which member of a WebDataset sample is the image and which the label (`data.image_key`,
`data.label_key`), as timm's and open_clip's readers pick them.

`image_key` lists extensions separated by `;`: the first one the sample has is its image.
`mask_key` (segmentation) lists the members that may hold the mask, as `image_key` does.
`label_key` is a member holding the integer label (`cls`, what `mim shards` writes) or
`json:FIELD`, a field of the sample's `.json` member (img2dataset's `--save_additional_columns`).
"""

from __future__ import annotations

import json

from mim.config import DEFAULT_IMAGE_KEY, DEFAULT_LABEL_KEY
from mim.data.transforms import BadSample
from mim.errors import UserInputError

__all__ = ["DEFAULT_IMAGE_KEY", "DEFAULT_LABEL_KEY", "check_keys", "sample_image", "sample_label"]
JSON_PREFIX = "json:"


def check_keys(image_key: str, label_key: str) -> None:
    if not [key for key in image_key.split(";") if key.strip()]:
        raise UserInputError(
            f"data.image_key must name at least one member (e.g. jpg;png), got {image_key!r}"
        )
    if not label_key or label_key == JSON_PREFIX:
        raise UserInputError(f"data.label_key must be a member (cls) or json:FIELD, got {label_key!r}")


def members(sample: dict) -> str:
    return ", ".join(sorted(key for key in sample if not key.startswith("__"))) or "none"


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} in {sample.get('__url__', '?')}"


def sample_image(sample: dict, image_key: str) -> bytes:
    for key in image_key.split(";"):
        value = sample.get(key.strip())
        if isinstance(value, bytes | bytearray):
            return value
    raise BadSample(
        f"{_where(sample)} has members {members(sample)} and no image among {image_key!r}: set data.image_key"
    )


def sample_mask(sample: dict, mask_key: str) -> bytes:
    """The sample's segmentation mask: the first of the `;`-separated members of `mask_key` present."""
    for key in mask_key.split(";"):
        value = sample.get(key.strip())
        if isinstance(value, bytes | bytearray):
            return value
    raise BadSample(
        f"{_where(sample)} has members {members(sample)} and no mask among {mask_key!r}: set data.mask_key"
    )


def sample_label(sample: dict, label_key: str) -> int | None:
    """The sample's integer label; None where it has none."""
    if label_key.startswith(JSON_PREFIX):
        field = label_key[len(JSON_PREFIX) :]
        if "json" not in sample:
            return None
        try:
            value = json.loads(sample["json"]).get(field)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise BadSample(f"{_where(sample)}: its json member does not parse ({error})") from None
    else:
        value = sample.get(label_key)
    if value is None:
        return None
    try:
        return int(value.decode() if isinstance(value, bytes | bytearray) else value)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise BadSample(
            f"{_where(sample)}: label {str(value)[:20]!r} ({label_key}) is not an integer"
        ) from None


def missing_label(sample: dict, label_key: str) -> BadSample:
    hint = " (e.g. json:label)" if "json" in sample and not label_key.startswith(JSON_PREFIX) else ""
    return BadSample(
        f"{_where(sample)} has members {members(sample)} and no {label_key!r} label: set data.label_key{hint}"
    )
