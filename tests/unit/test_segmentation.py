"""Segmentation data and metrics: masks read as class indices (VOC palettes, ADE layouts), the
joint view keeps image and mask aligned, sliding windows cover images exactly, IoU and mIoU as
computed by hand, the Fashion-MNIST scenes, and clear errors for bad pairs."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mim.data.scenes import CLASSES, FOREGROUND, fashion_mnist_scenes, scene, silhouette
from mim.data.segmentation import BadMask, SegmentSpec, check_mask, decode_mask, eval_pair, train_pair
from mim.data.shards import open_shards, write_shards
from mim.data.sources import open_source
from mim.errors import UserInputError
from mim.models.segmentation import predict, window_starts
from mim.tasks.dense_eval import confusion, scores
from tests.conftest import FASHION_MNIST, run_cli


def _png(array: np.ndarray, mode: str = "L", palette: list[int] | None = None) -> bytes:
    image = Image.fromarray(array.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _voc_palette() -> list[int]:
    """Pascal VOC's colour map: label i's colour from the bits of i."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


# ----------------------------------------------------------------------------- metrics


def test_iou_miou_and_pixel_accuracy_match_a_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])  # the ignored pixel's prediction counts nowhere
    matrix = confusion(predicted, target, 4, 255)
    # class 0: hits 1, false positive 1 (the 2 at [1,1]), false negative 1 (predicted 1 at [0,1]) -> 1/3
    # class 1: hits 2, fp 1, fn 1 -> 2/4; class 2: hits 1, fp 1 ([1,3]), fn 1 -> 1/3; class 3 absent -> None
    assert matrix.sum() == 7
    result = scores(matrix, 255)
    assert result["iou"] == pytest.approx([100 / 3, 50.0, 100 / 3, None])
    assert result["iou"][3] is None
    assert result["miou"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 7 * 100)


def test_an_ignore_index_inside_the_classes_has_no_iou_and_its_pixels_count_nowhere():
    target = torch.tensor([0, 1, 1, 2])
    predicted = torch.tensor([1, 1, 2, 2])
    result = scores(confusion(predicted, target, 3, 0), ignore_index=0)
    assert result["iou"] == pytest.approx([None, 50.0, 50.0])
    assert result["pixel_accuracy"] == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------- views


def _square(size: int, top: int, left: int, side: int) -> tuple[bytes, bytes]:
    image = np.zeros((size, size), np.uint8)
    image[top : top + side, left : left + side] = 255
    return _png(image), _png((image > 0).astype(np.uint8))


def test_the_joint_view_keeps_a_shifted_square_on_its_mask():
    spec = SegmentSpec("seg.png", eval_size=64, scale=(0.5, 2.0), num_classes=2)
    for top, left in ((5, 9), (30, 2), (12, 40)):
        image, mask = _square(64, top, left, 20)
        for seed in range(20):
            pixels, labels = train_pair(image, mask, "L", 32, random.Random(seed), spec, hflip=True)
            assert pixels.shape == (1, 32, 32) and labels.shape == (32, 32)
            bright, labelled = pixels[0] > 127, labels == 1
            # the square's edge is blended by the bilinear resize: inside the mask the image is
            # bright, outside dark, but for at most one pixel row or column along each edge
            assert (bright ^ labelled).sum() <= 2 * 32, (top, left, seed)
            if labelled.any():
                rows, cols = labelled.nonzero(as_tuple=True)
                brows, bcols = bright.nonzero(as_tuple=True)
                assert abs(rows.float().mean() - brows.float().mean()) < 1.0
                assert abs(cols.float().mean() - bcols.float().mean()) < 1.0


def test_the_training_view_pads_the_mask_with_the_ignore_index_and_flips_both():
    spec = SegmentSpec("seg.png", eval_size=16, scale=(1.0, 1.0), num_classes=2)
    image, mask = _square(16, 0, 0, 8)  # a square in the top-left corner
    flips = set()
    for seed in range(20):
        pixels, labels = train_pair(image, mask, "L", 24, random.Random(seed), spec, hflip=True)
        assert (labels == 255).sum() == 24 * 24 - 16 * 16  # the padding, nothing else
        assert ((pixels[0] > 127) == (labels == 1)).all()
        flips.add(bool(labels[0, -1] == 1))
    assert flips == {True, False}


def test_the_evaluation_view_resizes_the_image_and_keeps_the_mask_as_it_is():
    spec = SegmentSpec("seg.png", eval_size=20, scale=(1.0, 1.0), num_classes=2)
    image, mask = _square(40, 4, 4, 10)
    pixels, labels = eval_pair(image, mask, "L", spec)
    assert pixels.shape == (1, 20, 20) and labels.shape == (40, 40)
    assert torch.equal(labels, torch.from_numpy(decode_mask(mask).astype(np.int64)))


def test_masks_are_class_indices_voc_palettes_included():
    labels = np.array([[0, 15, 255], [20, 1, 0]], np.uint8)
    decoded = decode_mask(_png(labels, "P", _voc_palette()))
    assert np.array_equal(decoded, labels)  # palette indices, not colours
    rgb = io.BytesIO()
    Image.new("RGB", (3, 2)).save(rgb, format="PNG")
    with pytest.raises(BadMask, match="is a RGB image; a mask holds one class index per pixel"):
        decode_mask(rgb.getvalue())
    with pytest.raises(BadMask, match="does not decode"):
        decode_mask(b"not a png")


def test_a_mask_of_another_size_or_with_unknown_labels_is_refused():
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    check_mask(mask, (2, 2), 3, 255)
    with pytest.raises(BadMask, match="the mask is 2x2 pixels but its image 3x2"):
        check_mask(mask, (3, 2), 3, 255)
    with pytest.raises(BadMask, match=r"labels \[2\] outside the 2 classes"):
        check_mask(mask, (2, 2), 2, 255)


# ----------------------------------------------------------------------------- sliding windows


def test_windows_cover_every_pixel_and_the_last_one_is_flush():
    assert window_starts(20, 28, 18) == [0]
    assert window_starts(56, 28, 18) == [0, 18, 28]
    assert window_starts(56, 28, 28) == [0, 28]
    for length in range(28, 120):
        starts = window_starts(length, 28, 19)
        assert starts[-1] + 28 == length and all(
            b - a <= 19 for a, b in zip(starts, starts[1:], strict=False)
        )


def test_sliding_windows_put_every_window_back_where_it_came_from():
    """A model whose logits are its input: the overlapping windows average back to the images."""
    images = [torch.rand(1, 50, 70), torch.rand(1, 28, 28), torch.rand(1, 20, 33)]
    predicted = predict(lambda windows: windows, images, 28, 18, chunk=5)
    for image, logits in zip(images, predicted, strict=True):
        assert logits.shape == image.shape
        assert torch.allclose(logits, image, atol=1e-6)


# ----------------------------------------------------------------------------- sources


def _voc_layout(root, sizes=((30, 40), (24, 24), (16, 20))):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    masks = {}
    for number, (height, width) in enumerate(sizes):
        stem = f"2007_{number:06d}"
        Image.fromarray(np.full((height, width, 3), 40 * number, np.uint8)).save(
            root / "JPEGImages" / f"{stem}.jpg"
        )
        labels = np.zeros((height, width), np.uint8)
        labels[2:8, 3:9] = number + 1
        labels[0] = 255  # VOC's border
        (root / "SegmentationClass" / f"{stem}.png").write_bytes(_png(labels, "P", _voc_palette()))
        masks[stem] = labels
    # an image without a mask, as VOC's JPEGImages holds many
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "2008_000000.jpg")
    (root / "train.txt").write_text("".join(f"{stem}\n" for stem in masks))
    return masks


def test_a_voc_layout_with_its_list_becomes_image_and_mask_shards(tmp_path):
    masks = _voc_layout(tmp_path / "voc")
    voc = tmp_path / "voc"
    source = open_source(f"segfolder:{voc / 'JPEGImages'},{voc / 'SegmentationClass'},{voc / 'train.txt'}")
    info = json.loads(write_shards(source, tmp_path / "shards", shard_size=2).read_text())
    assert (
        info["ignore_index"] == 255 and info["classes"] == ["0", "1", "2", "3"] and info["num_samples"] == 3
    )
    samples = list(
        wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False)
    )
    read = sorted(decode_mask(s["seg.png"]).tobytes() for s in samples)
    assert read == sorted(m.tobytes() for m in masks.values())
    assert all("jpg" in s for s in samples)
    assert open_shards(str(tmp_path / "shards")).ignore_index == 255


def test_an_ade_layout_pairs_by_name_and_takes_its_ignore_index_and_class_names(tmp_path):
    images, annotations = (
        tmp_path / "ADE" / "images" / "training",
        tmp_path / "ADE" / "annotations" / "training",
    )
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for number in range(3):
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(images / f"ADE_train_{number:08d}.jpg")
        labels = np.full((12, 16), number, np.uint8)  # 0: ADE's unlabelled pixels
        Image.fromarray(labels).save(annotations / f"ADE_train_{number:08d}.png")
    (tmp_path / "names.txt").write_text("other\nwall\nbuilding\n")
    out = tmp_path / "shards"
    result = run_cli(
        "shards", "--source", f"segfolder:{images},{annotations}", "--out", str(out),
        "--ignore-index", "0", "--classes", str(tmp_path / "names.txt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((out / "_info.json").read_text())
    assert info["ignore_index"] == 0 and info["classes"] == ["other", "wall", "building"]


def test_bad_pairs_are_clear_errors_naming_the_file(tmp_path):
    voc = tmp_path / "voc"
    _voc_layout(voc)
    images, masks = voc / "JPEGImages", voc / "SegmentationClass"
    with pytest.raises(UserInputError, match=r"image .*2008_000000.jpg has no mask"):
        open_source(f"segfolder:{images},{masks}")  # without the list, every image needs a mask
    (masks / "2009_000001.png").write_bytes(_png(np.zeros((4, 4))))
    (voc / "list.txt").write_text("2009_000001\n")
    with pytest.raises(UserInputError, match="2009_000001 .* has no image"):
        open_source(f"segfolder:{images},{masks},{voc / 'list.txt'}")
    # a mask of another size than its image: named when its shard is written
    (voc / "list.txt").write_text("2007_000000\n")
    (masks / "2007_000000.png").write_bytes(_png(np.zeros((5, 5))))
    source = open_source(f"segfolder:{images},{masks},{voc / 'list.txt'}")
    with pytest.raises(UserInputError, match=r"2007_000000.png .*the mask is 5x5 pixels but its image 40x30"):
        write_shards(source, tmp_path / "out")
    # labels outside the named classes
    labels = np.zeros((30, 40), np.uint8)
    labels[0, 0] = 7
    (masks / "2007_000000.png").write_bytes(_png(labels))
    (tmp_path / "names.txt").write_text("background\ncat\n")
    result = run_cli(
        "shards", "--source", f"segfolder:{images},{masks},{voc / 'list.txt'}", "--out", str(tmp_path / "out2"),
        "--classes", str(tmp_path / "names.txt"),
    )  # fmt: skip
    assert result.returncode == 2 and "2007_000000.png" in result.stderr
    assert "labels [7] outside the 2 classes" in result.stderr
    result = run_cli("shards", "--source", f"segfolder:{images}", "--out", str(tmp_path / "out3"))
    assert result.returncode == 2 and "expected segfolder:IMAGES,MASKS[,LIST]" in result.stderr


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_scenes_are_seeded_labelled_per_pixel_and_split_by_source():
    source = fashion_mnist_scenes(FASHION_MNIST, "val")
    assert source.classes == CLASSES and len(CLASSES) == 11 and source.ignore_index == 255
    first = source.records[3]
    assert first.read() == source.records[3].read() and first.read_mask() == source.records[3].read_mask()
    image = np.asarray(Image.open(io.BytesIO(first.read()[0])))
    mask = decode_mask(first.read_mask())
    assert image.shape == mask.shape == (56, 56)
    assert set(np.unique(mask)) <= set(range(11)) and len(np.unique(mask)) >= 2
    assert (image[mask == 0] == 0).all()  # background is black; the items are where the mask says
    train = fashion_mnist_scenes(FASHION_MNIST, "train")
    assert train.records[3].read() != first.read()
    with pytest.raises(UserInputError, match="split must be one of"):
        fashion_mnist_scenes(FASHION_MNIST, "test")


def test_an_item_covers_the_holes_it_encloses():
    item = np.zeros((9, 9), np.uint8)
    item[1:8, 1:8] = 200
    item[3:6, 3:6] = 0  # a dark patch inside: still the item
    covered = silhouette(item)
    assert covered[1:8, 1:8].all() and covered.sum() == 49
    item[0:5, 4] = 0  # a dark channel from the patch to the outside: the patch is outside now
    covered = silhouette(item)
    assert not covered[4, 4] and not covered[2, 4] and covered[4, 2]


def test_a_scene_labels_exactly_the_pixels_its_items_cover():
    items = np.zeros((2, 28, 28), np.uint8)
    items[0, 4:24, 4:24], items[1, 8:20, 2:26] = 120, 240
    for index in range(5):
        image, mask = scene(items, np.array([0, 1]), "train", index)
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert (image[mask > 0] > FOREGROUND).all() and (image[mask == 0] == 0).all()
