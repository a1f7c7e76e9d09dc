"""Learning-rate schedules as pure functions of the step: resuming needs only the step."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0 to `peak_lr`, then half a cosine down to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(param_groups: list[dict], lr: float) -> None:
    """Sets each group's lr to `lr` times its own `lr_scale` (layer-wise decay lives there)."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
