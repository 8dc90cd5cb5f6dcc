"""Hold each step at a FLOPs target by shifting every keep ratio by one common amount. No torch.

ALaST's budgets say which blocks matter more; a FLOPs target says how much a step may spend. The
projection keeps the first and meets the second: the step's keep ratios are
``clip(b_l + c, floor, 1)`` with the one shift ``c`` that puts the step's train FLOPs (with its
actual trained blocks) as close to ``target`` x full fine-tuning as the token counts allow, never
above it unless even every ratio at the floor is.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .costmodel import CostModel
from .rules import kept_token_counts
from .simulate import StepCost, StepShape, full_step_flops, step_cost, step_flops

BUDGET_FLOOR = 0.01  # lowest keep ratio a projection (or the target solver) uses
_SHIFT_TOLERANCE = 1e-7
_CACHE_SIZE = 4096
LARGE_BATCH = 1024  # the batch a peak is priced at when none is given: per-sample activations dominate


def shifted(budgets: Sequence[float], shift: float, floor: float = BUDGET_FLOOR) -> tuple[float, ...]:
    """``clip(b + shift, floor, 1)`` for every budget."""
    return tuple(min(1.0, max(floor, b + shift)) for b in budgets)


def common_shift(ratio_of: Callable[[tuple[float, ...]], float], budgets: Sequence[float], target: float,
                 floor: float = BUDGET_FLOOR) -> float:
    """The largest shift ``c`` with ``ratio_of(shifted(budgets, c)) <= target`` (bisection; ``ratio_of``
    nondecreasing in the keep ratios). If every ratio at 1 is within the target, the shift that puts
    them all at 1; if every ratio at ``floor`` is still above it, the shift that puts them all there."""
    lo, hi = floor - max(budgets), 1.0 - min(budgets)
    if ratio_of(shifted(budgets, hi, floor)) <= target:
        return hi
    if ratio_of(shifted(budgets, lo, floor)) > target:
        return lo
    while hi - lo > _SHIFT_TOLERANCE:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio_of(shifted(budgets, mid, floor)) <= target else (lo, mid)
    return lo


class TargetProjection:
    """Projects budgets onto ``target`` x the full fine-tuning step FLOPs of ``cm``.

    ``min_tokens`` must be the runtime's (the token counts are computed as the runtime keeps them);
    ``batch_size``, the samples one device runs per step, prices a step's peak memory
    (:meth:`peak_bytes`; None: ``LARGE_BATCH``). Step costs are cached by step shape: the bisection
    revisits the same token counts. A step's FLOPs are priced on their own (:func:`step_flops`), its
    memory only where a peak limits the step.
    """

    def __init__(self, cm: CostModel, target: float, min_tokens: int = 1, floor: float = BUDGET_FLOOR,
                 token_multiple: int = 1, batch_size: int | None = None) -> None:
        self.cm = cm
        self.target = float(target)
        self.min_tokens = int(min_tokens)
        self.token_multiple = int(token_multiple)
        self.floor = float(floor)
        self.batch_size = LARGE_BATCH if batch_size is None else int(batch_size)
        self.full_flops = full_step_flops(cm)
        self._cache: dict[tuple[int, tuple[int, ...], tuple[bool, ...]], StepCost] = {}
        self._flops: dict[tuple[tuple[int, ...], tuple[bool, ...]], float] = {}  # one sample's, by shape
        # each step's bisection starts from the same shifts as the step before's, so the keep ratios
        # it tries repeat while the budgets hold still (a simulated run, a steady one)
        self._by_ratios: dict[tuple[int, tuple[float, ...], tuple[bool, ...]], StepCost] = {}

    def _cost(self, keep_ratios: Sequence[float], trained: Sequence[bool], batch: int) -> StepCost:
        key = (batch, tuple(keep_ratios), tuple(trained))
        found = self._by_ratios.get(key)
        if found is None:
            if len(self._by_ratios) >= _CACHE_SIZE:
                self._by_ratios.clear()
            found = self._by_ratios[key] = self._shape_cost(keep_ratios, trained, batch)
        return found

    def _shape_cost(self, keep_ratios: Sequence[float], trained: Sequence[bool], batch: int) -> StepCost:
        tin, tout = kept_token_counts(keep_ratios, self.cm.num_patches, self.min_tokens, self.token_multiple)
        key = (batch, tout, tuple(trained))
        if key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = step_cost(self.cm, StepShape(tin, tout, key[2]), batch)
        return self._cache[key]

    def train_flops(self, keep_ratios: Sequence[float], trained: Sequence[bool]) -> float:
        """One sample's train FLOPs with these keep ratios and trained blocks (:func:`step_flops`, cached by shape)."""
        tin, tout = kept_token_counts(keep_ratios, self.cm.num_patches, self.min_tokens, self.token_multiple)
        key = (tout, tuple(trained))
        found = self._flops.get(key)
        if found is None:
            if len(self._flops) >= _CACHE_SIZE:
                self._flops.clear()
            found = self._flops[key] = step_flops(self.cm, StepShape(tin, tout, key[1]), 1)
        return found

    def peak_bytes(self, keep_ratios: Sequence[float], trained: Sequence[bool]) -> float:
        """The bytes alive at the worst moment of the backward of a ``batch_size`` step with these keep
        ratios and trained blocks (activations, gradients done and in flight)."""
        return self._cost(keep_ratios, trained, self.batch_size).bwd_peak_bytes

    def ratio(self, keep_ratios: Sequence[float], trained: Sequence[bool]) -> float:
        """One sample's train FLOPs with these keep ratios and trained blocks / full fine-tuning's."""
        return self.train_flops(keep_ratios, trained) / self.full_flops

    def project(self, budgets: Sequence[float], trained: Sequence[bool], spare_first: int = 0,
                trim_last: bool = False, max_peak_bytes: float | None = None,
                target: float | None = None) -> tuple[float, ...]:
        """The step's keep ratios: ``budgets`` shifted by the common amount that meets the target; the
        first ``spare_first`` blocks keep every token whatever the shift, and with ``trim_last`` the
        last block keeps none (ratio 0: ``min_tokens`` of them). ``max_peak_bytes``: the shift also
        keeps the step's backward peak (:meth:`peak_bytes`) within it. ``target``: this step's FLOPs
        target in place of the projection's."""
        trained, m = tuple(trained), int(spare_first)
        target = self.target if target is None else float(target)
        last = (0.0,) if trim_last else ()
        rest = tuple(budgets[m:len(budgets) - len(last)])

        def load(r: tuple[float, ...]) -> float:  # the step's share of its limits; 1: at the tighter one
            ratios = (1.0,) * m + r + last
            flops = self.train_flops(ratios, trained) / self.full_flops / target
            return flops if max_peak_bytes is None else max(flops, self.peak_bytes(ratios, trained) / max_peak_bytes)

        if not rest:
            return (1.0,) * m + last
        c = common_shift(load, rest, 1.0, self.floor)
        return (1.0,) * m + shifted(rest, c, self.floor) + last
