"""A checkpoint written by an earlier mim (tests/fixtures/v1-pretrain-ema: meta.json version 1,
an EMA teacher) still resumes to the end, exports for timm and is probed, by today's mim through
the real CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from mim import checkpoint
from tests.conftest import GREY, REPO, run_cli

pytestmark = pytest.mark.slow
FIXTURE = REPO / "tests/fixtures/v1-pretrain-ema/step-00000004"


def test_an_old_checkpoint_resumes_to_the_end(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / checkpoint.CHECKPOINT_DIR / FIXTURE.name)
    result = run_cli(
        "pretrain",
        "--config",
        "pretrain/debug",
        f"data.train={fmnist_shards['train']}",
        f"run.dir={run}",
        *GREY,
        "target.kind=ema",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run / checkpoint.CHECKPOINT_DIR / FIXTURE.name} at step 4" in result.stderr
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["step"] == 16 and meta["meta_version"] == 2 and meta["target"]["kind"] == "ema"
    assert (checkpoint.latest_checkpoint(run) / "teacher.safetensors").is_file()


def test_an_old_checkpoint_exports_and_is_probed(tmp_path, fmnist_shards):
    exported = run_cli("export", str(FIXTURE), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["img_size"] == 28
    probe = tmp_path / "probe"
    result = run_cli(
        "linprobe",
        "--config",
        "linprobe/debug",
        f"init.from={FIXTURE}",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        f"run.dir={probe}",
        *GREY,
        "schedule.epochs=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((probe / "metrics.json").read_text())
    assert metrics["backbone"].endswith(str(FIXTURE)) and metrics["test"]["num_samples"] == 250
