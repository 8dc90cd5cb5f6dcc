"""Learning-rate schedule: linear warm-up, then cosine decay (a pure function of the step)."""
from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, total_steps: int, base_lr: float, warmup_frac: float, min_lr_frac: float) -> float:
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = base_lr * min_lr_frac
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: Any, n_train: int) -> int:
    t = cfg.train
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * (n_train // t.batch_size)))
    return int(t.steps)
