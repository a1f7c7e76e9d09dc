"""The online kNN monitor of `mim pretrain`, through the real CLI: its values are `mim knn`'s on
the same checkpoint and splits, it leaves the trained weights bit-identical, its schedule survives
a stop and resume, and two ranks count every sample once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from tests.conftest import GREY, run_cli, run_cli_ranks
from tests.integration.test_pretrain import final_weights

pytestmark = pytest.mark.slow
BANK, VAL = 300, 100


def pretrain_args(run_dir, shards, *overrides, monitor=True):
    watched = (
        [
            f"monitor.bank={shards['train']}",
            f"monitor.val={shards['val']}",
            f"monitor.bank_samples={BANK}",
            f"monitor.val_samples={VAL}",
            "monitor.every=4",
            "monitor.k=10",
            "monitor.num_workers=1",
            "monitor.crop_fraction=1.0",
        ]
        if monitor
        else []
    )
    return (
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        f"data.train={shards['train']}",
        f"run.dir={run_dir}",
        "run.checkpoint_every=100",
        "data.num_workers=1",
        *GREY,
        *watched,
        *overrides,
    )


def evaluations(run_dir):
    return json.loads((run_dir / "monitor.json").read_text())["evaluations"]


def knn_of(run_dir, shards):
    result = run_cli(
        "knn",
        "--k",
        "10",
        "--bank-samples",
        str(BANK),
        "--val-samples",
        str(VAL),
        f"init.from={run_dir}",
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        "data.num_workers=0",
        "model.global_pool=avg",
        "eval.crop_fraction=1.0",
        *GREY[:2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, fmnist_shards):
    run_dir = tmp_path_factory.mktemp("watched") / "run"
    result = run_cli(*pretrain_args(run_dir, fmnist_shards))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_monitor_logs_equal_mim_knn_and_go_to_tensorboard(watched_run, fmnist_shards):
    run_dir, result = watched_run
    records = evaluations(run_dir)
    assert [r["step"] for r in records] == [0, 4, 8, 12, 16]  # step 0, every 4, and the last (16)
    assert all(r["num_bank"] == BANK and r["num_val"] == VAL for r in records)
    assert [r["samples_seen"] for r in records] == [0, 32, 64, 96, 128]
    assert all(r["seconds"] > 0 and 0 <= r["top1"] <= r["top5"] <= 100 for r in records)
    assert "monitor step 16: kNN top-1" in result.stderr
    knn = knn_of(run_dir, fmnist_shards)  # the final checkpoint holds the weights of step 16
    assert (knn["top1"], knn["top5"], knn["num_bank"]) == (records[-1]["top1"], records[-1]["top5"], BANK)
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    logged = [(e.step, round(e.value, 4)) for e in events.Scalars("monitor/knn_top1")]
    assert logged == [(r["step"], round(r["top1"], 4)) for r in records]
    assert [e.step for e in events.Images("attention")] == [4, 8, 12, 16]


def test_monitor_on_and_off_train_bit_identical_weights(watched_run, tmp_path, fmnist_shards):
    result = run_cli(*pretrain_args(tmp_path / "off", fmnist_shards, monitor=False))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "off" / "monitor.json").exists()
    expected, got = final_weights(tmp_path / "off"), final_weights(watched_run[0])
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_resumed_run_neither_repeats_nor_skips_an_evaluation(watched_run, tmp_path, fmnist_shards):
    run_dir = tmp_path / "run"
    first = run_cli(*pretrain_args(run_dir, fmnist_shards, "run.stop_after=6"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["step"] for r in evaluations(run_dir)] == [0, 4]
    # A job killed after evaluating step 8 but before any checkpoint past step 6 left this behind:
    document = json.loads((run_dir / "monitor.json").read_text())
    document["evaluations"].append(dict(document["evaluations"][-1], step=8, top1=-1.0))
    (run_dir / "monitor.json").write_text(json.dumps(document))
    second = run_cli(*pretrain_args(run_dir, fmnist_shards))
    assert second.returncode == 0 and "resumed from" in second.stderr
    straight = evaluations(watched_run[0])
    resumed = evaluations(run_dir)
    drop_time = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert drop_time(resumed) == drop_time(straight)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_count_every_sample_once(tmp_path, fmnist_shards, zero_stage):
    run_dir = tmp_path / "run"
    result = run_cli_ranks(
        2, *pretrain_args(run_dir, fmnist_shards, f"deepspeed.zero_stage={zero_stage}", "schedule.epochs=1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = evaluations(run_dir)
    assert [r["step"] for r in records] == [0, 4]  # 64 samples per epoch / (8 x 2 ranks)
    assert all(r["num_bank"] == BANK and r["num_val"] == VAL for r in records)
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(run_dir))["engine"]["zero_stage"] == zero_stage
    knn = knn_of(run_dir, fmnist_shards)  # one process over the same checkpoint
    assert (knn["top1"], knn["top5"]) == (records[-1]["top1"], records[-1]["top5"])


def test_a_half_configured_or_missing_monitor_split_fails_before_work(tmp_path, fmnist_shards):
    only_bank = run_cli(
        *pretrain_args(tmp_path / "a", fmnist_shards, monitor=False), f"monitor.bank={fmnist_shards['train']}"
    )
    assert only_bank.returncode == 2 and "needs both monitor.bank and monitor.val" in only_bank.stderr
    missing = run_cli(*pretrain_args(tmp_path / "b", fmnist_shards, f"monitor.val={tmp_path / 'nowhere'}"))
    assert missing.returncode == 2 and "monitor.val" in missing.stderr
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(fmnist_shards["val"], unlabelled)
    info = json.loads((unlabelled / "_info.json").read_text())
    (unlabelled / "_info.json").write_text(json.dumps(dict(info, classes=[])))
    no_classes = run_cli(*pretrain_args(tmp_path / "c", fmnist_shards, f"monitor.val={unlabelled}"))
    assert no_classes.returncode == 2 and "names no classes" in no_classes.stderr
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))
