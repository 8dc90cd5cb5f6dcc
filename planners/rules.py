"""The ALaST rule as small pure functions on plain numbers (no torch, no model code)."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

_EPS = 1e-9


def reduce_deltas(per_sample: Sequence[float], reduction: str) -> float:
    """Reduce per-sample squared CLS deltas over a batch: ``mean`` (default) or ``sum``."""
    if reduction == "mean":
        return sum(per_sample) / max(len(per_sample), 1)
    if reduction == "sum":
        return float(sum(per_sample))
    raise ValueError(f"unknown delta reduction {reduction!r}; use 'mean' or 'sum'")


def update_budgets(
    budgets: Sequence[float],
    deltas: Sequence[float],
    prev_deltas: Sequence[float],
    alpha: float,
    b_min: float,
    b_max: float,
) -> list[float]:
    """``b_l <- clip(b_l + alpha * (delta_l - delta_prev_l), b_min, b_max)``; no renormalisation."""
    return [
        min(b_max, max(b_min, b + alpha * (d - p)))
        for b, d, p in zip(budgets, deltas, prev_deltas, strict=True)
    ]


def softmax(values: Sequence[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [x / s for x in e]


def step_rng(seed: int, step: int) -> random.Random:
    """A generator that depends only on (seed, step): identical on every rank and after resume."""
    return random.Random(f"alast:{seed}:{step}")


def sample_without_replacement(weights: Sequence[float], k: int, rng: random.Random) -> list[int]:
    """Draw ``k`` distinct indices, each draw proportional to the remaining weights."""
    if not 0 <= k <= len(weights):
        raise ValueError(f"cannot draw {k} of {len(weights)} items")
    remaining = list(range(len(weights)))
    chosen: list[int] = []
    for _ in range(k):
        total = sum(weights[i] for i in remaining)
        u = rng.random() * total
        acc = 0.0
        pick = remaining[-1]
        for i in remaining:
            acc += weights[i]
            if u < acc:
                pick = i
                break
        remaining.remove(pick)
        chosen.append(pick)
    return sorted(chosen)


def top_k_indices(values: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest values; ties go to the deeper block (closer to the head)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)
    return sorted(order[:k])


def kept_token_counts(
    keep_ratios: Sequence[float], num_patches: int, min_tokens: int = 1, multiple: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Patch tokens entering and leaving each block under cumulative dropping.

    After block l, ``floor(r_l * N_l)`` of the ``N_l`` current patch tokens are kept, rounded down
    to a multiple of ``multiple`` (8 suits GPU tensor cores; 1 keeps the exact count), never fewer
    than ``min_tokens`` (or all of them if fewer remain). Prefix tokens (CLS, registers) are not
    counted and never dropped. Returns ``(tokens_in, tokens_out)``.
    """
    if multiple < 1:
        raise ValueError(f"token multiple must be >= 1, got {multiple}")
    tokens_in, tokens_out = [], []
    n = num_patches
    for r in keep_ratios:
        tokens_in.append(n)
        if r < 1.0:
            kept = math.floor(r * n + _EPS)
            n = max(min(min_tokens, n), kept - kept % multiple)
        tokens_out.append(n)
    return tuple(tokens_in), tuple(tokens_out)


def default_k_trained(num_blocks: int) -> int:
    """ALaST trains 9 of 12 blocks; for other depths ``round(0.75 * L)`` (halves round up)."""
    return max(1, min(num_blocks, math.floor(0.75 * num_blocks + 0.5)))
