"""Config tree: YAML base chains, dotted overrides, checks before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mim.config import ConfigError, PretrainConfig, load_config, write_config
from mim.engine.deepspeed_engine import EngineSettings, choose_zero_stage, deepspeed_config, model_state_bytes
from mim.recipe import check_pretrain, make_plan

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_base_chain_and_overrides_merge(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: {name: mae_vit_debug, mask_ratio: 0.6}\ndata: {batch_size: 4}\n"
    )
    (tmp_path / "delta.yaml").write_text("base: base.yaml\ndata: {batch_size: 16}\n")
    config = load_config(PretrainConfig, tmp_path / "delta.yaml", ["optim.betas=[0.9, 0.99]", "run.dir=/x"])
    assert config.model.name == "mae_vit_debug" and config.model.mask_ratio == 0.6
    assert config.data.batch_size == 16
    assert config.optim.betas == [0.9, 0.99] and config.run.dir == "/x"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    assert isinstance(load_config(PretrainConfig, recipe, []), PretrainConfig)


def test_paper_recipe_values():
    config = load_config(PretrainConfig, REPO / "configs/pretrain/mae_vit_large_p16.yaml", [])
    assert (config.optim.blr, config.model.mask_ratio, config.model.norm_pix_loss) == (1.5e-4, 0.75, True)
    assert (config.schedule.epochs, config.schedule.warmup_epochs, config.deepspeed.zero_stage) == (
        800,
        40,
        "auto",
    )
    assert config.optim.betas == [0.9, 0.95] and config.optim.weight_decay == 0.05


def test_settings_that_take_a_word_or_a_value_keep_the_type_written():
    config = load_config(PretrainConfig, None, ["deepspeed.zero_stage=1", "deepspeed.compile=true"])
    assert config.deepspeed.zero_stage == 1 and config.deepspeed.compile is True
    config = load_config(PretrainConfig, None, ["deepspeed.zero_stage=auto", "deepspeed.compile=auto"])
    assert config.deepspeed.zero_stage == "auto" and config.deepspeed.compile == "auto"


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.batchsize'; did you mean 'data.batch_size'"
    ):
        load_config(PretrainConfig, None, ["data.batchsize=3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(PretrainConfig, None, ["modle.name=x"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=abc", "expects int"),
        ("data.batch_size=2.5", "expects int"),
        ("optim.blr=fast", "expects float"),
        ("data.hflip=3", "expects true or false"),
        ("optim.betas=0.9", "expects a list"),
        ("model=3", "must be a section"),
        ("novalue", "not of the form"),
    ],
)
def test_wrong_types_fail_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [override])


def test_integers_and_exponents_without_a_dot_are_accepted_as_floats():
    assert load_config(PretrainConfig, None, ["optim.blr=1"]).optim.blr == 1.0
    # YAML 1.1 reads 2e-3 as a string; it is still the float users meant
    assert load_config(PretrainConfig, None, ["optim.blr=2e-3"]).optim.blr == 2e-3
    assert load_config(PretrainConfig, None, ["data.crop_scale=[5e-1, 1]"]).data.crop_scale == [0.5, 1.0]


@pytest.mark.parametrize(("written", "meant"), [("true", 1), ("false", 0), ("2", 2), ("1", 1)])
def test_grad_checkpointing_takes_timm_and_hf_spelling_true_and_false(written, meant):
    config = load_config(PretrainConfig, None, [f"model.grad_checkpointing={written}"])
    assert config.model.grad_checkpointing == meant and type(config.model.grad_checkpointing) is int


def test_grad_checkpointing_refuses_other_words_and_negatives():
    with pytest.raises(ConfigError, match="'model.grad_checkpointing' expects int, got 'every'"):
        load_config(PretrainConfig, None, ["model.grad_checkpointing=every"])
    with pytest.raises(ConfigError, match="'model.grad_checkpointing' must be >= 0, got -1"):
        load_config(PretrainConfig, None, ["model.grad_checkpointing=-1"])


def test_missing_or_cyclic_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "nope.yaml", [])
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(PretrainConfig, tmp_path / "a.yaml", [])


def _checked(tmp_path, *overrides, shards=None):
    base = [f"data.train={shards}", f"run.dir={tmp_path / 'run'}", "model.name=mae_vit_debug"]
    return check_pretrain(load_config(PretrainConfig, None, base + list(overrides)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.img_size=30", "not a multiple of model.patch_size"),
        ("model.mask_ratio=1.0", r"'model.mask_ratio' must be \(0, 1\), got 1.0"),
        ("model.mask_ratio=0", r"'model.mask_ratio' must be \(0, 1\), got 0"),
        ("model.name=mae_vit_nope", "unknown model"),
        ("model.num_heads=3", "not divisible by model.num_heads"),
        ("data.crop_scale=[0.5, 0.2]", "crop_scale"),
        ("schedule.warmup_epochs=900", "warmup_epochs"),
        ("deepspeed.zero_stage=4", "'deepspeed.zero_stage' must be one of 0, 1, 2, 3, auto, got 4"),
        ("deepspeed.zero_stage=[1]", "zero_stage"),
        ("deepspeed.precision=fp8", "precision"),
        (
            "deepspeed.compile=sometimes",
            "'deepspeed.compile' must be one of true, false, auto, got sometimes",
        ),
    ],
)
def test_impossible_combinations_fail_before_work(tmp_path, jpeg_shards, override, message):
    with pytest.raises(ConfigError, match=message):
        _checked(tmp_path, override, shards=jpeg_shards)
    assert not (tmp_path / "run").exists()


def test_missing_shards_and_bad_run_dir(tmp_path, jpeg_shards):
    with pytest.raises(ConfigError, match="data.train: .*missing"):
        _checked(tmp_path, shards=tmp_path / "train-{000000..000003}.tar")
    with pytest.raises(
        ConfigError, match=r"holds no index \(_info.json, info.json, sizes.json\) and no .tar files"
    ):
        (tmp_path / "empty").mkdir()
        _checked(tmp_path, shards=tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_pretrain(
            load_config(
                PretrainConfig,
                None,
                [f"data.train={jpeg_shards}", f"run.dir={tmp_path / 'file'}", "model.name=mae_vit_debug"],
            )
        )


def test_plan_derives_lr_and_steps_once():
    config = load_config(
        PretrainConfig,
        None,
        ["data.batch_size=64", "optim.accum_steps=2", "schedule.epochs=10", "schedule.warmup_epochs=1"],
    )
    plan = make_plan(config.optim, config.schedule, 64, world_size=32, samples_per_epoch=1281167)
    assert plan.effective_batch == 4096
    assert plan.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert plan.steps_per_epoch == 1281167 // 4096
    assert plan.total_steps == 10 * plan.steps_per_epoch and plan.warmup_steps == plan.steps_per_epoch


def test_resolved_config_round_trips(tmp_path):
    config = load_config(PretrainConfig, REPO / "configs/pretrain/debug.yaml", ["run.seed=7"])
    write_config(config, tmp_path / "config.yaml")
    assert load_config(PretrainConfig, tmp_path / "config.yaml", []) == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["init"] == {"from": ""}


GB = 10**9


@pytest.mark.parametrize(
    "num_params, world_size, device_memory, expected",
    [
        (632_000_000, 8, 80 * GB, 0),  # ViT-H: 10 GB of fp32 weights, gradients and AdamW state
        (632_000_000, 1, 8 * GB, 0),  # one process: nothing to partition
        (2_600_000_000, 8, 80 * GB, 1),  # 41.6 GB at stage 0, 24.7 GB at stage 1
        (7_000_000_000, 64, 80 * GB, 2),  # 57.3 GB at stage 1, 29.8 GB at stage 2
        (7_000_000_000, 2, 80 * GB, 3),  # 84 GB at stage 2: stage 3 (70 GB), which fits nowhere either
    ],
)
def test_zero_stage_auto_is_the_lowest_stage_whose_model_states_fit(
    num_params, world_size, device_memory, expected
):
    assert choose_zero_stage(num_params, world_size, device_memory) == expected
    settings = EngineSettings(
        8, 1, world_size, "auto", "fp32", None, num_params=num_params, device_memory=device_memory
    )
    assert settings.resolved_zero_stage == expected
    assert deepspeed_config(settings)["zero_optimization"]["stage"] == expected
    assert EngineSettings(8, 1, world_size, 1, "fp32", None, num_params=num_params).resolved_zero_stage == 1


def test_model_state_bytes_per_stage():
    assert model_state_bytes(10, 2, 0) == 160  # 4 + 4 + 8 bytes a parameter
    # weights and gradients whole, and the partition of the gradients the step reads; fp32 copy + moments halved
    assert model_state_bytes(10, 2, 1) == 40 + 60 + 60
    assert model_state_bytes(10, 2, 2) == 40 + 80
    assert model_state_bytes(10, 2, 3) == 100  # everything partitioned: (4 + 4 + 4 + 8) / 2
    assert model_state_bytes(10, 2, 0, "lars") == 120
