"""`mim demo --quick`: the whole chain on real Fashion-MNIST through the real stages, and
`mim visualize` on its pretraining run."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import FASHION_MNIST, run_cli

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage_and_writes_results(tmp_path):
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", str(out), "--data", str(FASHION_MNIST), timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"linprobe_mae", "linprobe_random", "finetune_mae"}
    assert all(10.0 < value <= 100.0 for value in results["accuracy"].values())  # better than chance already
    assert {"pretrain", "linprobe (MAE)", "finetune", "export", "total"} <= set(results["seconds"])
    assert "Linear probe top-1, MAE encoder" in (out / "results.md").read_text()
    assert "Linear probe top-1, MAE encoder" in result.stdout
    picture = Image.open(out / "reconstructions.png")
    assert picture.size == (4 * 28 * 4, 8 * 28 * 4)  # 4 panels x 8 images, 28 px, zoom 4
    assert (out / "export" / "model.safetensors").is_file() and (
        out / "export" / "decoder.safetensors"
    ).is_file()
    assert (
        json.loads((out / "shards" / "train" / "_info.json").read_text())["num_samples"] == 6000
    )  # --quick: a tenth

    probe = run_cli("visualize", str(out / "linprobe-mae"), "--out", str(tmp_path / "x.png"))
    assert probe.returncode == 2 and "reconstructions need a pretraining one" in probe.stderr


def test_demo_without_data_explains_what_to_install(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--data", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr
