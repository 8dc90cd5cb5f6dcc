"""The ALaST rule as small pure functions on plain numbers (no torch, no model code)."""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_EPS = 1e-9
B_INIT, B_MIN, B_MAX = 0.9, 0.5, 1.0  # the paper's starting budget and clip range
SHARE_FLOOR = 1e-6  # smallest share (of the mean block's) the normalized rule takes a log of


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


@dataclass(frozen=True)
class ShareState:
    """What the normalized rule remembers between steps (all dimensionless).

    shares: each block's smoothed share of the CLS change, relative to the mean block (each step's
        shares average 1): an EMA of the per-step shares, bias-corrected so that early steps are
        weighted as they would be after a long run (the first step's shares stand alone).
    reference: the mean of the first ``reference_horizon(ema)`` steps' shares, then fixed: what
        the budgets measure change against.
    count: observations seen so far.
    """

    shares: tuple[float, ...] = ()
    reference: tuple[float, ...] = ()
    count: int = 0


def reference_horizon(ema: float) -> int:
    """Steps averaged into the reference: the EMA's time constant ``1 / (1 - ema)``, rounded."""
    return max(1, round(1.0 / (1.0 - ema)))


def delta_shares(deltas: Sequence[float]) -> list[float]:
    """Each delta divided by the mean over blocks; all 1 when every delta is 0."""
    mean = sum(deltas) / len(deltas)
    if not mean > 0.0:
        return [1.0] * len(deltas)
    return [d / mean for d in deltas]


def normalized_update(state: ShareState, deltas: Sequence[float], ema: float) -> ShareState:
    """Fold one step's per-block CLS deltas into the normalized rule's state.

    The deltas become shares of their mean over blocks first, so any common scale of the deltas
    cancels; an EMA with factor ``ema`` (the weight of the past) smooths the shares. A step with a
    non-finite or negative delta (a diverged loss) leaves the state unchanged.
    """
    if any(not (math.isfinite(d) and d >= 0.0) for d in deltas):
        return state
    q = delta_shares(deltas)
    count = state.count + 1
    if count == 1:
        return ShareState(tuple(q), tuple(q), 1)
    w = (1.0 - ema) / (1.0 - ema**count)  # bias-corrected EMA: 1/count-like early, 1-ema later
    shares = tuple(s + w * (x - s) for s, x in zip(state.shares, q, strict=True))
    reference = state.reference
    if count <= reference_horizon(ema):  # running mean of the early shares
        reference = tuple(r + (x - r) / count for r, x in zip(reference, q))
    return ShareState(shares, reference, count)


def normalized_budgets(state: ShareState, b_init: float, gain: float, b_min: float, b_max: float,
                       groups: Sequence[int] | None = None) -> list[float]:
    """``b_l = clip(b_init + gain * (x_l - mean_k x_k), b_min, b_max)`` with
    ``x_l = log2(share_l / reference_l)``, the doublings of block l's smoothed share since the
    reference.

    A block whose share doubles (relative to how the other blocks' shares moved) gains ``gain``;
    one whose share halves loses ``gain``. A change common to every block moves nothing, so the
    budgets average ``b_init`` until a clip bound cuts in. The budgets are a function of the state
    alone (not accumulated step by step), so a clip bound never sticks and noise does not add up.
    With ``groups`` (one label per block), each block is compared with the blocks of its own group
    only (the mean runs over the group): blocks that train and blocks that stay frozen change for
    different reasons, so their shares are compared apart. Needs at least one observation in ``state``.
    """
    x = [math.log2(max(s, SHARE_FLOOR) / max(r, SHARE_FLOOR))
         for s, r in zip(state.shares, state.reference, strict=True)]
    labels = [0] * len(x) if groups is None else list(groups)
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} group labels for {len(x)} blocks")
    mean = {g: sum(v for v, h in zip(x, labels) if h == g) / labels.count(g) for g in set(labels)}
    return [min(b_max, max(b_min, b_init + gain * (v - mean[g]))) for v, g in zip(x, labels)]


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


SCHEDULE_WINDOW = 0.1  # the deployed token schedule: the mean of the last 10% of training steps


def schedule_window(steps: int) -> int:
    """Training steps whose kept tokens make the deployed token schedule (at least one)."""
    return max(1, round(SCHEDULE_WINDOW * steps))


def schedule_from_steps(rows: Sequence[Sequence[int]], unread_last: int | None = None) -> tuple[int, ...] | None:
    """The token schedule of a window of training steps: per block, the mean of the patch tokens
    that left it, rounded (means and rounding keep the counts non-increasing). None without steps.

    ``unread_last`` (the patch count, where training trimmed the last block because the head reads
    none of its patch tokens): the last block drops nothing at evaluation, so it keeps what enters it.
    """
    if not rows:
        return None
    n = len(rows)
    kept = tuple(max(1, round(sum(int(r[i]) for r in rows) / n)) for i in range(len(rows[0])))
    if unread_last is not None:
        kept = kept[:-1] + (kept[-2] if len(kept) > 1 else int(unread_last),)
    return kept


def default_k_trained(num_blocks: int, freeze_mode: str = "sample") -> int:
    """Blocks trained per step. The paper trains 9 of 12: ``round(0.75 L)``, halves round up. With
    ``freeze_mode='last'`` the bottom quarter of the blocks stays frozen, halves round up: the same
    K wherever ``0.75 L`` is whole (9 of 12), one block fewer where it is a half (4 of 6)."""
    if freeze_mode == "last":
        return max(1, num_blocks - math.floor(num_blocks / 4 + 0.5))
    return max(1, min(num_blocks, math.floor(0.75 * num_blocks + 0.5)))


def spared_blocks(spare_first: int | str, num_blocks: int, k_trained: int, freeze_mode: str) -> int:
    """How many bottom blocks keep every token: ``spare_first`` blocks, or with ``'frozen'`` the
    blocks below the trained ones where ``freeze_mode`` is ``'last'`` (``num_blocks - k_trained``;
    none in the other modes, whose trained set moves)."""
    if spare_first == "frozen":
        return num_blocks - k_trained if freeze_mode == "last" else 0
    try:
        return int(spare_first)
    except ValueError:
        raise ValueError(f"spare_first must be a block count or 'frozen', got {spare_first!r}") from None


def dense_final_top(num_blocks: int, setting: int | str) -> int | None:
    """Blocks trained in ALaST's dense final phase: the top ``setting`` blocks; ``'auto'``, a quarter
    of the depth (halves round up, at least 1); ``'sampled'``: None, the sparse phase's draw."""
    if setting == "sampled":
        return None
    if setting == "auto":
        return max(1, math.floor(num_blocks / 4 + 0.5))
    if isinstance(setting, bool) or not isinstance(setting, int) or not 1 <= setting <= num_blocks:
        raise ValueError(f"dense_final_blocks must be 'auto', 'sampled' or a block count in [1, {num_blocks}], "
                         f"got {setting!r}")
    return setting


def in_dense_final(progress: float, frac: float) -> bool:
    """Whether a step at ``progress`` (step / steps) belongs to a dense final phase of share ``frac``."""
    return frac > 0 and progress >= 1.0 - frac


def interleave_period(setting: bool | int | None) -> int:
    """The period of ``dense_final_interleave``: one step in N of the dense final phase is a sparse
    step; 0 (``False``, ``None``): none; ``True``: every other step (N = 2)."""
    if setting is None or setting is False:
        return 0
    if setting is True:
        return 2
    if type(setting) is not int or setting == 1 or setting < 0:
        raise ValueError(f"dense_final_interleave must be false/0 (every step of the dense final phase is dense), "
                         f"true (every other step is sparse) or a period N >= 2 (one step in N), got {setting!r}")
    return setting


def interleaved(step: int, period: int = 2) -> bool:
    """Whether ``step`` of a dense final phase is one of its sparse steps: the last of every
    ``period`` steps (the odd ones for 2; none for 0)."""
    return period > 0 and step % period == period - 1


def interleaved_share(frac: float, steps: int | None = None, period: int = 2) -> float:
    """The share of a run's steps that are the dense final phase's interleaved sparse steps: exactly
    as :func:`in_dense_final` and :func:`interleaved` count them over ``steps`` steps, or the
    phase's share over ``period`` when the steps are not known."""
    if not period:
        return 0.0
    if not steps:
        return float(frac) / period
    return sum(in_dense_final(s / steps, frac) and interleaved(s, period) for s in range(steps)) / steps


def in_early(progress: float, frac: float) -> bool:
    """Whether a step at ``progress`` (step / steps) belongs to an early phase of share ``frac``
    (``policy.early_frac``)."""
    return progress < frac


def phase_share(in_phase: Callable[[float, float], bool], frac: float, steps: int | None = None) -> float:
    """The share of a run's steps in a phase of share ``frac``: exactly as ``in_phase``
    (:func:`in_dense_final`, :func:`in_early`) counts them over ``steps`` steps (a short run rounds
    it), or ``frac`` when the steps are not known."""
    if not steps:
        return float(frac)
    return sum(in_phase(s / steps, frac) for s in range(steps)) / steps


def early_share(frac: float, steps: int | None = None) -> float:
    """The share of a run's steps in its early phase (:func:`phase_share`)."""
    return phase_share(in_early, frac, steps)


def dense_final_share(frac: float, steps: int | None = None) -> float:
    """The share of a run's steps in its dense final phase (:func:`phase_share`)."""
    return phase_share(in_dense_final, frac, steps)


# -- what a torch runtime's step does beside training: the planner times these too ----------------
def memory_probe_step(step: int) -> bool:
    """Steps whose CPU peak memory the torch runtime measures (MemTracker slows a step about 2x): 1,
    2, every 50th. Step 0 is skipped: AdamW creates its state in that step's update, after the peak."""
    return step in (1, 2) or (step > 0 and step % 50 == 0)


@dataclass
class MemoryProbes:
    """Which steps a torch runtime on the CPU measures: the scheduled ones (``probe``), and any step
    heavier than every measured one (more tokens or more trained blocks, e.g. a dense final phase),
    so the sampled peak does not miss it. ``load``: the most tokens and trained blocks measured."""

    probe: Callable[[int], bool] = memory_probe_step
    load: tuple[int, int] = (0, 0)

    def __call__(self, step: int, tokens_in: Sequence[int], trained_blocks: int) -> bool:
        load = (sum(tokens_in), trained_blocks)
        heavier = step > 0 and (load[0] > 1.05 * self.load[0] or load[1] > self.load[1])
        if not (self.probe(step) or heavier):
            return False
        self.load = (max(load[0], self.load[0]), max(load[1], self.load[1]))
        return True


def flop_count_keys(batch: int, tokens_in: Sequence[int], kept: Sequence[int], trained: Sequence[bool],
                    embeddings: bool) -> tuple[list[tuple], tuple]:
    """The pieces a step's counted FLOPs are cached by: per block (batch, tokens in, tokens kept,
    trained, anything below it trained), and the rest of the model (batch, tokens leaving the last
    block, embeddings trained). A torch runtime counts a step (slower: eagerly, under the counter)
    only where one of its pieces is new."""
    blocks = [(batch, n, o, bool(t), embeddings or any(trained[:i]))
              for i, (n, o, t) in enumerate(zip(tokens_in, kept, trained))]
    return blocks, (batch, kept[-1], bool(embeddings))
