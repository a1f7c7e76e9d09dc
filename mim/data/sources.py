"""Image sources for `mim shards`: an image folder, a CSV/TSV of path,label, Fashion-MNIST idx,
and for segmentation a folder of images beside a folder of masks (mim.data.scenes makes
Fashion-MNIST scenes).

Each source yields `Record`s holding the original encoded bytes; idx images (raw pixels) are
encoded losslessly as PNG.
"""

from __future__ import annotations

import csv
import gzip
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mim.errors import UserInputError

# .npy: (H, W) or (H, W, C) arrays of any band count (mim.data.pixels)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True, slots=True)
class Record:
    """One image to shard: a file path (about 170 bytes a record, so a million files list in
    under 200 MB), or any name with a `load` function for images that are not files."""

    name: str  # the file's path, or where it came from, for messages
    label: int | None
    load: Callable[[], tuple[bytes, str]] | None = None  # () -> (bytes, extension); None: read the file
    mask: str | Callable[[], bytes] | None = None  # segmentation: its PNG mask's path, or a maker

    def read_mask(self) -> bytes | None:
        if self.mask is None or callable(self.mask):
            return self.mask() if self.mask else None
        return Path(self.mask).read_bytes()

    def read(self) -> tuple[bytes, str]:
        if self.load is not None:
            return self.load()
        path = Path(self.name)
        return path.read_bytes(), path.suffix.lower().lstrip(".").replace("jpeg", "jpg")


@dataclass(frozen=True)
class Source:
    records: list[Record]
    classes: list[str]  # segmentation: empty when the masks themselves say how many there are
    ignore_index: int | None = None  # segmentation: the mask value no class counts for


def _stems(folder: Path, extensions: set[str], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist or is not a directory")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in extensions and path.is_file():
            stem = str(path.relative_to(folder).with_suffix(""))
            if stem in found:
                raise UserInputError(f"{what} {found[stem]} and {path} have the same name: which is it?")
            found[stem] = path
    return found


def segmentation_folder(
    images: Path, masks: Path, listing: Path | None = None, ignore_index: int = 255
) -> Source:
    """`segfolder:IMAGES,MASKS[,LIST]`: images and PNG masks paired by file name without extension
    (ADE20K's images/training + annotations/training; Pascal VOC's JPEGImages + SegmentationClass,
    whose palette indices are the classes, with LIST its ImageSets/Segmentation/train.txt, since
    JPEGImages also holds images that have no mask). Without LIST every image needs a mask and
    every mask an image."""
    by_stem = _stems(images, IMAGE_EXTENSIONS, "image")
    mask_stems = _stems(masks, {".png"}, "mask")
    if listing is not None:
        if not listing.is_file():
            raise FileNotFoundError(f"list {listing} does not exist")
        wanted = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    else:
        wanted = sorted(by_stem)
        stray = sorted(set(mask_stems) - set(by_stem))
        if stray:
            raise UserInputError(
                f"{len(stray)} mask(s) in {masks} have no image in {images}, e.g. {mask_stems[stray[0]]}"
            )
    for stem in wanted:
        if stem not in by_stem:
            raise UserInputError(f"{stem} (listed in {listing}) has no image in {images}")
        if stem not in mask_stems:
            raise UserInputError(f"image {by_stem[stem]} has no mask {masks / stem}.png")
    if not wanted:
        raise UserInputError(f"no image in {images} with extensions {sorted(IMAGE_EXTENSIONS)}")
    records = [Record(str(by_stem[stem]), None, mask=str(mask_stems[stem])) for stem in wanted]
    return Source(records, [], ignore_index)


def image_folder(root: Path) -> Source:
    """root/<class>/<image>: classes sorted by name, as torchvision's ImageFolder."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserInputError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    records = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                records.append(Record(str(path), label))
    if not records:
        raise UserInputError(
            f"image folder {root} holds no images with extensions {sorted(IMAGE_EXTENSIONS)}"
        )
    return Source(records, classes)


def csv_table(table: Path) -> Source:
    """Rows of `path,label` (tab-separated for .tsv); a header row is skipped; relative paths are
    taken from the table's folder; labels are class names or integers."""
    if not table.is_file():
        raise FileNotFoundError(f"table {table} does not exist")
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    rows = [row for row in csv.reader(table.read_text().splitlines(), delimiter=delimiter) if row]
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    for number, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise UserInputError(
                f"{table}: row {number} has {len(row)} fields, expected 2 (path,label): {row}"
            )
    names = sorted({label for _, label in rows})
    integer_labels = all(label.isdigit() for label in names)
    classes = [str(i) for i in range(max(map(int, names)) + 1)] if integer_labels and names else names
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for path_text, label in rows:
        path = Path(path_text) if Path(path_text).is_absolute() else table.parent / path_text
        records.append(Record(str(path), int(label) if integer_labels else index[label]))
    return Source(records, classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, num_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserInputError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{num_dims}I", data[4 : 4 + 4 * num_dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")


def _png_loader(pixels: np.ndarray):
    def load() -> tuple[bytes, str]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue(), "png"

    return load


def fashion_mnist_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split, read from the idx files."""
    if split not in FASHION_MNIST_FILES:
        raise UserInputError(f"Fashion-MNIST split must be one of {list(FASHION_MNIST_FILES)}, got {split!r}")
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    images = _read_idx(_find_idx(root, image_stem))
    labels = _read_idx(_find_idx(root, label_stem))
    if len(images) != len(labels):
        raise UserInputError(f"{root}: {len(images)} images but {len(labels)} labels in split {split}")
    return images, labels


def fashion_mnist(root: Path, split: str) -> Source:
    images, labels = fashion_mnist_arrays(root, split)
    image_stem = FASHION_MNIST_FILES[split][0]
    records = [
        Record(f"{root}/{image_stem}[{i}]", int(labels[i]), _png_loader(images[i]))
        for i in range(len(images))
    ]
    return Source(records, FASHION_MNIST_CLASSES)


KINDS = "imagefolder, csv, tsv, fashion-mnist, segfolder or fashion-mnist-scenes"


def open_source(spec: str) -> Source:
    """`imagefolder:DIR`, `csv:FILE` (or `tsv:FILE`), `fashion-mnist:DIR[:train|test]`,
    `segfolder:IMAGES,MASKS[,LIST]`, `fashion-mnist-scenes:DIR[:train|val]`."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise UserInputError(f"source {spec!r} must be KIND:PATH with KIND {KINDS}")
    if kind == "segfolder":
        parts = rest.split(",")
        if len(parts) not in (2, 3) or not all(parts):
            raise UserInputError(f"source {spec!r}: expected segfolder:IMAGES,MASKS[,LIST]")
        return segmentation_folder(
            Path(parts[0]), Path(parts[1]), Path(parts[2]) if len(parts) == 3 else None
        )
    if kind == "fashion-mnist-scenes":
        from mim.data.scenes import fashion_mnist_scenes

        path, _, split = rest.partition(":")
        return fashion_mnist_scenes(Path(path), split or "train")
    if kind == "imagefolder":
        return image_folder(Path(rest))
    if kind in ("csv", "tsv"):
        return csv_table(Path(rest))
    if kind == "fashion-mnist":
        path, _, split = rest.partition(":")
        return fashion_mnist(Path(path), split or "train")
    raise UserInputError(
        f"unknown source kind {kind!r} in {spec!r}; expected {KINDS} (or wds: for existing shards)"
    )
