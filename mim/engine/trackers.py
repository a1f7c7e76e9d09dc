"""Experiment trackers beside TensorBoard: Weights & Biases (log.wandb) and MLflow (log.mlflow) get
the same scalars and pictures, and the resolved config. Only rank 0 logs.

A run dir is one tracked run: the tracker's run id is kept in RUN_DIR/trackers.json, so a resume, a
Slurm requeue or a rollback continues the same tracked run. Each point carries the run's own step
(W&B: the `step` metric every other metric is plotted against), so the steps a resumed or rolled
back run does again land at their step numbers.

A tracker that fails (no network, a bad key, a server gone) is warned about once and dropped for
the rest of the process: it never stops training."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mim.config.declare import ConfigError
from mim.config.loading import dotted, to_tree
from mim.engine.callbacks import Callback
from mim.files import atomic_write_text

if TYPE_CHECKING:
    from mim.engine.loop import Loop

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"
WANDB_FLUSH_SECONDS = 2.0  # W&B writes its .wandb file this often (its default, 15 s, is lost to a kill)
EXTRAS = {"wandb": ("wandb", "mim-mae[wandb]"), "mlflow": ("mlflow", "mim-mae[mlflow]")}


def check_trackers(log_config: Any) -> None:
    """A tracker asked for whose package is not installed: a ConfigError before any work."""
    for key, (module, extra) in EXTRAS.items():
        if getattr(log_config, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"log.{key}={getattr(log_config, key)!r} needs the {module} package, which is not "
                f"installed: pip install '{extra}' (or set log.{key}= to log without it)"
            )


def wants_pictures(log_config: Any) -> bool:
    """Whether anything takes pictures: TensorBoard or a tracker."""
    return bool(log_config.tensorboard or log_config.wandb or log_config.mlflow)


def trackers(config: Any, run_dir: Path) -> list[Callback]:
    made: list[Callback] = []
    if config.log.wandb:
        made.append(WandbTracker(config, run_dir))
    if config.log.mlflow:
        made.append(MlflowTracker(config, run_dir))
    return made


class TrackerIds:
    """RUN_DIR/trackers.json: each tracker's record of the tracked run this run dir logs to."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / IDS_FILE

    def get(self, name: str) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text()).get(name, {})

    def put(self, name: str, record: dict[str, Any]) -> None:
        records = json.loads(self.path.read_text()) if self.path.is_file() else {}
        records[name] = record
        atomic_write_text(self.path, json.dumps(records, indent=2) + "\n")


class Tracker(Callback):
    """A tracker's calls, each guarded: the first failure is warned about and ends the tracker."""

    name = "tracker"

    def __init__(self, config: Any, run_dir: Path) -> None:
        self.config, self.run_dir, self.ids = config, Path(run_dir), TrackerIds(run_dir)
        self.live = False

    def guarded(self, what: str, call: Callable[[], Any]) -> None:
        if not self.live and what != "start":
            return
        try:
            call()
        except Exception as error:  # any: no tracker failure may stop training
            said = " ".join(str(error).split())  # one line, whatever the server answered
            log.warning(
                "%s failed to %s (%s: %s); training goes on without %s",
                self.name,
                what,
                type(error).__name__,
                said if len(said) <= 300 else said[:300] + " ...",
                self.name,
            )
            self.live = False

    def before_loop(self, loop: Loop) -> None:
        self.guarded("start", lambda: self.start(loop.task.stage))

    def on_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.guarded("log scalars", lambda: self.scalars(step, scalars))

    def on_image(self, step: int, name: str, image: torch.Tensor) -> None:
        if not self.live:
            return
        picture = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
        self.guarded("log a picture", lambda: self.picture(step, name, picture))

    def after_loop(self, loop: Loop) -> None:
        self.guarded("end the run", lambda: self.end(loop.reason == "finished"))
        self.live = False

    def start(self, stage: str) -> None:
        raise NotImplementedError

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def picture(self, step: int, name: str, picture: Any) -> None:
        raise NotImplementedError

    def end(self, finished: bool) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """A W&B run in project log.wandb, its files under RUN_DIR/wandb."""

    name = "W&B"

    def start(self, stage: str) -> None:
        import wandb

        logged, project = self.config.log, self.config.log.wandb
        record = self.ids.get("wandb")
        run_id = record.get("id") if record.get("project") == project else None
        self.run = wandb.init(
            project=project,
            entity=logged.wandb_entity or None,
            id=run_id,
            resume="allow",
            name=self.run_dir.name,
            job_type=stage,
            dir=str(self.run_dir),
            mode=logged.wandb_mode or None,
            settings=wandb.Settings(console="off", silent=True, **wandb_flush(wandb)),
        )
        self.run.config.update(to_tree(self.config), allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.ids.put("wandb", {"id": self.run.id, "project": project, "entity": logged.wandb_entity})
        self.live = True
        offline = f"offline, in {Path(self.run.dir).parent}; upload with `wandb sync`"
        where = offline if self.run.offline else self.run.url
        log.info("W&B: %s run %s (%s)", "resumed" if run_id else "new", self.run.id, where)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "step": step})

    def picture(self, step: int, name: str, picture: Any) -> None:
        import wandb

        self.run.log({name: wandb.Image(picture), "step": step})

    def end(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowTracker(Tracker):
    """An MLflow run in experiment log.mlflow_experiment on the tracking server log.mlflow."""

    name = "MLflow"

    def start(self, stage: str) -> None:
        from mlflow import MlflowClient

        uri, experiment = self.config.log.mlflow, self.config.log.mlflow_experiment
        self.client = client = MlflowClient(uri)
        record = self.ids.get("mlflow")
        self.run_id = record.get("run_id") if record.get("uri") == uri else None
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            tags = {"mim.stage": stage, "mim.run_dir": str(self.run_dir)}
            self.run_id = client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags).info.run_id
            self.log_params(to_tree(self.config))
            self.ids.put("mlflow", {"run_id": self.run_id, "uri": uri, "experiment": experiment})
        client.log_dict(self.run_id, to_tree(self.config), "config.yaml")  # as this start resolved it
        self.live = True
        log.info(
            "MLflow: %s run %s in experiment %r at %s",
            "resumed" if record else "new",
            self.run_id,
            experiment,
            uri,
        )

    def log_params(self, tree: dict[str, Any]) -> None:
        """The config's keys as the run's params (logged once: MLflow refuses a param's new value;
        a resumed run's config, changed or not, is its config.yaml artifact)."""
        from mlflow.entities import Param

        flat = [Param(name, str(value)[:500]) for name, value in dotted(tree).items()]
        for start in range(0, len(flat), 100):  # MLflow's most params per batch
            self.client.log_batch(self.run_id, params=flat[start : start + 100])

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for name, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def picture(self, step: int, name: str, picture: Any) -> None:
        self.client.log_image(self.run_id, picture, key=name, step=step)

    def end(self, finished: bool) -> None:
        if finished:  # a stopped run stays RUNNING: its requeued job goes on with it
            self.client.set_terminated(self.run_id, "FINISHED")


def wandb_flush(wandb: Any) -> dict[str, float]:
    """The setting that has W&B write its run file every WANDB_FLUSH_SECONDS, where this W&B has it."""
    name = "x_transaction_log_flush_interval"
    return {name: WANDB_FLUSH_SECONDS} if name in getattr(wandb.Settings, "model_fields", {}) else {}
