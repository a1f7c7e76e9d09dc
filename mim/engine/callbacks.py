"""What runs beside the training loop: a callback is told when the loop starts, after every
optimizer step and at the end, and receives the scalars and images the run reports. Evaluation,
the kNN monitor, pictures and TensorBoard are callbacks; a task lists those it wants.

Every rank calls the hooks (a callback that gathers weights must be entered by all); where only
rank 0 writes, the callback checks it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mim.engine.loop import Loop


class Callback:
    def before_loop(self, loop: Loop) -> None:
        """Once the run is loaded or resumed, before the first step."""

    def after_step(self, loop: Loop) -> None:
        """After each optimizer step (loop.step is the step just done)."""

    def after_loop(self, loop: Loop) -> None:
        """Once the loop has stopped, for whatever reason."""

    def on_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars reported at `step` (rank 0's view; called on every rank)."""

    def on_image(self, step: int, name: str, image: torch.Tensor) -> None:
        """A (3, H, W) float image in [0, 1] reported at `step`."""

    def flush(self) -> None:
        """What has been reported is written out (called at log steps and the end)."""


class TensorBoard(Callback):
    """Scalars and images into RUN_DIR/tb (rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def on_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def on_image(self, step: int, name: str, image: torch.Tensor) -> None:
        self.writer.add_image(name, image, step)

    def flush(self) -> None:
        self.writer.flush()

    def after_loop(self, loop: Loop) -> None:
        self.writer.flush()
