"""mim as a package, not a checkout: the wheel is built from the repository, installed with
`pip install --target` into a folder outside it (what a wheel or `pip install git+...` gives), and
its stages run from an empty temporary directory with only that folder on the path: recipes by
name, the Slurm template, pretraining and kNN (the quick demo runs the same way in test_demo.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mim import checkpoint
from tests.conftest import GREY, cli_env, install_wheel, run_installed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_installed_package_is_the_one_that_runs_and_carries_its_recipes(installed):
    target, cwd = installed
    env = dict(cli_env(), PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-c", "import mim, pipelines; print(mim.__file__, pipelines.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.split() == [
        str(target / "mim" / "__init__.py"),
        str(target / "pipelines" / "__init__.py"),
    ]
    listed = run_installed(installed, "configs")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "pretrain/mae_vit_base_p16" in listed.stdout and "linprobe/mae_vit_base_p16" in listed.stdout
    assert str(target / "mim" / "_data" / "configs") in listed.stderr
    wrong = run_installed(installed, "pretrain", "--config", "pretrain/mae_vit_base_p61")
    assert wrong.returncode == 2 and "did you mean pretrain/mae_vit_base_p16" in wrong.stderr


def test_submit_dry_run_renders_the_packaged_template(installed, tmp_path):
    result = run_installed(
        installed,
        "submit",
        "pretrain",
        "--dry-run",
        "--nodes=2",
        "--gpus-per-node=8",
        "--config",
        "pretrain/mae_vit_base_p16",
        f"data.train={tmp_path}",
        f"run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "#SBATCH --nodes=2" in result.stdout and "srun " in result.stdout
    assert "pretrain/mae_vit_base_p16" in result.stdout


def test_pretraining_and_knn_run_from_anywhere(installed, tmp_path, fmnist_shards):
    run = tmp_path / "run"
    pretrain = run_installed(
        installed,
        "pretrain",
        "--config",
        "pretrain/debug",
        f"data.train={fmnist_shards['train']}",
        f"run.dir={run}",
        *GREY,
    )
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["step"] == 16
    knn = run_installed(
        installed,
        "knn",
        "--out",
        str(tmp_path / "knn.json"),
        f"init.from={run}",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        "data.num_workers=0",
        *GREY,
    )
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert json.loads((tmp_path / "knn.json").read_text())["num_samples"] == 250
    assert os.listdir(installed[1]) == [], "a stage wrote into the directory it was run from"
