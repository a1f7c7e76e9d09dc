"""`mim pretrain` end to end through the real CLI: real shards, a real DeepSpeed engine (CPU
accelerator, gloo), real checkpoints and TensorBoard event files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from tests.conftest import REPO, run_cli, torchrun, without_key_bias

pytestmark = pytest.mark.slow
DEBUG = "configs/pretrain/debug.yaml"


def pretrain(run_dir, shards, *overrides):
    return run_cli(
        "pretrain",
        "--config",
        DEBUG,
        f"data.train={shards}",
        f"run.dir={run_dir}",
        "model.img_size=28",
        "model.patch_size=7",
        "model.in_chans=1",
        "data.mean=[0.286]",
        "data.std=[0.353]",
        *overrides,
    )


def final_weights(run_dir):
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / checkpoint.WEIGHTS_FILE))


def test_pretrain_writes_checkpoints_tensorboard_and_config(tmp_path, fmnist_shards):
    result = pretrain(tmp_path / "run", fmnist_shards["train"], "run.keep_last=2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    names = [p.name for p in checkpoint.complete_checkpoints(run)]
    assert names == ["step-00000012", "step-00000016"]  # every 4 steps, last 2 kept; 16 steps = 2 x 64 / 8
    meta = checkpoint.read_meta(run / "checkpoints" / names[-1])
    assert meta["step"] == 16 and meta["norm_pix_loss"] is True and meta["samples_seen"] == 128
    assert meta["model"]["arch"]["patch_size"] == 7 and meta["git_sha"] and meta["versions"]["deepspeed"]
    assert meta["engine"] == {"zero_stage": 0, "precision": "fp32"}  # zero_stage auto on one process
    assert (run / "config.yaml").is_file() and "patch_size: 7" in (run / "config.yaml").read_text()
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 17, 2))
    assert {"train/lr", "train/grad_norm", "train/images_per_sec", "train/samples_seen"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Images("reconstructions")] == [4, 8, 12, 16]
    # The gradient norm is computed on the logged steps (at stage 0 it is mim's, not DeepSpeed's).
    assert all(0 < e.value < float("inf") for e in events.Scalars("train/grad_norm"))
    assert "img/s" in result.stderr and "eta" in result.stderr


def test_stop_and_resume_is_bit_identical_to_uninterrupted(tmp_path, fmnist_shards):
    common = ("data.num_workers=2", "run.checkpoint_every=100")
    straight = pretrain(tmp_path / "straight", fmnist_shards["train"], *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = pretrain(tmp_path / "resumed", fmnist_shards["train"], *common, "run.stop_after=7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.latest_checkpoint(tmp_path / "resumed").name == "step-00000007"
    second = pretrain(tmp_path / "resumed", fmnist_shards["train"], *common)
    assert second.returncode == 0 and "resumed from" in second.stderr
    expected, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_auto_keeps_the_runs_zero_stage_and_another_stage_moves_the_run(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    first = pretrain(run, fmnist_shards["train"], "deepspeed.zero_stage=1", "run.stop_after=4")
    assert first.returncode == 0, first.stderr[-3000:]
    written = checkpoint.latest_checkpoint(run)
    second = pretrain(run, fmnist_shards["train"], "run.stop_after=8")  # auto, alone stage 0 here
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    assert f"deepspeed.zero_stage=auto: ZeRO stage 1, the stage {written} was written at" in second.stderr
    assert "moving the optimizer state" not in second.stderr  # DeepSpeed's own load
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run))["engine"]["zero_stage"] == 1
    third = pretrain(run, fmnist_shards["train"], "deepspeed.zero_stage=0")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "from ZeRO stage 1 on 1 process(es) to stage 0 on 1" in third.stderr
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["engine"]["zero_stage"] == 0 and meta["step"] == 16


_RUNS: dict[
    tuple, dict
] = {}  # a run's final weights by its settings: tests that compare with the same run share it


def _data_parallel(out, nproc, zero_stage, accum=1, compile_model=False, checkpoint_every=0):
    settings = (nproc, zero_stage, accum, compile_model, checkpoint_every)
    if settings not in _RUNS:
        _RUNS[settings] = _run_data_parallel(out, *settings)
    return _RUNS[settings]


def _run_data_parallel(out, nproc, zero_stage, accum, compile_model, checkpoint_every):
    result = torchrun(
        nproc,
        str(REPO / "tests/helpers/data_parallel_steps.py"),
        str(out),
        str(zero_stage),
        str(accum),
        "compile" if compile_model else "eager",
        str(checkpoint_every),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, zero_stage):
    """Stage 0 on one rank skips the all-reduce and clips in mim; on two mim's GradientSync
    averages during backward, on the last micro-batch only when accumulating. Stage 3 partitions
    the weights too and gathers them block by block."""
    one = _data_parallel(tmp_path / "one.safetensors", 1, zero_stage)
    two = _data_parallel(tmp_path / "two.safetensors", 2, zero_stage)
    accumulated = _data_parallel(tmp_path / "accum.safetensors", 1, zero_stage, accum=2)
    both = _data_parallel(tmp_path / "both.safetensors", 2, zero_stage, accum=2)
    for key in one:
        expected, *others = (without_key_bias(key, t[key]) for t in (one, two, accumulated, both))
        for got in others:
            assert torch.allclose(expected, got, rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_compiled_model_on_two_ranks_matches_eager_on_one(tmp_path, zero_stage):
    """torch.compile (inductor on the CPU) under ZeRO 0/1/2 with 2 gloo ranks (at stage 0 mim's
    gradient hooks sit on the compiled model's parameters): same weights as the eager one-rank
    run to float round-off (the compiled kernels sum in another order). ZeRO 3 compiled:
    test_activation_checkpointing_compiles_at_zero3."""
    eager = _data_parallel(tmp_path / "eager.safetensors", 1, zero_stage)
    compiled = _data_parallel(tmp_path / "compiled.safetensors", 2, zero_stage, compile_model=True)
    assert eager.keys() == compiled.keys()
    for key in eager:
        expected, got = without_key_bias(key, eager[key]), without_key_bias(key, compiled[key])
        assert torch.allclose(expected, got, rtol=1e-4, atol=1e-5), key


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_activation_checkpointing_leaves_the_weights_bit_identical(tmp_path, zero_stage):
    """Every block and every other block recomputed in backward (2 ranks, clipping, 4 steps):
    the same weights to the bit as without, since the recomputed forward is the forward."""
    plain = _data_parallel(tmp_path / "plain.safetensors", 2, zero_stage)
    for every in (1, 2):
        got = _data_parallel(tmp_path / f"every{every}.safetensors", 2, zero_stage, checkpoint_every=every)
        assert got.keys() == plain.keys()
        assert all(torch.equal(got[key], plain[key]) for key in plain), every


def test_activation_checkpointing_compiles_at_zero3(tmp_path):
    """Checkpointed blocks under torch.compile and ZeRO 3 on 2 ranks: the weights of the eager,
    unchecked one-rank run to float round-off."""
    eager = _data_parallel(tmp_path / "eager.safetensors", 1, 3)
    compiled = _data_parallel(tmp_path / "compiled.safetensors", 2, 3, compile_model=True, checkpoint_every=1)
    for key in eager:
        expected, got = without_key_bias(key, eager[key]), without_key_bias(key, compiled[key])
        assert torch.allclose(expected, got, rtol=1e-4, atol=1e-5), key


def test_compiled_run_resumes_bit_identically(tmp_path, fmnist_shards):
    common = ("deepspeed.compile=true", "run.checkpoint_every=100", "schedule.epochs=1")
    straight = pretrain(tmp_path / "straight", fmnist_shards["train"], *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = pretrain(tmp_path / "resumed", fmnist_shards["train"], *common, "run.stop_after=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain(tmp_path / "resumed", fmnist_shards["train"], *common)
    assert second.returncode == 0 and "resumed from" in second.stderr
    expected, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()  # compiled in place: the official names, no _orig_mod.
    assert all(torch.equal(expected[k], got[k]) for k in expected)
