"""Images that are not 8-bit grey or RGB, end to end through the CLI: a 4-band 16-bit set
(Fashion-MNIST items with bands derived from them, as .npy arrays in an image folder) made into
shards with `mim shards --stats`, pretrained with the model and the normalisation following the
data, probed, exported and loaded by timm in one line; pretraining from RGB weights adapts the patch
embedding; bad input (mixed band counts, NaN, a model of other bands) is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from mim import checkpoint
from mim.data.sources import fashion_mnist_arrays
from tests.conftest import FASHION_MNIST, run_cli

pytestmark = pytest.mark.slow
SMALL = ("model.img_size=28", "model.patch_size=7")


def derived_bands(item: np.ndarray) -> np.ndarray:
    """(28, 28) uint8 -> (28, 28, 4) uint16: the item, its negative, its square, and the item
    fading from left to right."""
    x = item.astype(np.float64) / 255
    bands = np.stack([x, 1 - x, x**2, x * np.linspace(0, 1, x.shape[1])[None, :]], -1)
    return np.round(bands * 65535).astype(np.uint16)


def band_folder(root: Path, split: str, count: int) -> Path:
    images, labels = fashion_mnist_arrays(FASHION_MNIST, split)
    for index in range(count):
        folder = root / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{index:05d}.npy", derived_bands(images[index]))
    return root


@pytest.fixture(scope="module")
def band_shards(tmp_path_factory) -> dict[str, Path]:
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    root = tmp_path_factory.mktemp("bands")
    shards = {}
    for split, name, count in (("train", "train", 480), ("test", "val", 120)):
        folder = band_folder(root / f"images-{name}", split, count)
        made = run_cli(
            "shards", "--source", f"imagefolder:{folder}", "--out", str(root / name), "--name", name,
            "--shard-size", "120", "--stats",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-3000:]
        shards[name] = root / name
    return shards


def test_four_band_16_bit_images_go_through_pretraining_probing_export_and_timm(tmp_path, band_shards):
    pixels = json.loads((band_shards["train"] / "_info.json").read_text())["pixels"]
    every = np.stack([derived_bands(i) for i in fashion_mnist_arrays(FASHION_MNIST, "train")[0][:480]])
    assert pixels["bands"] == 4
    assert np.allclose(pixels["mean"], (every / 65535).mean((0, 1, 2)), atol=1e-9)
    assert np.allclose(pixels["std"], (every / 65535).std((0, 1, 2)), atol=1e-9)

    run = tmp_path / "pretrain"
    result = run_cli(
        "pretrain",
        "--config",
        "pretrain/debug",
        f"data.train={band_shards['train']}",
        f"run.dir={run}",
        *SMALL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping" not in result.stderr  # every sample read
    meta = json.loads((checkpoint.latest_checkpoint(run) / "meta.json").read_text())
    assert meta["model"]["arch"]["in_chans"] == 4  # the model followed the data
    assert meta["config"]["data"]["mean"] == pixels["mean"] and meta["config"]["data"]["std"] == pixels["std"]

    probe = tmp_path / "probe"
    result = run_cli(
        "linprobe", "--config", "linprobe/debug", f"init.from={run}", f"data.train={band_shards['train']}",
        f"data.val={band_shards['val']}", f"run.dir={probe}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((probe / "metrics.json").read_text())["evaluations"]

    out = tmp_path / "backbone"
    assert run_cli("export", str(run), "--out", str(out)).returncode == 0
    code = (
        "import timm, torch, json\n"
        f"model = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        "size = model.pretrained_cfg['input_size']\n"
        "print(json.dumps([list(size), model.pretrained_cfg['mean'], list(model(torch.zeros(2, *size)).shape)]))\n"
    )
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=empty, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    size, mean, features = json.loads(loaded.stdout.splitlines()[-1])
    assert size == [4, 28, 28] and mean == pixels["mean"] and features == [2, 32]
    trained = load_file(str(checkpoint.latest_checkpoint(run) / checkpoint.WEIGHTS_FILE))
    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["patch_embed.proj.weight"], trained["patch_embed.proj.weight"])


def test_pretraining_from_rgb_weights_adapts_the_patch_embedding_and_says_so(tmp_path, band_shards):
    shape = {
        "img_size": 28,
        "patch_size": 7,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
    }  # debug's, grey's size
    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, **shape)  # 3 bands
    weights = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(weights))
    run = tmp_path / "run"
    result = run_cli(
        "pretrain", "--config", "pretrain/debug", f"data.train={band_shards['train']}", f"run.dir={run}",
        f"init.from={weights}", "run.stop_after=2", *SMALL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "takes 3 band(s) and this model 4" in result.stderr
    meta = json.loads((checkpoint.latest_checkpoint(run) / "meta.json").read_text())
    assert meta["init"]["bands_adapted"] == [3, 4]
    assert "patch_embed.proj.weight" not in meta["init"]["new"]


def test_bad_bands_are_named(tmp_path, band_shards):
    # a split of mixed band counts: refused by --stats, naming the odd file
    folder = band_folder(tmp_path / "mixed", "train", 20)
    odd = folder / "9" / "odd.npy"
    odd.parent.mkdir(exist_ok=True)
    np.save(odd, np.zeros((28, 28, 3), dtype=np.uint16))
    made = run_cli(
        "shards", "--source", f"imagefolder:{folder}", "--out", str(tmp_path / "mixed-shards"), "--stats"
    )
    assert made.returncode == 2 and "3 band(s)" in made.stderr and "4" in made.stderr, made.stderr[-2000:]
    assert "one split must have one band count" in made.stderr

    # a model of other bands than the shards' stats say
    result = run_cli(
        "pretrain", "--config", "pretrain/debug", f"data.train={band_shards['train']}", f"run.dir={tmp_path / 'r'}",
        "model.in_chans=3", *SMALL,
    )  # fmt: skip
    assert result.returncode == 2 and "holds 4-band images" in result.stderr and "takes 3" in result.stderr
    assert not (tmp_path / "r").exists()

    # NaN in an array: that sample is skipped, named with its shard
    nan = band_folder(tmp_path / "nan", "train", 16)
    bad = np.full((28, 28, 4), np.nan, dtype=np.float32)
    np.save(nan / "0" / "nan.npy", bad)
    made = run_cli("shards", "--source", f"imagefolder:{nan}", "--out", str(tmp_path / "nan-shards"))
    assert made.returncode == 0, made.stderr[-2000:]
    result = run_cli(
        "pretrain", "--config", "pretrain/debug", f"data.train={tmp_path / 'nan-shards'}", f"run.dir={tmp_path / 'n'}",
        "run.stop_after=2", "data.max_bad_fraction=0.5", "data.mean=[0.5]", "data.std=[0.25]", "model.in_chans=4", *SMALL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train-000000.tar: sample" in result.stderr and "NaN/inf values" in result.stderr
