"""meta.json as a type (mim.meta.CheckpointMeta): version 1 (before the version key) reads with
what it lacks derived, and what mim writes reads back to the same."""

from __future__ import annotations

import json

import pytest

from mim.errors import UserInputError
from mim.meta import META_VERSION, CheckpointMeta
from tests.conftest import REPO

V1 = REPO / "tests/fixtures/v1-pretrain-ema/step-00000004/meta.json"


def test_a_version_1_meta_reads_with_its_architecture_and_stage():
    meta = CheckpointMeta.from_json(json.loads(V1.read_text()))
    assert meta.meta_version == 1 and meta.stage == "pretrain" and meta.step == 4
    assert meta.zero_stage == 0 and meta.world_size == 1 and meta.effective_batch == 8
    assert meta.holds_mae and meta.target["kind"] == "ema"
    arch, pool = meta.architecture()
    assert arch["embed_dim"] == 32 and arch["img_size"] == 28 and pool == "token"
    assert "git_sha" in meta.extra and "norm_pix_loss" in meta.extra


def test_what_mim_writes_reads_back_the_same():
    written = CheckpointMeta.from_json(json.loads(V1.read_text())).replace(meta_version=META_VERSION)
    by_save = {k: written.extra[k] for k in ("versions", "git_sha", "integrity")}  # the writer adds these
    tree = dict(written.to_json(), step=written.step, **by_save)
    assert CheckpointMeta.from_json(tree) == written


def test_before_effective_batch_it_is_derived_from_the_config_and_processes():
    tree = {
        "stage": "pretrain",
        "world_size": 4,
        "config": {"data": {"batch_size": 8}, "optim": {"accum_steps": 2}},
    }
    meta = CheckpointMeta.from_json(tree)
    assert meta.effective_batch == 64 and meta.zero_stage == 1


def test_a_classifier_meta_gives_its_backbone_and_one_without_either_is_refused():
    arch = {"img_size": 28, "patch_size": 7}
    classifier = CheckpointMeta.from_json(
        {"stage": "finetune", "backbone": {"arch": arch}, "global_pool": "avg"}
    )
    assert not classifier.holds_mae and classifier.architecture() == ({**arch, "qk_norm": False}, "avg")
    with pytest.raises(UserInputError, match="records no backbone architecture"):
        CheckpointMeta.from_json({"stage": "my_lab.tasks:Rotation"}).architecture()
