"""A checkpoint's meta.json as a type: what wrote it (the task, on how many processes, at which
ZeRO stage), where it is (step, samples seen), what the model is, and the config it ran with.

The format is versioned (`meta_version`). Version 1 (mim before the version key) is read as it
is, with what it lacks derived the way it was then: the effective batch from the config and the
process count, the ZeRO stage it was written at from `deepspeed.zero_stage` (1 where unset).
Keys a task adds of its own (`target`, `init`, `metrics`, ...) are kept in `extra`, untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mim.errors import UserInputError
from mim.models.arch import ViTArch, read_arch

META_VERSION = 2
_WRITTEN_BY_SAVE = ("step", "versions", "git_sha", "integrity")  # added by the checkpoint writer


@dataclass
class CheckpointMeta:
    stage: str  # the task that wrote it (its registered name or plug-in path)
    config: dict[str, Any]  # the resolved config, as YAML spells it
    world_size: int = 1
    effective_batch: int = 0
    zero_stage: int = 1  # the stage its optimizer files were written at
    precision: str = "fp32"
    samples_seen: int = 0
    nodes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    last_loss: float | None = None
    model: dict[str, Any] | None = None  # pretraining: the MAE's registered name and arch
    backbone: dict[str, Any] | None = None  # a classifier: its backbone's arch and source
    # The weights files hold only the trained parameters (a parameter-efficient fine-tune); the
    # frozen ones are the backbone's that `backbone["reference"]` names and sums (mim.weights).
    trained_only: bool = False
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # mim.engine.rollback, up to this step
    extra: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    meta_version: int = META_VERSION

    # ------------------------------------------------------------------ reading and writing

    @classmethod
    def from_json(cls, tree: dict[str, Any]) -> CheckpointMeta:
        tree = dict(tree)
        version = int(tree.pop("meta_version", 1))
        config = tree.pop("config", {})
        engine = tree.pop("engine", {})
        world_size = int(tree.pop("world_size", 1))
        effective_batch = tree.pop("effective_batch", None)
        if effective_batch is None:  # version 1 before this key
            effective_batch = (
                config.get("data", {}).get("batch_size", 0)
                * config.get("optim", {}).get("accum_steps", 1)
                * world_size
            )
        configured = config.get("deepspeed", {}).get("zero_stage", 1)
        return cls(
            stage=tree.pop("stage", ""),
            config=config,
            world_size=world_size,
            effective_batch=int(effective_batch),
            zero_stage=int(engine.get("zero_stage", configured if configured != "auto" else 1)),
            precision=engine.get("precision", "fp32"),
            samples_seen=int(tree.pop("samples_seen", 0)),
            nodes=tree.pop("nodes", []),
            data=tree.pop("data", {}),
            last_loss=tree.pop("last_loss", None),
            model=tree.pop("model", None),
            backbone=tree.pop("backbone", None),
            trained_only=bool(tree.pop("trained_only", False)),
            rollbacks=tree.pop("rollbacks", []),
            step=int(tree.pop("step", 0)),
            extra=tree,
            meta_version=version,
        )

    def to_json(self) -> dict[str, Any]:
        """meta.json's tree (the writer adds step, versions, git_sha, integrity)."""
        tree: dict[str, Any] = {
            "meta_version": self.meta_version,
            "stage": self.stage,
            "config": self.config,
            "world_size": self.world_size,
            "nodes": self.nodes,
            "samples_seen": self.samples_seen,
            "effective_batch": self.effective_batch,
            "engine": {"zero_stage": self.zero_stage, "precision": self.precision},
            "data": self.data,
        }
        if self.model is not None:
            tree["model"] = self.model
        if self.backbone is not None:
            tree["backbone"] = self.backbone
        if self.trained_only:
            tree["trained_only"] = True
        if self.rollbacks:
            tree["rollbacks"] = self.rollbacks
        extra = {k: v for k, v in self.extra.items() if k not in _WRITTEN_BY_SAVE}
        return {**tree, **extra, "last_loss": self.last_loss}

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ what it says

    @property
    def holds_mae(self) -> bool:
        """A whole MAE (encoder and decoder), as pretraining writes; a classifier records its
        backbone instead."""
        return self.model is not None and "arch" in self.model

    def architecture(self) -> tuple[ViTArch, str]:
        """(the backbone's architecture, its global pool)."""
        if self.holds_mae:
            return read_arch(self.model["arch"]), "token"
        if self.backbone is None or "arch" not in self.backbone:
            raise UserInputError(
                f"this checkpoint (stage {self.stage!r}) records no backbone architecture in meta.json "
                "(neither model.arch nor backbone.arch)"
            )
        return read_arch(self.backbone["arch"]), self.extra.get("global_pool", "token")

    @property
    def target(self) -> dict[str, Any]:
        """What the decoder learnt to predict (pixels where meta.json predates targets)."""
        return self.extra.get("target", {"kind": "pixels", "loss": "mse", "global_weight": 0.0})
