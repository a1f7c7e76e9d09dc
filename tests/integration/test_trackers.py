"""W&B (offline mode, its real .wandb files read back) and MLflow (a real local file store) beside
TensorBoard: one run killed with SIGKILL mid-way and resumed is one tracked run in each, its steps
continuous, its scalars TensorBoard's; a tracker that fails warns once and training goes on; a
tracker whose package is missing is refused before any work."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import checkpoint
from mim.engine.trackers import WANDB_FLUSH_SECONDS
from tests.conftest import REPO, cli_env, run_cli
from tests.http_server import FlakyServer
from tests.integration.test_faults import args as pretrain_args
from tests.integration.test_faults import start, wait_for

pytestmark = pytest.mark.slow

STORE_ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_SILENT": "true"}  # MLflow 3 asks for it on file stores
COMMON = (
    "schedule.epochs=4",
    "run.checkpoint_every=4",
    "log.every=2",
    "log.recon_every=8",
    "run.hang_timeout=0",
)


# ----------------------------------------------------------------------------- reading W&B's files


def wandb_records(path):
    """The protobuf records of a .wandb file (W&B's append-only log: a 7-byte header, then 32 KiB
    blocks of records, each a 7-byte header of checksum, length and kind, split across blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    block, position, pieces = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # the block's padding
            position += left
            continue
        piece = data[position + 7 : position + 7 + length]
        position += 7 + length
        pieces = piece if kind in (1, 2) else pieces + piece  # full, first | middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def wandb_run(run_dir):
    """(run ids, config keys, {step: {name: value}}) of every .wandb file under RUN_DIR/wandb."""
    ids, config, history = set(), set(), {}
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config |= {item.key for item in record.run.config.update}
            elif kind == "config":
                config |= {item.key for item in record.config.update}
            elif kind == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                history.setdefault(items.pop("step"), {}).update(items)
    return files, ids, config, history


def tensorboard_scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# ----------------------------------------------------------------------------- the tests


def test_a_killed_and_resumed_run_is_one_tracked_run_in_wandb_and_mlflow(
    tmp_path, fmnist_shards, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test's reader of the store

    run, store = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    trackers = (
        "log.wandb=mim-tests",
        "log.wandb_mode=offline",
        f"log.mlflow={store}",
        "log.mlflow_experiment=tests",
    )
    overrides = (*COMMON, *trackers, "data.num_workers=0")
    # hangs in step 11, once steps up to 10 are logged and step 8's checkpoint is written; killed
    # there, once W&B has had the time to write its file (mim.engine.trackers.WANDB_FLUSH_SECONDS)
    process = start(run, fmnist_shards["train"], *overrides, **STORE_ENV, MIM_FAULT="hang@11")
    wait_for(lambda: list((run / "faults").glob("rank-*.json")), interval=0.05)
    time.sleep(2 * WANDB_FLUSH_SECONDS)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.latest_checkpoint(run).name == "step-00000008"
    resumed = run_cli(*pretrain_args(run, fmnist_shards["train"], *overrides), **STORE_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "failed to" not in resumed.stderr
    ids = json.loads((run / "trackers.json").read_text())
    tensorboard = tensorboard_scalars(run)
    log_steps = set(range(2, 33, 2))
    assert set(tensorboard["train/loss"]) == log_steps

    files, wandb_ids, config, history = wandb_run(run)
    assert len(files) == 2 and wandb_ids == {ids["wandb"]["id"]}  # two processes, one run
    assert {"model", "optim", "schedule", "run"} <= config
    assert log_steps <= set(history)  # every logged step, across the kill
    for tag, points in tensorboard.items():
        for step, value in points.items():  # the resumed process's values where it re-ran a step
            assert history[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)
    pictures = [values for values in history.values() if "reconstructions/_type" in values]
    assert pictures and all(values["reconstructions/_type"] == "image-file" for values in pictures)

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]  # one run, resumed
    tracked = runs[0]
    assert tracked.info.status == "FINISHED" and tracked.data.params["model.name"] == "mae_vit_debug"
    for tag, points in tensorboard.items():
        logged = {m.step: m.value for m in client.get_metric_history(tracked.info.run_id, tag)}
        assert set(logged) == set(points), tag
        assert all(logged[step] == pytest.approx(value, rel=1e-6) for step, value in points.items()), tag
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert "config.yaml" in artifacts and "images" in artifacts


def test_trackers_that_fail_warn_once_and_training_goes_on(tmp_path, fmnist_shards):
    """W&B online with no API key against a server that is not W&B, MLflow at a server that is
    not MLflow: each warns once, and the run finishes as it would without them."""
    with FlakyServer(tmp_path / "empty") as server:
        (tmp_path / "empty").mkdir()
        run = tmp_path / "run"
        result = run_cli(
            *pretrain_args(
                run,
                fmnist_shards["train"],
                *COMMON,
                "log.wandb=mim-tests",
                "log.wandb_mode=online",
                f"log.mlflow={server.url}",
            ),
            WANDB_BASE_URL=server.url,
            WANDB_API_KEY="",
            HOME=str(tmp_path),  # no ~/.netrc key
        )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "training goes on without" in line]
    assert len(warnings) == 2 and any("W&B failed to start" in w for w in warnings), warnings
    assert any("MLflow failed to start" in w for w in warnings), warnings
    assert checkpoint.latest_checkpoint(run).name == "step-00000032"
    assert (
        "mlflow" not in json.loads((run / "trackers.json").read_text())
        if (run / "trackers.json").exists()
        else True
    )


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(tmp_path, package):
    """The package hidden as a missing one is (sys.modules[name] = None: import fails, find_spec
    finds nothing)."""
    run = tmp_path / "run"
    code = (
        f"import sys; sys.modules[{package!r}] = None; from pipelines.cli import main; "
        f"sys.argv = ['mim', *sys.argv[1:]]; sys.exit(main())"
    )
    value = "mim-tests" if package == "wandb" else "http://127.0.0.1:9"
    result = subprocess.run(
        [sys.executable, "-c", code, *pretrain_args(run, tmp_path / "no-shards", f"log.{package}={value}")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"log.{package}=" in result.stderr and f"pip install 'mim-mae[{package}]'" in result.stderr
    assert not run.exists()
