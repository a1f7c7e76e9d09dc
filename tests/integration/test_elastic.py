"""A run moved to another number of processes or another ZeRO stage, with real DeepSpeed engines:
the AdamW moments land exactly where they were (every parameter, stages 0 to 3 to stages 0 to 3,
from shards written by 2 ranks), a stage change on the same processes ends bit-identical to the run that never moved,
2 -> 1 and 1 -> 2 processes keep the effective batch and finish the planned steps, and a process
count the effective batch does not divide over is refused (exit 2) naming ones that work."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mim import checkpoint
from mim.distributed import init_distributed, read_dist_env
from mim.engine import checkpointer, portable
from mim.engine.deepspeed_engine import EngineSettings, build_engine, full_state_dict
from mim.engine.optim import param_groups
from mim.models import create_model
from tests.conftest import GREY, run_cli, run_cli_ranks

pytestmark = pytest.mark.slow
RUN = ("--config", "configs/pretrain/debug.yaml", *GREY, "schedule.epochs=4")  # 64 samples per epoch


def pretrain(nproc, run_dir, shards, *overrides):
    args = ("pretrain", *RUN, f"data.train={shards}", f"run.dir={run_dir}", *overrides)
    result = run_cli(*args) if nproc == 1 else run_cli_ranks(nproc, *args)
    return result


def finished(result, run_dir, steps=None):
    assert result.returncode == 0, result.stderr[-3000:]
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run_dir))
    if steps is not None:
        assert meta["step"] == steps
    return meta


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, fmnist_shards):
    """stage -> a run written by 2 ranks at that ZeRO stage, stopped at step 8 of 16 (effective
    batch 16: 4 steps per epoch)."""
    root, runs = tmp_path_factory.mktemp("elastic"), {}
    for stage in (0, 1, 2, 3):
        result = pretrain(
            2,
            root / f"zero{stage}",
            fmnist_shards["train"],
            f"deepspeed.zero_stage={stage}",
            "run.stop_after=8",
        )
        finished(result, root / f"zero{stage}", 8)
        runs[stage] = root / f"zero{stage}"
    return runs


@pytest.fixture(scope="module")
def process_group():
    return init_distributed(read_dist_env({}))


@pytest.mark.parametrize(
    "written", [0, 1, 2, 3], ids=["from-zero0", "from-zero1", "from-zero2", "from-zero3"]
)
@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=["to-zero0", "to-zero1", "to-zero2", "to-zero3"])
def test_the_adamw_moments_land_exactly_on_one_process_at_any_stage(
    two_rank_runs, process_group, written, stage
):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    source = checkpoint.latest_checkpoint(two_rank_runs[written])
    moved, weights = checkpointer.optimizer_state(source), checkpoint.load_weights(source)
    model = create_model("mae_vit_debug", img_size=28, patch_size=7, in_chans=1)
    size = sum(p.numel() for p in model.parameters())
    settings = EngineSettings(8, 2, 1, stage, "fp32", None, num_params=size)  # batch 8 x 2 on 1 process
    engine = build_engine(model, param_groups(model, 0.05), settings)
    portable.load_into(engine, weights, moved)
    trained = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    assert len(moved) == len(trained) and int(next(iter(moved.values()))["step"]) == 8
    for name, parameter in trained:
        for key in ("exp_avg", "exp_avg_sq"):
            got = (
                engine.optimizer.state[parameter][key]
                if stage == 0
                else safe_get_full_optimizer_state(parameter, key)
            )
            assert torch.equal(got, moved[name][key]), (name, key)
        master = parameter if stage == 0 else safe_get_full_fp32_param(parameter)
        assert torch.equal(master.detach(), weights[name]), name
    held = full_state_dict(engine, 0)  # what forward uses (at stage 3: the slices, gathered)
    assert all(torch.equal(held[name], weights[name]) for name in weights)


@pytest.mark.parametrize(
    ("written", "stage"), [(1, 2), (3, 0), (0, 3)], ids=["zero1-to-zero2", "zero3-to-zero0", "zero0-to-zero3"]
)
def test_a_zero_stage_change_on_the_same_processes_ends_bit_identical(
    tmp_path, two_rank_runs, fmnist_shards, written, stage
):
    uninterrupted = pretrain(
        2, tmp_path / "uninterrupted", fmnist_shards["train"], f"deepspeed.zero_stage={written}"
    )
    finished(uninterrupted, tmp_path / "uninterrupted", 16)
    moved_dir = tmp_path / "moved"
    for source in checkpoint.complete_checkpoints(two_rank_runs[written]):
        (moved_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, moved_dir / "checkpoints" / source.name)
    moved = pretrain(2, moved_dir, fmnist_shards["train"], f"deepspeed.zero_stage={stage}")
    finished(moved, moved_dir, 16)
    assert f"from ZeRO stage {written} on 2 process(es) to stage {stage} on 2" in moved.stderr
    expected = load_file(
        str(checkpoint.latest_checkpoint(tmp_path / "uninterrupted") / checkpoint.WEIGHTS_FILE)
    )
    got = load_file(str(checkpoint.latest_checkpoint(moved_dir) / checkpoint.WEIGHTS_FILE))
    assert all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("written", [0, 1, 2, 3], ids=["zero0", "zero1", "zero2", "zero3"])
def test_two_processes_to_one_keeps_the_effective_batch_and_finishes_the_plan(
    tmp_path, two_rank_runs, fmnist_shards, written
):
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_runs[written], run_dir)
    result = pretrain(1, run_dir, fmnist_shards["train"])  # zero_stage=auto keeps the stage written
    meta = finished(result, run_dir, 16)
    assert (
        "effective batch 16 kept on 1 process(es) (written by 2): data.batch_size 8 -> 8, optim.accum_steps 1 -> 2"
        in result.stderr
    )
    assert "pretrain: 16 steps (4 per epoch of 64 samples), effective batch 16" in result.stderr
    assert meta["effective_batch"] == 16 and meta["world_size"] == 1
    moved = f"from ZeRO stage {written} on 2 process(es) to stage {written} on 1"
    assert (moved in result.stderr) == (written != 0)  # stage 0's files load as they are


@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=["zero0", "zero1", "zero2", "zero3"])
def test_one_process_to_two_and_a_count_that_does_not_divide(tmp_path, fmnist_shards, stage):
    run_dir, zero = tmp_path / "run", f"deepspeed.zero_stage={stage}"
    written = pretrain(1, run_dir, fmnist_shards["train"], zero, "run.stop_after=8")
    finished(written, run_dir, 8)  # effective batch 8
    if stage != 0:  # the refusal below is the same at every stage
        grown = pretrain(2, run_dir, fmnist_shards["train"], zero)
        assert f"from ZeRO stage {stage} on 1 process(es) to stage {stage} on 2" in grown.stderr
        assert finished(grown, run_dir, 32)["world_size"] == 2
        return
    refused = pretrain(3, run_dir, fmnist_shards["train"])
    assert refused.returncode != 0
    assert (
        "its effective batch of 8 (written by 1 process(es)) cannot be split evenly over 3" in refused.stderr
    )
    assert "use a process count that divides it (1, 2, 4, 8, ...)" in refused.stderr
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run_dir))["step"] == 8  # untouched
    grown = pretrain(2, run_dir, fmnist_shards["train"])
    meta = finished(grown, run_dir, 32)  # the plan of the effective batch 8: 8 steps per epoch, 4 epochs
    assert "effective batch 8 kept on 2 process(es) (written by 1): data.batch_size 8 -> 4" in grown.stderr
    assert meta["effective_batch"] == 8 and meta["world_size"] == 2
