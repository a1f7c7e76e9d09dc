"""The README's quick start, run as written: its shell lines one by one from an empty directory on
a folder of real Fashion-MNIST images, then its timm snippet on the export. Only the budget
differs: the test appends overrides that make pretraining and the probe a few steps of the debug
model (a ViT-B epoch does not fit in a test); every command, path and recipe name is the README's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, fashion_mnist_subset

pytestmark = pytest.mark.slow

BUDGET = {
    "pretrain": "model.name=mae_vit_debug model.img_size=32 data.batch_size=8 data.num_workers=0 "
    "data.samples_per_epoch=64 schedule.epochs=2 schedule.warmup_epochs=0 log.every=4 log.recon_every=0",
    "linprobe": "data.batch_size=32 data.num_workers=0 schedule.epochs=1 schedule.warmup_epochs=0 log.every=4",
}


def quick_start() -> tuple[list[str], str]:
    """The shell lines and the Python snippet of the README's quick start."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return [line for line in shell.splitlines() if line.strip()], python


def image_folder(root: Path, split: str, count: int) -> None:
    source = fashion_mnist_subset("test" if split == "val" else split, count)
    for i, record in enumerate(source.records):
        data, extension = record.read()
        folder = root / split / source.classes[record.label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.{extension}").write_bytes(data)


def test_the_readme_quick_start_runs_as_written(tmp_path):
    lines, snippet = quick_start()
    assert [line.split()[1] for line in lines] == ["shards", "shards", "pretrain", "linprobe", "export"]
    images, work = tmp_path / "images", tmp_path / "work"
    image_folder(images, "train", 200)
    image_folder(images, "val", 100)
    work.mkdir()
    env = cli_env(IMAGES=str(images))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's `mim`
    for line in lines:
        stage = line.split()[1]
        command = f"{line} {BUDGET.get(stage, '')}"
        result = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert (work / "shards" / "train" / "_info.json").is_file()
    assert '"top1"' in (work / "runs" / "probe" / "metrics.json").read_text()
    snippet += "\nprint('features', tuple(features.shape))\n"
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "features (2, " in result.stdout
