"""Damaged checkpoints, through the real CLI and a real DeepSpeed engine: each kind of file of the
newest checkpoint flipped or truncated; the restarted run sets it aside, resumes from the previous
one and ends bit-identical to an uninterrupted run. None that verifies: exit 3, nothing moved.
Checkpoints from before manifests still load. Export and probes refuse a damaged one by name."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from mim import checkpoint
from tests.conftest import GREY, run_cli

pytestmark = pytest.mark.slow
ZERO_SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


DEBUG = ("--config", "configs/pretrain/debug.yaml", *GREY)


def pretrain(run_dir, shards, stage, *overrides):
    where = (f"data.train={shards}", f"run.dir={run_dir}", f"deepspeed.zero_stage={stage}")
    return run_cli("pretrain", *DEBUG, *where, *overrides)


def final_weights(run_dir):
    latest = checkpoint.latest_checkpoint(run_dir)
    assert checkpoint.read_meta(latest)["step"] == 16
    return load_file(str(latest / checkpoint.WEIGHTS_FILE))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards):
    """stage -> (reference weights after 16 steps, a run stopped at step 12 with checkpoints 4, 8,
    12), each made once per stage the module asks for."""
    made = {}

    def at(stage):
        if stage not in made:
            root = tmp_path_factory.mktemp(f"integrity-zero{stage}")
            shards = fmnist_shards["train"]
            reference = pretrain(root / "reference", shards, stage)
            assert reference.returncode == 0, reference.stderr[-3000:]
            stopped = pretrain(root / "stopped", shards, stage, "run.stop_after=12")
            assert stopped.returncode == 0, stopped.stderr[-3000:]
            names = [p.name for p in checkpoint.complete_checkpoints(root / "stopped")]
            assert names == ["step-00000004", "step-00000008", "step-00000012"]
            made[stage] = final_weights(root / "reference"), root / "stopped"
        return made[stage]

    return at


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
        return
    width = min(4096, len(data) // 4)
    start = len(data) // 2 - width // 2
    data[start : start + width] = bytes(byte ^ 0xFF for byte in data[start : start + width])
    path.write_bytes(data)


def a_copy(stopped, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    return run_dir


KINDS = [  # (ZeRO stage, file, how): the optimizer's shards exist at stage 1
    (0, "mp_rank_00_model_states.pt", "flip"),
    (0, "mp_rank_00_model_states.pt", "truncate"),
    (0, "rank-00000.pt", "flip"),
    (0, checkpoint.WEIGHTS_FILE, "flip"),
    (0, checkpoint.WEIGHTS_FILE, "truncate"),
    (0, checkpoint.META_FILE, "flip"),
    (0, checkpoint.MANIFEST_FILE, "flip"),
    (0, checkpoint.MANIFEST_FILE, "truncate"),
    (1, ZERO_SHARD, "flip"),
    (1, ZERO_SHARD, "truncate"),
]


@pytest.mark.parametrize(("stage", "name", "how"), KINDS, ids=[f"zero{s}-{n}-{h}" for s, n, h in KINDS])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_ends_as_if_uninterrupted(
    tmp_path, runs, fmnist_shards, stage, name, how
):
    reference, stopped = runs(stage)
    run_dir = a_copy(stopped, tmp_path)
    damage(run_dir / "checkpoints" / "step-00000012" / name, how)
    result = pretrain(run_dir, fmnist_shards["train"], stage)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-00000012'} is damaged: " in result.stderr
    assert name in result.stderr.split("is damaged: ")[1].splitlines()[0]  # the file is named
    assert "resumed from" in result.stderr and "step-00000008 at step 8" in result.stderr
    aside = list((run_dir / "checkpoints").glob("damaged-step-00000012-*"))
    assert len(aside) == 1 and (aside[0] / name).is_file()  # kept for inspection
    got = final_weights(run_dir)
    assert got.keys() == reference.keys()
    assert all((got[key] == reference[key]).all() for key in reference)  # bit-identical


def test_when_no_checkpoint_verifies_the_run_stops_and_moves_nothing(tmp_path, runs, fmnist_shards):
    stage, (_, stopped) = 0, runs(0)
    run_dir = a_copy(stopped, tmp_path)
    for step in (4, 8, 12):
        damage(run_dir / "checkpoints" / checkpoint.step_name(step) / checkpoint.WEIGHTS_FILE, "flip")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = pretrain(run_dir, fmnist_shards["train"], stage)
    assert result.returncode == 3, result.stderr[-3000:]
    assert (
        f"no checkpoint of {run_dir} verifies" in result.stderr
        and "nothing was moved or deleted" in result.stderr
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_checkpoint_from_before_manifests_resumes_with_a_warning(tmp_path, runs, fmnist_shards):
    stage, (reference, stopped) = 0, runs(0)
    run_dir = a_copy(stopped, tmp_path)
    for found in checkpoint.complete_checkpoints(run_dir):  # as the previous version wrote them
        (found / checkpoint.MANIFEST_FILE).unlink()
        meta = json.loads((found / checkpoint.META_FILE).read_text())
        del meta["integrity"]
        (found / checkpoint.META_FILE).write_text(json.dumps(meta))
    result = pretrain(run_dir, fmnist_shards["train"], stage)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was written before checkpoints had checksums: loading it unverified" in result.stderr
    got = final_weights(run_dir)
    assert all((got[key] == reference[key]).all() for key in reference)


@pytest.mark.parametrize("stage", [0, 1], ids=["zero0-weights", "zero1-optimizer-shard"])
def test_export_and_a_probe_refuse_a_damaged_checkpoint_naming_the_file(tmp_path, runs, fmnist_shards, stage):
    _, stopped = runs(stage)
    run_dir = a_copy(stopped, tmp_path)
    name = ZERO_SHARD if stage == 1 else checkpoint.WEIGHTS_FILE
    damaged = run_dir / "checkpoints" / "step-00000012" / name
    damage(damaged, "flip")
    exported = run_cli("export", str(run_dir), "--out", str(tmp_path / "export"))
    assert exported.returncode == 2 and f"{damaged} does not match its checksum" in exported.stderr, (
        exported.stderr[-3000:]
    )
    assert not (tmp_path / "export").exists()
    if stage == 1:
        return  # a probe reads the weights file only
    probe = run_cli(
        "linprobe",
        "--config",
        "configs/linprobe/debug.yaml",
        f"data.train={fmnist_shards['train']}",
        f"data.val={fmnist_shards['val']}",
        f"run.dir={tmp_path / 'probe'}",
        f"init.from={run_dir}",
        *GREY,
    )
    assert probe.returncode == 2 and f"{damaged} does not match its checksum" in probe.stderr, probe.stderr[
        -3000:
    ]
