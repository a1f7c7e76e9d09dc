"""The parts of self-healing on their own: the device-side loss watch (non-finite steps, spikes,
warm-up, window), the rollback record (the lr window, the skip a resumed run owes), MIM_FAULT,
and the checks of the run.* keys that relate to each other."""

from __future__ import annotations

import json

import pytest
import torch

from mim.config import ConfigError, PretrainConfig, load_config
from mim.engine.faults import Faults, parse_faults
from mim.engine.health import LossWatch
from mim.engine.rollback import Rollbacks
from mim.errors import UserInputError
from mim.meta import CheckpointMeta
from mim.recipe import check_run

CPU = torch.device("cpu")


def watch_steps(watch, losses, first_step=1):
    for step, loss in enumerate(losses, start=first_step):
        watch.record(step, torch.tensor(float(loss)), None)


def test_a_non_finite_loss_or_gradient_is_recorded_at_its_first_step():
    watch = LossWatch(CPU)
    watch_steps(watch, [1.0, 1.0])
    assert watch.anomaly() is None and watch.first_bad() == -1
    watch.record(3, torch.tensor(1.0), torch.tensor(float("inf")))
    watch.record(4, torch.tensor(float("nan")), None)
    anomaly = watch.anomaly()
    assert (anomaly.step, anomaly.cause) == (3, "non-finite") and watch.first_bad() == 3
    watch.clear()
    assert watch.anomaly() is None


def test_a_spike_is_a_loss_above_threshold_times_the_recent_mean_once_the_window_is_full():
    watch = LossWatch(CPU, threshold=2.0, window=4, checked_after=2)
    watch_steps(watch, [9.0, 9.0, 1.0, 1.0, 1.0])  # warm-up, then the window fills
    assert watch.anomaly() is None
    watch_steps(watch, [1.0, 1.9], first_step=6)  # 1.9 x a mean of (9+1+1+1)/4=3: no spike
    assert watch.anomaly() is None
    watch_steps(watch, [5.0], first_step=8)  # mean of the last 4 healthy losses: 1.225
    anomaly = watch.anomaly()
    assert (anomaly.step, anomaly.cause) == (8, "spike") and anomaly.loss == 5.0
    assert anomaly.level == pytest.approx((1.0 + 1.0 + 1.0 + 1.9) / 4)
    assert "a loss spike at step 8" in anomaly.describe()


def test_no_spike_is_looked_for_in_the_warm_up_or_before_the_window_fills():
    watch = LossWatch(CPU, threshold=2.0, window=3, checked_after=5)
    watch_steps(watch, [1.0, 50.0, 1.0, 1.0, 80.0])  # within the warm-up
    assert watch.anomaly() is None
    fresh = LossWatch(CPU, threshold=2.0, window=3, checked_after=0)
    watch_steps(fresh, [1.0, 50.0])  # two losses in a window of three
    assert fresh.anomaly() is None


def test_the_loss_history_travels_in_the_checkpoint_and_a_new_window_starts_afresh():
    watch = LossWatch(CPU, threshold=2.0, window=3)
    watch_steps(watch, [1.0, 1.0, 1.0])
    resumed = LossWatch(CPU, threshold=2.0, window=3)
    resumed.load_state_dict(watch.state_dict())
    watch_steps(resumed, [5.0], first_step=4)
    assert resumed.anomaly().cause == "spike"
    other = LossWatch(CPU, threshold=2.0, window=5)
    other.load_state_dict(watch.state_dict())
    watch_steps(other, [5.0], first_step=4)
    assert other.anomaly() is None


def record(number, restored, skipped, total, lr_steps=0):
    return {
        "rollback": number,
        "restored_step": restored,
        "skipped_steps": skipped,
        "skipped_total": total,
        "lr_scale": 0.5,
        "lr_steps": lr_steps,
    }


def test_a_resumed_run_owes_the_skip_of_rollbacks_recorded_after_its_checkpoint(tmp_path):
    first, second = record(1, 40, 14, 14), record(2, 40, 30, 44)
    (tmp_path / "rollbacks.json").write_text(json.dumps({"rollbacks": [first, second]}))
    rollbacks = Rollbacks(tmp_path, is_main=False)
    written_before = CheckpointMeta(stage="pretrain", config={}, step=40)
    assert rollbacks.pending_skip(written_before) == 44  # both restored it: the later one counts all
    after_the_first = CheckpointMeta(stage="pretrain", config={}, step=40, rollbacks=[first])
    assert rollbacks.pending_skip(after_the_first) == 30
    later = CheckpointMeta(stage="pretrain", config={}, step=48, rollbacks=[first, second])
    assert rollbacks.pending_skip(later) == 0
    assert rollbacks.skipped_total == 44


def test_the_lr_is_scaled_for_the_steps_after_a_restored_one(tmp_path):
    rollbacks = Rollbacks(tmp_path, is_main=True)
    rollbacks.add(record(1, 40, 14, 14, lr_steps=10))
    assert [rollbacks.lr_scale(step, 0.5) for step in (40, 41, 50, 51)] == [1.0, 0.5, 0.5, 1.0]
    assert json.loads((tmp_path / "rollbacks.json").read_text())["rollbacks"][0]["rollback"] == 1


def test_fault_specs_are_read_or_refused_clearly():
    faults = parse_faults("nan@40, spike@12:rank1,hang@3")
    assert [(f.kind, f.step, f.rank) for f in faults] == [
        ("nan", 40, None),
        ("spike", 12, 1),
        ("hang", 3, None),
    ]
    assert parse_faults("") == []
    for bad in ("nan", "melt@3", "nan@0", "nan@3:node1"):
        with pytest.raises(UserInputError, match="KIND@STEP"):
            parse_faults(bad)


def test_each_fault_fires_once_in_a_run_even_across_restarts(tmp_path):
    loss = torch.tensor(2.0)
    faults = Faults(parse_faults("nan@3,nan@3,spike@4:rank1"), tmp_path, rank=0)
    assert faults.loss(2, 0, loss) is loss and faults.loss(3, 1, loss) is loss  # other steps, micro-batches
    assert faults.loss(3, 0, loss).isnan() and faults.loss(3, 0, loss).isnan()
    assert faults.loss(3, 0, loss) is loss  # both fired
    assert faults.loss(4, 0, loss) is loss  # rank 1's
    restarted = Faults(parse_faults("nan@3,nan@3,spike@4:rank1"), tmp_path, rank=0)
    assert restarted.loss(3, 0, loss) is loss
    assert Faults(parse_faults("spike@4:rank1"), tmp_path / "other", rank=1).loss(4, 0, loss) == 2.0 * 50


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.spike_threshold=0.5"], "run.spike_threshold must be 0 (off) or above 1"),
        (["run.hang_timeout=1"], "run.hang_timeout must be 0 (off) or at least 5 seconds"),
        (["run.keep_last=1"], "run.on_divergence=rollback needs run.keep_last >= 2"),
    ],
)
def test_self_healing_keys_that_cannot_work_are_refused(tmp_path, overrides, message):
    config = load_config(PretrainConfig, None, [f"run.dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_run(config.run)


def test_keep_last_one_is_fine_when_divergence_stops(tmp_path):
    config = load_config(
        PretrainConfig,
        None,
        [f"run.dir={tmp_path}", "run.keep_last=1", "run.on_divergence=stop", "run.hang_timeout=0"],
    )
    assert check_run(config.run) == tmp_path


def test_spikes_are_watched_in_pretraining_and_off_by_default_in_the_classifier_stages(tmp_path):
    from mim.config import SCHEMAS

    thresholds = {stage: load_config(schema, None, []).run.spike_threshold for stage, schema in SCHEMAS.items()}
    assert thresholds["pretrain"] == 2.0
    assert thresholds["linprobe"] == thresholds["finetune"] == thresholds["segprobe"] == 0.0
