"""`fashion-mnist-scenes:DIR[:train|val]`: real images for segmentation where no segmentation
data can be downloaded. Each scene is a SIZE x SIZE grey canvas with 2 to 4 Fashion-MNIST items
at random scales and positions, later ones in front of earlier ones; its mask labels every pixel
with the class of the top-most item there (1..10, the Fashion-MNIST classes; an item covers its
outline and what it encloses), else 0 (background).
The training scenes take their items from Fashion-MNIST's training images, the validation scenes
from its test images. Scene i of a split is seeded by the split and i: the same wherever the
same Pillow resizes the items."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from mim.data.sources import FASHION_MNIST_CLASSES, Record, Source, fashion_mnist_arrays
from mim.errors import UserInputError

SIZE = 56  # canvas side: twice the items' 28 pixels
ITEM_SIDES = (16, 32)  # an item's side in the canvas, drawn uniformly
ITEMS = (2, 4)  # items per scene, drawn uniformly
FOREGROUND = 24  # an item's pixels darker than this (of 255) are background
SCENES = {"train": 20000, "val": 2000}  # scenes per split; `mim shards --limit` writes fewer
SPLIT_SEEDS = {"train": 1, "val": 2}
CLASSES = ["background", *FASHION_MNIST_CLASSES]


def scene(items: np.ndarray, labels: np.ndarray, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (SIZE, SIZE) uint8, mask (SIZE, SIZE) uint8) of scene `index` of `split`."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(rng.integers(ITEMS[0], ITEMS[1] + 1)):
        chosen = int(rng.integers(len(items)))
        side = int(rng.integers(ITEM_SIDES[0], ITEM_SIDES[1] + 1))
        item = np.asarray(Image.fromarray(items[chosen]).resize((side, side), Image.BILINEAR))
        top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
        where = silhouette(item)
        canvas[top : top + side, left : left + side][where] = item[where]
        mask[top : top + side, left : left + side][where] = labels[chosen] + 1
    return canvas, mask


def silhouette(item: np.ndarray) -> np.ndarray:
    """The item's pixels brighter than FOREGROUND and every hole they enclose (a checked shirt's
    dark squares are shirt): the background is what grows from outside the item through dark
    pixels, step by step to the 4 neighbours, until it grows no more."""
    dark = np.pad(item <= FOREGROUND, 1, constant_values=True)
    outside = np.zeros_like(dark)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= dark
        if np.array_equal(grown, outside):
            return ~outside[1:-1, 1:-1]
        outside = grown


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class _Scenes:
    """Scene i's image and mask as PNG bytes; the writer asks for a sample's image, then its mask:
    the last scenes made are kept, so each is made once."""

    def __init__(self, items: np.ndarray, labels: np.ndarray, split: str) -> None:
        self.items, self.labels, self.split = items, labels, split
        self.made = functools.lru_cache(maxsize=64)(self._make)

    def _make(self, index: int) -> tuple[bytes, bytes]:
        image, mask = scene(self.items, self.labels, self.split, index)
        return _png(image), _png(mask)

    def image(self, index: int) -> tuple[bytes, str]:
        return self.made(index)[0], "png"

    def mask(self, index: int) -> bytes:
        return self.made(index)[1]


def fashion_mnist_scenes(root: Path, split: str) -> Source:
    if split not in SCENES:
        raise UserInputError(f"fashion-mnist-scenes split must be one of {list(SCENES)}, got {split!r}")
    scenes = _Scenes(*fashion_mnist_arrays(root, "train" if split == "train" else "test"), split)
    records = [
        Record(
            f"fashion-mnist-scenes:{root}:{split}[{i}]",
            None,
            functools.partial(scenes.image, i),
            functools.partial(scenes.mask, i),
        )
        for i in range(SCENES[split])
    ]
    return Source(records, CLASSES, ignore_index=255)
