"""docs/extending.md's examples (examples/my_lab) through the real CLI, as a team would use them
from outside mim's tree: a target, a model transform and a task named by `package.module:Name`,
on real Fashion-MNIST shards and a real DeepSpeed engine, stopped and resumed."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from tests.conftest import GREY, REPO, run_cli

pytestmark = pytest.mark.slow
PLUG_INS = {"PYTHONPATH": f"{REPO}:{REPO / 'examples'}"}


def losses(run_dir) -> list[float]:
    return [e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/loss")]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / checkpoint.WEIGHTS_FILE))


def test_a_target_and_a_transform_of_ones_own_train_stop_and_resume(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    args = (
        "pretrain",
        "--config",
        "pretrain/debug",
        f"data.train={fmnist_shards['train']}",
        f"run.dir={run}",
        *GREY,
        "schedule.epochs=4",
        "optim.blr=2e-2",
        "target.kind=my_lab.targets:Edges",
        "model.transforms=[my_lab.transforms:freeze_patch_embed]",
    )
    first = run_cli(*args, "run.stop_after=8", **PLUG_INS)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "model transforms my_lab.transforms:freeze_patch_embed:" in first.stderr
    at_8 = weights(run)
    resumed = run_cli(*args, **PLUG_INS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["step"] == 32 and meta["target"]["kind"] == "my_lab.targets:Edges"
    assert meta["target"]["edges"].startswith("sobel")
    at_end = weights(run)
    frozen = [k for k in at_end if k.startswith("patch_embed.")]
    assert frozen and all(torch.equal(at_8[k], at_end[k]) for k in frozen)
    assert not torch.equal(at_8["blocks.0.attn.qkv.weight"], at_end["blocks.0.attn.qkv.weight"])
    curve = losses(run)
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:2]) / 2, curve


def test_a_task_of_ones_own_runs_through_mim_train(tmp_path, fmnist_shards):
    run = tmp_path / "rotation"
    result = run_cli(
        "train",
        "--task",
        "my_lab.tasks:Rotation",
        "--config",
        "finetune/debug",
        "init.from=none",
        "model.name=mae_vit_debug",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        f"run.dir={run}",
        *GREY,
        "schedule.epochs=4",
        "optim.lr=2e-3",
        "model.drop_path=0",
        **PLUG_INS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rotation accuracy" in result.stderr
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["stage"] == "my_lab.tasks:Rotation"
    assert re.search(rf"stopped at step {meta['step']} of {meta['step']} \(finished\)", result.stderr)
    accuracy = [
        e.value for e in EventAccumulator(str(run / "tb")).Reload().Scalars("train/rotation_accuracy")
    ]
    assert accuracy[-1] > 40.0, accuracy  # chance is 25 %


def test_mim_train_without_a_task_lists_the_registered_ones():
    result = run_cli("train")
    assert result.returncode == 2 and "registered tasks: finetune, linprobe, pretrain" in result.stderr


@pytest.mark.parametrize(
    "command, override, message",
    [
        (("train", "--task", "my_lab.tasks:Nope"), "", "my_lab.tasks has no 'Nope'"),
        (("train", "--task", "segment"), "", "--task='segment': no such task"),
        (("pretrain",), "model.transforms=[lora]", "model.transforms='lora': no such model transform"),
    ],
)
def test_a_part_that_does_not_exist_exits_2_naming_it(tmp_path, fmnist_shards, command, override, message):
    run = tmp_path / "run"
    overrides = [f"data.train={fmnist_shards['train']}", f"run.dir={run}", *GREY] + (
        [override] if override else []
    )
    result = run_cli(*command, "--config", "pretrain/debug", *overrides, **PLUG_INS)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
