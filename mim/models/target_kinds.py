"""The kinds of target a masked-modeling decoder learns (`target.kind`), one class each in the
TARGETS registry. A target says how wide the decoder's output is, what it predicts at every patch
of a batch (computed without gradients before the student's forward) and what of its settings a
checkpoint records; the objective (mim.engine.objective) does the rest.

- pixels: MAE's normalised pixels, computed inside the model as always (bit-identical to MAE).
- hog: MaskFeat's HOG of each patch, on the device.
- teacher: a frozen backbone's patch tokens on the whole image, layer-normed and resampled to the
  student's grid; cosine loss by default.
- ema: data2vec: the average of the EMA encoder's last k blocks (instance-normed).

Your own: a subclass of `Target` in your package, named as `target.kind=package.module:Name`
(docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mim.config import require
from mim.models.arch import MaeArch
from mim.models.targets import hog, hog_cell, hog_dim, instance_normed_average, layer_normed, resample_tokens
from mim.registry import Registry


@dataclass
class Teachers:
    """What the teachers said about a batch: (global feature, patch tokens) of the frozen teacher
    and (global feature, last blocks' outputs) of the EMA teacher; None where there is none."""

    frozen: tuple[torch.Tensor, torch.Tensor] | None = None
    ema: tuple[torch.Tensor, list[torch.Tensor]] | None = None


class Target:
    """What the decoder predicts at the masked patches. Class attributes say what the objective
    and the stages need to know; `config` is the `target` section, `arch` the model's."""

    default_loss = "mse"  # target.loss=auto
    predicts_pixels = False  # reconstructions can be drawn
    needs_teacher = False  # target.teacher must name a frozen teacher
    follows_student = False  # an EMA of the student: whole weights on every rank (not ZeRO 3)

    def __init__(self, config: Any, arch: MaeArch) -> None:
        self.config, self.arch = config, arch

    @classmethod
    def check(cls, config: Any, arch: MaeArch) -> None:
        """Raises ConfigError where the target's keys do not fit the model; before any work."""

    def pred_dim(self, teacher_dim: int | None) -> int | None:
        """The decoder's output width per patch; None: the model's own (pixels)."""
        raise NotImplementedError

    def compute(self, images: torch.Tensor, teachers: Teachers) -> torch.Tensor | None:
        """(N, L, pred_dim) targets of normalised `images` (N, C, H, W), row-major patches; None:
        the model computes its own (pixels)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings beyond kind, loss and global weight that meta.json records (resume refuses
        other ones)."""
        return {}


TARGETS = Registry("target", "target.kind", base=Target)


@TARGETS.register("pixels")
class Pixels(Target):
    predicts_pixels = True

    def pred_dim(self, teacher_dim: int | None) -> int | None:
        return None

    def compute(self, images: torch.Tensor, teachers: Teachers) -> torch.Tensor | None:
        return None


@TARGETS.register("hog")
class Hog(Target):
    def __init__(self, config: Any, arch: dict[str, Any]) -> None:
        super().__init__(config, arch)
        self.cell = hog_cell(arch["patch_size"], config.hog_cell)

    @classmethod
    def check(cls, config: Any, arch: dict[str, Any]) -> None:
        cell = hog_cell(arch["patch_size"], config.hog_cell)
        require(
            arch["patch_size"] % cell == 0,
            f"target.hog_cell {cell} must divide model.patch_size {arch['patch_size']}",
        )

    def pred_dim(self, teacher_dim: int | None) -> int | None:
        return hog_dim(self.arch["patch_size"], self.arch["in_chans"], self.cell, self.config.hog_bins)

    def compute(self, images: torch.Tensor, teachers: Teachers) -> torch.Tensor | None:
        return hog(images, self.arch["patch_size"], self.cell, self.config.hog_bins)

    def describe(self) -> dict[str, Any]:
        return {"hog_cell": self.cell, "hog_bins": self.config.hog_bins}


@TARGETS.register("teacher")
class TeacherTokens(Target):
    default_loss = "cosine"
    needs_teacher = True

    def pred_dim(self, teacher_dim: int | None) -> int | None:
        return teacher_dim

    def compute(self, images: torch.Tensor, teachers: Teachers) -> torch.Tensor | None:
        grid = self.arch["img_size"] // self.arch["patch_size"]
        return layer_normed(resample_tokens(teachers.frozen[1], grid))


@TARGETS.register("ema")
class EmaFeatures(Target):
    follows_student = True

    def pred_dim(self, teacher_dim: int | None) -> int | None:
        return self.arch["embed_dim"]

    def compute(self, images: torch.Tensor, teachers: Teachers) -> torch.Tensor | None:
        return instance_normed_average(teachers.ema[1])
