"""Learning rate as a pure function of the step: resume needs nothing but the step number."""
from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_at(step: int, *, base_lr: float, total_steps: int, scheduler: str, warmup_ratio: float,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly from base_lr/warmup to base_lr; then linear or cosine decay towards
    `min_lr_ratio * base_lr` at the last step, or constant.
    """
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return base_lr * (step + 1) / warm
    if scheduler == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / decay_steps)
    floor = base_lr * min_lr_ratio
    if scheduler == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    if scheduler == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {scheduler!r}")
