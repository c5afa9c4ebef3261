"""Learning-rate schedules as pure functions of the step (nothing to checkpoint)."""

from __future__ import annotations

import math


def learning_rate(step: int, base_lr: float, max_steps: int, warmup_steps: int, kind: str) -> float:
    """LR for optimizer step `step` (1-based): linear warm-up, then constant or cosine to 10%."""
    if warmup_steps and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if kind == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
