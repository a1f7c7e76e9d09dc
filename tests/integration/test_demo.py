"""`mim demo --quick`: the whole chain on real Fashion-MNIST through the real stages, run from the
installed wheel, and `mim visualize` on its runs."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from PIL import Image

from tests.conftest import FASHION_MNIST, install_wheel, run_cli, run_installed

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage_and_writes_results(tmp_path):
    """As a user of the package runs it: from the installed wheel, in an empty directory."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    installed = install_wheel(tmp_path / "wheel")
    out = tmp_path / "demo"
    result = run_installed(
        installed, "demo", "--quick", "--out", str(out), "--data", str(FASHION_MNIST), timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert os.listdir(installed[1]) == [], "the demo wrote into the directory it was run from"
    results = json.loads((out / "results.json").read_text())
    accuracy = results["accuracy"]
    classify = {"linprobe_mae", "linprobe_random", "finetune_mae"}
    assert set(accuracy) == classify | {"segprobe_mae", "segprobe_random"}
    assert all(10.0 < accuracy[key] <= 100.0 for key in classify)  # better than chance already
    assert all(0.0 < accuracy[key] <= 100.0 for key in ("segprobe_mae", "segprobe_random"))
    # The first look shows the point: MAE's features beat a random encoder's, and get better.
    assert accuracy["linprobe_mae"] >= accuracy["linprobe_random"] + 5, accuracy
    curve = results["knn_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["top1"] > curve[0]["top1"], curve
    assert {"pretrain", "linprobe (MAE)", "finetune", "segprobe (MAE)", "export", "total"} <= set(
        results["seconds"]
    )
    report = (out / "results.md").read_text()
    assert "Linear probe top-1, MAE encoder" in report and "![attention](attention.png)" in report
    assert "Segmentation probe mIoU on the scenes, MAE encoder" in report
    assert (
        "![segmentation](segmentation.png)" in report and Image.open(out / "segmentation.png").width > 3 * 112
    )
    assert json.loads((out / "scenes" / "val" / "_info.json").read_text())["num_samples"] == 500
    assert "kNN top-1 during pretraining" in result.stdout
    assert "chosen on 10 % of the training images held out" in report
    # DeepSpeed's CPU-machine noise is silenced through its own logger and routed to debug.
    output = result.stdout + result.stderr
    assert "No CUDA runtime is found" not in output and "built successfully" not in output
    grid = Image.open(out / "reconstructions.png")
    cell = 28 * 4 + 2  # 28 px images drawn 4x (nearest neighbour), 2 px apart
    assert grid.size[0] == 4 * cell + 2 and grid.size[1] > 8 * cell  # 4 titled columns, 8 rows
    attention = Image.open(out / "attention.png")
    assert attention.size[0] == (1 + 4 + 1) * cell + 2  # image, 4 heads, mean
    assert Image.open(out / "knn.png").size == (640, 400)
    assert (out / "export" / "model.safetensors").is_file() and (
        out / "export" / "decoder.safetensors"
    ).is_file()
    card = (out / "export" / "README.md").read_text()
    [index] = yaml.safe_load(card.split("---\n")[1])["model-index"]
    figures = {r["task"]["name"]: r["metrics"][0]["value"] for r in index["results"]}
    assert figures == {
        "Linear probe": round(accuracy["linprobe_mae"], 2),
        "Fine-tuning": round(accuracy["finetune_mae"], 2),
        "Segmentation probe": round(accuracy["segprobe_mae"], 2),
    }
    assert str(out) not in card and "fashion-mnist" in card
    assert (
        json.loads((out / "shards" / "train" / "_info.json").read_text())["num_samples"] == 6000
    )  # --quick: a tenth

    probe = run_cli("visualize", str(out / "linprobe-mae"), "--out", str(tmp_path / "x.png"))
    assert probe.returncode == 2 and "reconstructions need a pretraining one" in probe.stderr
    maps = run_cli("visualize", str(out / "linprobe-mae"), "--attention", "--out", str(tmp_path / "a.png"))
    assert maps.returncode == 0 and Image.open(tmp_path / "a.png").size == attention.size
    assert "block 4 of 4" in maps.stdout  # blocks are counted from 1 wherever a person reads them
    first = run_cli(
        "visualize",
        str(out / "linprobe-mae"),
        "--attention",
        "--block",
        "1",
        "--out",
        str(tmp_path / "f.png"),
    )
    assert first.returncode == 0 and "block 1 of 4" in first.stdout
    for block in ("5", "0"):
        wrong = run_cli(
            "visualize",
            str(out / "export"),
            "--attention",
            "--block",
            block,
            "--out",
            str(tmp_path / "b.png"),
        )
        assert wrong.returncode == 2
        assert f"--block {block} does not exist: this encoder has 4 blocks, counted from 1" in wrong.stderr
    assert not (tmp_path / "b.png").exists()
    nowhere = run_cli("visualize", str(tmp_path / "nowhere"), "--attention", "--out", str(tmp_path / "c.png"))
    assert nowhere.returncode == 2 and "nowhere does not exist (expected a mim run dir" in nowhere.stderr


def test_demo_without_data_explains_what_to_install(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--data", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr
