"""What a task is to the training loop. A task (pretraining, a linear probe, fine-tuning, your
own: mim.tasks) says how its model is built, the loss of a batch, the state it adds to a
checkpoint, what it records in meta.json and which callbacks (evaluation, pictures) run beside
the loop. The loop (mim.engine.loop) does everything else the same way for every task.

The order of calls, all on every rank:
`check(config)` (before any work) -> `__init__` -> `build()` -> `prepare(resume_from, settings)`
(before the engine takes the model) -> `attach(session, checkpoints)` -> `data(session)`,
`callbacks(session)` -> the loop: `loss(...)` per micro-batch, `after_step(...)` per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mim.config import ConfigError
from mim.distributed import DistEnv
from mim.engine.callbacks import Callback
from mim.engine.deepspeed_engine import EngineSettings
from mim.engine.session import Session
from mim.engine.state import CheckpointManager
from mim.meta import CheckpointMeta


class Task:
    name: ClassVar[str] = ""  # what meta.json's "stage" records; resume refuses another task's
    schema: ClassVar[type]  # the config class (mim.config) this task reads
    optimizer: ClassVar[str] = "adamw"
    # Checkpoints hold only the trained parameters: the frozen ones come back from the backbone
    # the task's meta records under backbone["reference"] (mim.weights.backbone_reference).
    trained_only: bool = False

    def __init__(self, config: Any, inputs: Any, env: DistEnv, device: torch.device) -> None:
        """`inputs`: what `check` returned."""
        self.config, self.inputs, self.env, self.device = config, inputs, env, device

    @classmethod
    def check(cls, config: Any) -> Any:
        """Everything about `config` that can be checked (and read: weights, shard lists) before
        any work; raises ConfigError. Returns the task's inputs."""
        raise NotImplementedError

    @property
    def stage(self) -> str:
        return self.name or getattr(type(self), "registered_name", type(self).__name__)

    def build(self) -> tuple[nn.Module, list[dict]]:
        """The model and its optimizer's param groups."""
        raise NotImplementedError

    def samples_per_epoch(self) -> int:
        return self.config.data.samples_per_epoch or self.inputs.shards.num_usable

    def prepare(self, resume_from: Path | None, settings: EngineSettings) -> None:
        """Before the engine takes the model: fresh weights to load, checks against the resolved
        engine settings."""

    def check_resumable(self, meta: CheckpointMeta, path: Path) -> None:
        """Raises ConfigError where the checkpoint at `path` cannot continue this run (by default:
        one another task wrote)."""
        if meta.stage != self.stage:
            raise ConfigError(
                f"cannot resume from {path}: it was written by stage {meta.stage!r}, "
                f"this is {self.stage!r}; use a new run.dir"
            )

    def attach(self, session: Session, checkpoints: CheckpointManager) -> None:
        """The engine exists: register state parts with `checkpoints`."""

    def data(self, session: Session) -> Any:
        """The training data source (mim.engine.data.StreamData or one like it)."""
        raise NotImplementedError

    def callbacks(self, session: Session) -> list[Callback]:
        return []

    def loss(
        self, engine: Any, inputs: torch.Tensor, labels: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        """The loss of micro-batch `micro` of optimizer step `step` (0-based: the step being run)."""
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step, before the callbacks (an EMA teacher follows the student)."""

    def describe_loss(self, loss: float, micro_losses: int, report) -> str:
        """The loss as the step's log line shows it; `micro_losses`: micro-batches over all ranks;
        `report(scalars)` adds scalars of its own."""
        return f"loss {loss:.4f}"

    def meta(self) -> dict[str, Any]:
        """What meta.json records of the task (beside the run's keys)."""
        return {}

    def summary(self) -> str:
        """A line for the end of the run ("" for none)."""
        return ""
