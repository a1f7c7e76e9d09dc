"""Each config key is declared once (mim.config): its checks, the stage that reads it, its
default per stage, `--help-config` and docs/config.md all follow from that declaration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mim.config import (
    SCHEMAS,
    STAGES,
    ConfigError,
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    load_config,
    load_yaml_chain,
    stage_keys,
    to_tree,
    write_config,
)
from mim.config.loading import dotted
from mim.config_help import markdown_page
from pipelines import cli

REPO = Path(__file__).resolve().parents[2]
ALL_KEYS = [(stage, info) for stage in STAGES for info in stage_keys(stage)]



def _outside(bounds: str) -> float:
    """A number just outside `bounds` (the declaration's own notation)."""
    if match := re.match(r"^(>=|>)\s*(\S+)$", bounds):
        limit = float(match.group(2))
        return limit - 1 if match.group(1) == ">=" else limit
    opening, low, high, closing = re.match(r"^([\[(])(\S+),\s*(\S+)([\])])$", bounds).groups()
    return float(high) if closing == ")" else float(high) + 1


def test_every_key_has_a_description():
    undescribed = [f"{stage}: {info.name}" for stage, info in ALL_KEYS if len(info.declared.doc) < 10]
    assert not undescribed


@pytest.mark.parametrize(
    "stage, info",
    [(s, i) for s, i in ALL_KEYS if i.declared.bounds],
    ids=[f"{s}:{i.name}" for s, i in ALL_KEYS if i.declared.bounds],
)
def test_a_value_outside_a_keys_declared_range_fails_as_the_config_is_read(stage, info):
    bad = _outside(info.declared.bounds)
    value = f"[{bad}, {bad}]" if info.type.startswith("list") else (int(bad) if "int" in info.type else bad)
    with pytest.raises(
        ConfigError, match=rf"'{re.escape(info.name)}' must be {re.escape(info.declared.bounds)}"
    ):
        load_config(SCHEMAS[stage], None, [f"{info.name}={value}"])


@pytest.mark.parametrize(
    "stage, info",
    [(s, i) for s, i in ALL_KEYS if i.choices],
    ids=[f"{s}:{i.name}" for s, i in ALL_KEYS if i.choices],
)
def test_a_value_outside_a_keys_choices_fails_as_the_config_is_read(stage, info):
    bad = 7 if info.type.startswith("int") else "nonsense"
    with pytest.raises(ConfigError, match=rf"'{re.escape(info.name)}' must be one of"):
        load_config(SCHEMAS[stage], None, [f"{info.name}={bad}"])


@pytest.mark.parametrize(
    "stage, override, readers",
    [
        ("pretrain", "data.val=/shards/val", "mim linprobe, mim finetune, mim segprobe"),
        ("linprobe", "log.recon_every=10", "mim pretrain"),
        ("finetune", "log.recon_every=10", "mim pretrain"),
        ("finetune", "probe.blrs=[0.1]", "mim linprobe"),
        ("linprobe", "augment.mixup=0.5", "mim finetune"),
        ("linprobe", "optim.layer_decay=0.7", "mim finetune"),
        ("linprobe", "model.drop_path=0.1", "mim finetune"),
        ("linprobe", "optim.blr=0.1", "mim pretrain, mim finetune, mim segprobe"),  # the probe's lrs are probe.blrs
    ],
)
def test_a_key_the_stage_does_not_read_is_an_error(stage, override, readers):
    key = override.split("=")[0].removesuffix(".blrs")  # probe: the whole section
    with pytest.raises(
        ConfigError, match=rf"'{re.escape(key)}' is not read by mim {stage} \(only by {readers}\)"
    ):
        load_config(SCHEMAS[stage], None, [override])


@pytest.mark.parametrize("stage", STAGES)
def test_the_dead_key_run_on_nonfinite_is_gone(stage):
    with pytest.raises(ConfigError, match="unknown config key 'run.on_nonfinite'"):
        load_config(SCHEMAS[stage], None, ["run.on_nonfinite=skip"])


@pytest.mark.parametrize("stage", ["linprobe", "finetune"])
@pytest.mark.parametrize(
    "key", ["run.checkpoint_every", "run.keep_last", "run.stop_check_every", "log.every"]
)
def test_evaluation_stages_check_the_loops_cadences(stage, key):
    with pytest.raises(ConfigError, match=rf"'{key}' must be >= 1, got 0"):
        load_config(SCHEMAS[stage], None, [f"{key}=0"])


def test_each_stage_defaults_to_the_papers_protocol():
    probe, tune, pre = (load_config(s, None, []) for s in (LinprobeConfig, FinetuneConfig, PretrainConfig))
    assert (probe.optim.optimizer, probe.model.global_pool, probe.deepspeed.zero_stage) == (
        "lars",
        "token",
        0,
    )
    assert (probe.data.batch_size, probe.schedule.epochs, probe.optim.weight_decay) == (512, 90, 0.0)
    assert (tune.optim.optimizer, tune.model.global_pool, tune.optim.layer_decay) == ("adamw", "avg", 0.65)
    assert (tune.optim.blr, tune.optim.betas, tune.augment.mixup, tune.augment.label_smoothing) == (
        5e-4,
        [0.9, 0.999],
        0.8,
        0.1,
    )
    assert (pre.optim.blr, pre.optim.betas, pre.model.mask_ratio, pre.model.norm_pix_loss) == (
        1.5e-4,
        [0.9, 0.95],
        0.75,
        True,
    )
    assert probe.data.crop_scale == [0.08, 1.0] and pre.data.crop_scale == [0.2, 1.0]


@pytest.mark.parametrize("stage", STAGES)
def test_the_resolved_config_holds_the_stage_keys_and_reloads(tmp_path, stage):
    config = load_config(SCHEMAS[stage], None, ["run.seed=3"])
    write_config(config, tmp_path / "config.yaml")
    written = set(dotted(load_yaml_chain(tmp_path / "config.yaml")))
    assert written == {info.name for info in stage_keys(stage)}
    assert load_config(SCHEMAS[stage], tmp_path / "config.yaml", []) == config


RECIPES = sorted((REPO / "configs").glob("*/*.yaml"))


def _stage_of(recipe: Path) -> str:
    return recipe.stem if recipe.parent.name == "demo" else recipe.parent.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipes_load_and_say_only_what_differs_from_the_defaults(recipe):
    stage = _stage_of(recipe)
    load_config(SCHEMAS[stage], recipe, [])
    defaults = dotted(to_tree(load_config(SCHEMAS[stage], None, [])))
    repeated = {
        key: value
        for key, value in dotted(load_yaml_chain(recipe)).items()
        if key != "model.name" and defaults.get(key) == value
    }
    assert not repeated, f"{recipe} repeats the stage's defaults {repeated}"


def test_docs_config_page_is_generated_from_the_declarations():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == markdown_page(), "docs/config.md is stale: python -m mim.config_help > docs/config.md"


@pytest.mark.parametrize("stage", [*STAGES, "knn"])
def test_help_config_lists_the_keys_the_stage_reads(stage, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([stage, "--help-config"])
    assert exited.value.code == 0
    page = capsys.readouterr().out
    listed = {line.split()[0] for line in page.splitlines() if re.match(r"^  \S", line)}
    reads = {info.name for info in stage_keys("linprobe" if stage == "knn" else stage)}
    if stage == "knn":
        assert listed < reads and {n.split(".")[0] for n in listed} == {"model", "init", "data", "eval"}
    else:
        assert listed == reads
    assert "mim " + stage in page.splitlines()[0]
    for info in stage_keys("linprobe" if stage == "knn" else stage)[:3]:
        assert info.declared.doc in page
