"""Models that do not fit one process, with real DeepSpeed on gloo: ZeRO stage 3 through the CLI
(resume bit-identical, export strict in timm with the same features, fine-tuning and the linear
probe evaluating a gathered copy, the kNN monitor and reconstruction grids), `mim plan` against
what processes really hold, and the GPU report's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mim import checkpoint
from tests.conftest import GREY, REPO, cli_env, run_cli, run_cli_ranks
from tests.integration.test_classify import classify
from tests.integration.test_export import assert_same_features, export

pytestmark = pytest.mark.slow
RUN = ("--config", "configs/pretrain/debug.yaml", *GREY, "schedule.epochs=4", "deepspeed.zero_stage=3")


def pretrain(run_dir, shards, *overrides):
    result = run_cli_ranks(2, "pretrain", *RUN, f"data.train={shards}", f"run.dir={run_dir}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_weights(run_dir):
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / checkpoint.WEIGHTS_FILE))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, fmnist_shards):
    """2 ranks at ZeRO 3, 16 steps, with the kNN monitor and reconstruction grids on the way."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    result = pretrain(
        run_dir,
        fmnist_shards["train"],
        f"monitor.bank={fmnist_shards['train']}",
        f"monitor.val={fmnist_shards['val']}",
        "monitor.every=8",
        "monitor.bank_samples=200",
    )
    return run_dir, result


def test_zero3_run_writes_whole_weights_and_the_monitor_and_pictures_run(zero3_run):
    run_dir, result = zero3_run
    latest = checkpoint.latest_checkpoint(run_dir)
    meta = checkpoint.read_meta(latest)
    assert meta["engine"]["zero_stage"] == 3 and meta["step"] == 16
    assert len(list(latest.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2  # partitioned
    weights = checkpoint.load_weights(latest)
    assert weights["blocks.0.attn.qkv.weight"].shape == (96, 32)  # gathered, not a rank's slice
    assert "ZeRO stage 3" in result.stderr
    monitor = json.loads((run_dir / "monitor.json").read_text())
    assert [record["step"] for record in monitor["evaluations"]][:2] == [0, 8]
    assert all(record["top1"] > 10 for record in monitor["evaluations"][1:])  # above chance (10 classes)
    assert list((run_dir / "tb").glob("events.*"))


def test_zero3_stop_and_resume_is_bit_identical(tmp_path, zero3_run, fmnist_shards):
    straight, _ = zero3_run
    resumed = tmp_path / "resumed"
    common = (f"monitor.bank={fmnist_shards['train']}", f"monitor.val={fmnist_shards['val']}")
    common += ("monitor.every=8", "monitor.bank_samples=200")
    pretrain(resumed, fmnist_shards["train"], *common, "run.stop_after=8")
    second = pretrain(resumed, fmnist_shards["train"], *common)
    assert "resumed from" in second.stderr and "moving the optimizer state" not in second.stderr
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_zero3_checkpoint_exports_strictly_to_timm_with_the_same_features(tmp_path, zero3_run):
    run_dir, _ = zero3_run
    out = tmp_path / "export"
    config = export(run_dir, out)
    assert_same_features(run_dir, out, config, channels=1, size=28)


@pytest.mark.parametrize("stage", ["finetune", "linprobe"])
def test_classifier_stages_run_at_zero3_and_evaluate_a_gathered_copy(
    tmp_path, zero3_run, fmnist_shards, stage
):
    run_dir, _ = zero3_run
    result = classify(
        stage,
        fmnist_shards,
        tmp_path / stage,
        f"init.from={run_dir}",
        "deepspeed.zero_stage=3",
        # LARS needs whole tensors: a probe at stage 3 trains its heads with AdamW
        *(["model.grad_checkpointing=1"] if stage == "finetune" else ["optim.optimizer=adamw"]),
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / stage / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 250  # every validation sample once over the 2 ranks
    assert metrics["test"]["top1"] > 10
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path / stage))
    assert meta["engine"]["zero_stage"] == 3


def test_an_ema_target_at_zero3_is_refused_before_any_step(tmp_path, fmnist_shards):
    result = run_cli(
        "pretrain",
        *RUN,
        f"data.train={fmnist_shards['train']}",
        f"run.dir={tmp_path / 'run'}",
        "target.kind=ema",
    )
    assert result.returncode == 2
    assert "target.kind=ema follows the student's weights, which ZeRO stage 3 partitions" in result.stderr
    assert checkpoint.latest_checkpoint(tmp_path / "run") is None


# ----------------------------------------------------------------------------- the memory plan

PEAK_MODEL = ("mae_vit_small_patch16", "224", "16")  # 48M parameters, ~1.7 GiB at micro-batch 16


def measured_peaks(tmp_path, procs, stage, every):
    env = cli_env(MALLOC_MMAP_THRESHOLD_="65536")  # no RANK / MASTER_PORT of this test process
    script = [
        str(REPO / "benchmarks/memory_peak.py"),
        str(tmp_path),
        *PEAK_MODEL,
        str(stage),
        str(every),
        "2",
    ]
    launcher = (
        [sys.executable]
        if procs == 1
        else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}"]
    )
    result = subprocess.run(
        [*launcher, *script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank-*.json"))]


# The plan is compared with the peak of what torch's allocator holds (memory_peak.py), the
# quantity it claims to predict, not with resident memory, which adds malloc's slack and varies
# by machine. That peak is fixed by the code: the same shapes allocated in the same order. The
# 15 % margin is for what the plan leaves out by design: backward's transient peak is estimated
# per block (BACKWARD_PEAK_BLOCK_SHARE), not traced op by op, and gloo's buffers on several
# processes are not tensors the plan can count; benchmarks/README.md has every row's ratio.


def test_the_plan_is_within_15_percent_and_checkpointing_lowers_the_peak(tmp_path):
    """One process at ZeRO 0, activation checkpointing off and on: the plan within 15 % of what
    the process holds at its peak, and recomputing every block holds far less."""
    peaks = {}
    for every in (0, 1):
        (tmp_path / str(every)).mkdir()
        (record,) = measured_peaks(tmp_path / str(every), 1, 0, every)
        assert 0.85 <= record["predicted"] / record["measured"] <= 1.15, (every, record)
        peaks[every] = record["measured"]
    assert peaks[1] < 0.7 * peaks[0], peaks


# ZeRO 3 on two gloo processes is left to `benchmarks/memory_plan.py --validate`: its peak moves
# between runs of the same code (1.28 to 1.53 GiB with checkpointing: how much DeepSpeed has
# gathered ahead depends on the ranks' timing), so no margin would be decided by the code alone.
def test_the_plan_is_within_15_percent_on_two_processes_at_zero1(tmp_path):
    records = measured_peaks(tmp_path, 2, 1, 0)
    assert len(records) == 2
    for record in records:
        assert 0.85 <= record["predicted"] / record["measured"] <= 1.15, record


def test_the_gpu_report_smoke_run_prints_every_section():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_report.py"), "--smoke"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    for title in (
        "The step: mim against the plain loop",
        "The memory plan against measured peaks",
        "The CLI end to end",
    ):
        assert f"## {title}" in report
    assert "failed" not in report and "timed out" not in report, report
    assert "| mae_vit_debug | 8 x 1 | 3 |" in report  # ZeRO 3 beside ZeRO 0 on one process
    assert "exit 0" in report
