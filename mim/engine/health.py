"""A step's health, recorded on the device from values the step computes anyway, so that no step
waits for the device: the first step whose loss or gradient norm was not finite, or whose loss
was a spike, and what it was.

A spike is a loss above `threshold` times the mean of this rank's last `window` healthy step
losses. It is looked for only once `window` losses are in and the warm-up is over (`checked_after`
steps): during warm-up the loss falls too fast for a recent mean to say what is normal. The recent
losses are a rank part of the checkpoint (`state_dict`), so that a resumed or rolled-back run
judges its next steps against the same history. Reading the record (`first_bad`, `anomaly`) waits
for the device: the training loop does it at log and checkpoint steps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NON_FINITE, SPIKE = 1, 2


@dataclass(frozen=True)
class Anomaly:
    step: int  # the first anomalous step (1-based)
    cause: str  # "non-finite" | "spike" | "weights" (found before a checkpoint)
    loss: float  # the step's loss (this rank's sum over its micro-batches)
    level: float  # the recent mean it was measured against (spikes)

    def describe(self) -> str:
        if self.cause == "spike":
            return (
                f"a loss spike at step {self.step} (this rank's loss {self.loss:.4g}, "
                f"{self.loss / max(self.level, 1e-12):.1f}x its recent mean {self.level:.4g})"
            )
        if self.cause == "weights":  # a non-finite gradient on a step whose norm was not computed
            return f"the weights became NaN/inf by step {self.step}"
        return f"the loss or the gradient norm became NaN/inf at step {self.step}"


class LossWatch:
    def __init__(
        self, device: torch.device, threshold: float = 0.0, window: int = 100, checked_after: int = 0
    ):
        self.device, self.threshold, self.window, self.checked_after = (
            device,
            threshold,
            window,
            checked_after,
        )
        self.recent = torch.zeros(window if threshold else 1, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.record_ = torch.zeros(4, device=device)  # first step, cause, loss, level (step 0: none)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """`loss`: the step's loss on device; `grad_norm`: its gradient norm where one was computed."""
        # inf and NaN survive a sum: one test covers the loss and the gradient norm.
        non_finite = ~torch.isfinite(loss if grad_norm is None else loss + grad_norm)
        bad, cause, level = non_finite, torch.full((), float(NON_FINITE), device=self.device), loss
        if self.threshold and step > self.checked_after:
            level = self.recent.sum() / self.window
            spike = (self.seen >= self.window) & (loss > self.threshold * level) & ~non_finite
            bad = non_finite | spike
            cause = torch.where(spike, float(SPIKE), cause)
        if self.threshold:
            slot = step % self.window
            self.recent[slot] = torch.where(bad, self.recent[slot], loss)
            self.seen += (~bad).long()
        new = bad & (self.record_[0] == 0)
        entry = torch.stack([torch.full((), float(step), device=self.device), cause, loss, level])
        self.record_ = torch.where(new, entry, self.record_)

    def first_bad(self) -> int:
        """The first anomalous step, or -1 (waits for the device)."""
        return int(self.record_[0].item()) or -1

    def anomaly(self) -> Anomaly | None:
        """The first anomaly, or None (waits for the device)."""
        step, cause, loss, level = self.record_.tolist()
        if not step:
            return None
        return Anomaly(int(step), "spike" if cause == SPIKE else "non-finite", loss, level)

    def clear(self) -> None:
        """After a rollback: nothing recorded since the restored checkpoint counts."""
        self.record_.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"recent": self.recent.cpu(), "seen": int(self.seen.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recent = state["recent"]
        if recent.numel() == self.recent.numel():  # another spike_window starts a new history
            self.recent.copy_(recent)
            self.seen.fill_(state["seen"])
        self.clear()
