"""The model card's parts that need no export: names without machine paths, the shape as a title,
evaluation runs read from their metrics.json (or refused clearly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mim.errors import UserInputError
from mim.model_card import data_name, read_results, run_name, shape_name
from mim.models import model_args


@pytest.mark.parametrize(
    "train, name",
    [
        ("/data/corpora/in1k/train", "train"),
        ("/data/in1k/train/", "train"),
        ("/data/in1k/shards/train-{000000..001023}.tar", "shards"),
        ("https://host/in1k/train/_info.json", "train"),
        ("s3://bucket/in1k::aws s3 cp", "in1k"),
        (None, "unknown"),
    ],
)
def test_the_data_is_named_by_its_folder_not_its_path(train, name):
    assert data_name(train) == name


def test_a_checkpoint_is_named_within_its_run():
    assert run_name(Path("/home/me/runs/b16/checkpoints/step-00001000")) == "b16/checkpoints/step-00001000"
    assert run_name(Path("/home/me/exports/b16")) == "b16"


def test_the_title_is_the_models_shape():
    arch = model_args("mae_vit_base_patch16", in_chans=1, qk_norm=True)
    assert shape_name(arch) == (
        "ViT, 768 wide, 12 blocks, 12 heads, 16 px patches at 224 px, 1 channel, query/key norm"
    )


def test_evaluation_runs_give_their_data_val_figure_or_a_clear_error(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "metrics.json").write_text(
        json.dumps({"stage": "segprobe", "test": {"miou": 22.444, "num_samples": 9}})
    )
    (probe / "config.yaml").write_text("data:\n  val: /data/scenes/val\n")
    [result] = read_results([probe])
    assert (result["name"], result["value"], result["dataset"], result["run"]) == (
        "Segmentation probe",
        22.44,
        "val",
        "probe",
    )
    with pytest.raises(UserInputError, match="no metrics.json there"):
        read_results([tmp_path / "nowhere"])
    (probe / "metrics.json").write_text(json.dumps({"stage": "pretrain"}))
    with pytest.raises(UserInputError, match="holds no data.val figure"):
        read_results([probe])
