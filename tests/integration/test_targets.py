"""`target.*` through the real CLI: HOG, a frozen teacher, the EMA teacher and the global
(cls-token) objective on real Fashion-MNIST shards and a real DeepSpeed engine: each lowers its
loss, resumes bit-identically (EMA teacher included), runs on 2 ranks at ZeRO 2 with
accumulation, and the frozen teacher never changes nor reaches the student's checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from tests.conftest import GREY, run_cli, run_cli_ranks

pytestmark = pytest.mark.slow


def pretrain_args(run_dir, shards, *overrides):
    return (
        "pretrain",
        "--config",
        "pretrain/debug",
        f"data.train={shards}",
        f"run.dir={run_dir}",
        *GREY,
        "log.every=2",
        *overrides,
    )


def pretrain(run_dir, shards, *overrides):
    result = run_cli(*pretrain_args(run_dir, shards, *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir) -> list[float]:
    return [e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/loss")]


def final(run_dir, name=checkpoint.WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / name))


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, fmnist_shards):
    """A pixel-MAE run of the debug model: the frozen teacher of these tests."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    pretrain(run, fmnist_shards["train"], "schedule.epochs=4")
    return run


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("hog", ["target.kind=hog"]),
        ("hog, compiled", ["target.kind=hog", "deepspeed.compile=true"]),
        ("teacher", ["target.kind=teacher"]),
        ("ema", ["target.kind=ema", "optim.accum_steps=2", "data.batch_size=4"]),
        ("pixels + global", ["target.global_weight=1.0"]),
        ("hog + global from the teacher", ["target.kind=hog", "target.global_weight=0.5"]),
    ],
)
def test_each_target_lowers_its_loss_and_is_recorded(tmp_path, fmnist_shards, teacher, name, overrides):
    if "teacher" in name:
        overrides = [*overrides, f"target.teacher={teacher}"]
    if name == "ema":  # with the kNN monitor on
        overrides = [
            *overrides,
            f"monitor.bank={fmnist_shards['train']}",
            f"monitor.val={fmnist_shards['val']}",
            "monitor.every=8",
            "monitor.bank_samples=200",
            "monitor.val_samples=100",
            "monitor.num_workers=0",
        ]
    run = tmp_path / "run"
    result = pretrain(run, fmnist_shards["train"], "schedule.epochs=4", "optim.blr=2e-2", *overrides)
    curve = losses(run)
    assert len(curve) == 16 and all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:2]) / 2, f"{name}: {curve}"
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    kind = next((o.split("=")[1] for o in overrides if o.startswith("target.kind=")), "pixels")
    assert meta["target"]["kind"] == kind
    if "global" in name:
        assert meta["target"]["global_weight"] > 0 and any(k.startswith("global_head.") for k in final(run))
    if kind != "pixels":
        assert "predicts no pixels" in result.stderr
    if name == "ema":
        records = json.loads((run / "monitor.json").read_text())["evaluations"]
        assert [r["step"] for r in records] == [0, 8, 16, 24, 32] and all(
            0 < r["top1"] <= 100 for r in records
        )


def test_the_frozen_teacher_never_changes_and_never_reaches_the_checkpoint(tmp_path, fmnist_shards, teacher):
    files = sorted(p for p in checkpoint.latest_checkpoint(teacher).iterdir() if p.is_file())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    run = tmp_path / "student"
    pretrain(
        run,
        fmnist_shards["train"],
        "target.kind=teacher",
        f"target.teacher={teacher}",
        "target.global_weight=1",
    )
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert before == after
    student_checkpoint = checkpoint.latest_checkpoint(run)
    assert not (student_checkpoint / "teacher.safetensors").exists()
    pixel_keys = set(final(teacher))
    student = final(run)
    assert set(student) - pixel_keys == {k for k in student if k.startswith("global_head.")}
    teacher_weights = final(teacher)
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher_weights["blocks.0.attn.qkv.weight"])
    exported = tmp_path / "backbone"
    result = run_cli("export", str(run), "--out", str(exported))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(
        k.startswith(("global_head", "decoder_")) for k in load_file(str(exported / "model.safetensors"))
    )
    shown = run_cli("visualize", str(run), "--out", str(tmp_path / "r.png"))
    assert shown.returncode == 2 and "no reconstructions to draw" in shown.stderr
    attention = run_cli("visualize", str(run), "--attention", "--out", str(tmp_path / "a.png"))
    assert attention.returncode == 0 and (tmp_path / "a.png").is_file(), attention.stderr[-3000:]


def test_an_ema_run_resumes_bit_identically_teacher_included(tmp_path, fmnist_shards):
    common = (
        "target.kind=ema",
        "target.global_weight=0.5",
        "target.ema_decay=0.99",
        "run.checkpoint_every=100",
    )
    pretrain(tmp_path / "straight", fmnist_shards["train"], *common)
    pretrain(tmp_path / "resumed", fmnist_shards["train"], *common, "run.stop_after=7")
    assert (checkpoint.latest_checkpoint(tmp_path / "resumed") / "teacher.safetensors").is_file()
    second = pretrain(tmp_path / "resumed", fmnist_shards["train"], *common)
    assert "resumed from" in second.stderr
    assert_equal_states(final(tmp_path / "straight"), final(tmp_path / "resumed"))
    teacher_straight = final(tmp_path / "straight", "teacher.safetensors")
    assert_equal_states(teacher_straight, final(tmp_path / "resumed", "teacher.safetensors"))
    # the teacher followed the student: it is neither the student nor where it started
    student = final(tmp_path / "straight")
    assert not torch.equal(teacher_straight["blocks.0.mlp.fc1.weight"], student["blocks.0.mlp.fc1.weight"])


def test_two_ranks_at_zero_2_with_accumulation_resume_bit_identically(tmp_path, fmnist_shards):
    common = (
        "target.kind=ema",
        "target.global_weight=0.5",
        "deepspeed.zero_stage=2",
        "optim.accum_steps=2",
        "data.batch_size=4",
        "run.checkpoint_every=100",
    )
    straight = run_cli_ranks(2, *pretrain_args(tmp_path / "straight", fmnist_shards["train"], *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli_ranks(
        2, *pretrain_args(tmp_path / "resumed", fmnist_shards["train"], *common, "run.stop_after=3")
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli_ranks(2, *pretrain_args(tmp_path / "resumed", fmnist_shards["train"], *common))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    assert_equal_states(final(tmp_path / "straight"), final(tmp_path / "resumed"))
    assert_equal_states(
        final(tmp_path / "straight", "teacher.safetensors"),
        final(tmp_path / "resumed", "teacher.safetensors"),
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["target.kind=teacher"], "target.kind=teacher needs target.teacher"),
        (["target.kind=hog", "target.hog_cell=3"], "target.hog_cell 3 must divide model.patch_size 7"),
        (["target.teacher=/nonexistent"], "nothing uses it"),
        (["target.kind=teacher", "target.teacher=/nonexistent"], "does not exist"),
        (["target.kind=pixel"], "target.kind='pixel': no such target; did you mean 'pixels'?"),
        (["target.kind=no_such_lab.targets:Canny"], "cannot import 'no_such_lab.targets'"),
    ],
)
def test_bad_target_settings_exit_2_before_any_work(tmp_path, fmnist_shards, overrides, message):
    result = run_cli(*pretrain_args(tmp_path / "run", fmnist_shards["train"], *overrides))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_fine_tuned_classifier_teaches_with_its_pooled_feature(tmp_path, fmnist_shards, teacher):
    """A supervised teacher (fine-tuning's layout: fc_norm and a head) loads, head unused."""
    classifier = tmp_path / "classifier"
    tuned = run_cli(
        "finetune",
        "--config",
        "finetune/debug",
        f"init.from={teacher}",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        f"run.dir={classifier}",
        "schedule.epochs=1",
        "data.num_workers=0",
        *GREY,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    run = tmp_path / "student"
    pretrain(
        run,
        fmnist_shards["train"],
        "target.kind=teacher",
        f"target.teacher={classifier}",
        "target.global_weight=1",
    )
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["target"]["teacher"].startswith("mim finetune checkpoint")
    assert all(torch.isfinite(torch.tensor(losses(run))))


def test_resuming_with_another_target_is_refused(tmp_path, fmnist_shards):
    run = tmp_path / "run"
    pretrain(run, fmnist_shards["train"], "run.stop_after=4")
    listing = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = run_cli(*pretrain_args(run, fmnist_shards["train"], "target.kind=hog"))
    assert result.returncode == 2 and "cannot resume from" in result.stderr and "target" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == listing


def test_a_damaged_ema_teacher_sets_its_checkpoint_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, fmnist_shards
):
    common = ("target.kind=ema", "target.ema_decay=0.99", "run.checkpoint_every=4")
    pretrain(tmp_path / "straight", fmnist_shards["train"], *common)
    run = tmp_path / "run"
    pretrain(run, fmnist_shards["train"], *common, "run.stop_after=8")
    teacher_file = run / "checkpoints" / "step-00000008" / "teacher.safetensors"
    data = bytearray(teacher_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    teacher_file.write_bytes(data)
    result = pretrain(run, fmnist_shards["train"], *common)
    assert "is damaged: " in result.stderr and "teacher.safetensors" in result.stderr.split("is damaged: ")[1]
    assert "step-00000004 at step 4" in result.stderr
    assert len(list((run / "checkpoints").glob("damaged-step-00000008-*"))) == 1
    assert_equal_states(final(tmp_path / "straight"), final(run))
    assert_equal_states(
        final(tmp_path / "straight", "teacher.safetensors"), final(run, "teacher.safetensors")
    )
