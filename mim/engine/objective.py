"""The pretraining objective (`target.*`): the target kind (mim.models.target_kinds: what the
decoder predicts at the masked patches) and, with `target.global_weight`, what the cls token
predicts. Computes the step's targets without gradients before the student's forward, steps the
EMA teacher after every optimizer step, and owns the teacher's state in a checkpoint (the EMA's;
a frozen teacher is never saved).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mim.models.arch import MaeArch
from mim.models.backbone import Weights
from mim.models.mae import MaskedAutoencoderViT
from mim.models.target_kinds import TARGETS, Teachers
from mim.models.teachers import EmaTeacher, FrozenTeacher, ema_decay

log = logging.getLogger(__name__)
TEACHER_STATE = "teacher"  # the checkpoint's name for the EMA teacher's tensors


class Objective:
    def __init__(
        self, target: Any, arch: MaeArch, teacher: Weights | None, device: torch.device, bf16: bool
    ) -> None:
        """`teacher`: the weights target.teacher names, loaded (and checked) before any work."""
        self.config, self.arch, self.device, self.bf16 = target, arch, device, bf16
        self.kind = target.kind
        self.target = TARGETS.get(target.kind)(target, arch)
        self.loss = self.target.default_loss if target.loss == "auto" else target.loss
        self.top_k = min(target.ema_top_k, arch["depth"])
        self.frozen = None
        if teacher is not None:
            self.frozen = FrozenTeacher(teacher).to(device)
        self.uses_ema = self.target.follows_student or (target.global_weight > 0 and self.frozen is None)
        self.ema: EmaTeacher | None = None  # made by `attach`, once the student has its weights

    # ------------------------------------------------------------------ the student's shape

    @property
    def pred_dim(self) -> int | None:
        """The decoder's output width; None: pixels, the model's own."""
        return self.target.pred_dim(self.frozen.dim if self.frozen is not None else None)

    @property
    def global_dim(self) -> int | None:
        if self.config.global_weight <= 0:
            return None
        return self.frozen.dim if self.frozen is not None else self.arch["embed_dim"]

    def attach(self, student: MaskedAutoencoderViT) -> None:
        """Starts the EMA teacher from the student's current weights (a resume then loads its own)."""
        if self.uses_ema:
            self.ema = EmaTeacher(student).to(self.device)

    # ------------------------------------------------------------------ per step

    def step_inputs(self, images: torch.Tensor) -> dict[str, Any]:
        """The student's forward arguments besides images, mask ratio and noise (none for pixels
        without the global objective: the model's own MAE loss)."""
        if self.target.predicts_pixels and self.config.global_weight <= 0:
            return {}
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            inputs: dict[str, Any] = {"loss": self.loss}
            frozen = self.frozen(images) if self.frozen is not None else None
            ema = self.ema(images, self.top_k) if self.ema is not None else None
            predicted = self.target.compute(images, Teachers(frozen, ema))
            if predicted is not None:
                inputs["target"] = predicted
            if self.config.global_weight > 0:
                inputs["global_target"] = (frozen if frozen is not None else ema)[0].float()
                inputs["global_weight"] = self.config.global_weight
        return inputs

    def after_step(self, step: int, total_steps: int) -> None:
        if self.ema is not None:
            self.ema.update(ema_decay(step, total_steps, self.config.ema_decay, self.config.ema_end_decay))

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint keeps of the objective: the EMA teacher (a frozen one is a file the
        config names; it is never copied into the student's checkpoint)."""
        if self.ema is None:
            return {}
        return {
            TEACHER_STATE: {
                k: v.detach().float().cpu().contiguous() for k, v in self.ema.state_dict().items()
            }
        }

    def load_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.ema is None:
            return
        if TEACHER_STATE not in states:
            raise ValueError("the checkpoint holds no EMA teacher")
        self.ema.load_state_dict(states[TEACHER_STATE])

    def describe(self) -> dict[str, Any]:
        """The objective as meta.json records it (resume refuses another one)."""
        description = {"kind": self.kind, "loss": self.loss, "global_weight": self.config.global_weight}
        description.update(self.target.describe())
        if self.uses_ema:
            description.update(
                ema_decay=self.config.ema_decay, ema_end_decay=self.config.ema_end_decay, ema_top_k=self.top_k
            )
        if self.frozen is not None:
            description["teacher"] = self.frozen.source
        return description
