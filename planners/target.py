"""Choose a policy's knobs so that training costs a given fraction of full fine-tuning's FLOPs.

* ``alast``: the number of trained blocks K and ``target_flops``, the per-step target the planner
  projects its budgets onto (one common shift of every keep ratio, :mod:`planners.projection`), so
  the budgets keep adapting in the policy's own ``[b_min, b_max]`` while the steps land on target
  (each at or below its own, which carries what the steps before left of theirs).
  With ``dense_final_frac`` the sparse steps' target moves so the run's total lands on it (an
  optional ``steps`` option gives the phase's exact share of a short run).
  The planner needs the cost model: ``create_planner("alast", L, cost_model=cm, **knobs)``.
* ``tokens``: the keep ratio. ``freeze`` and ``random``: K. ``full``: no knob.
An unreachable target is a :class:`TargetError` naming the floor that blocks it. No torch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from .costmodel import CostModel
from .projection import BUDGET_FLOOR
from .registry import PlannerError, create_planner, planner_options
from .rules import (
    B_INIT,
    B_MAX,
    B_MIN,
    default_k_trained,
    dense_final_share,
    dense_final_top,
    early_share,
    interleave_period,
    interleaved_share,
    kept_token_counts,
    spared_blocks,
)
from .simulate import StepShape, expected_step_flops, full_step_flops, step_cost, step_flops

TARGET_TOLERANCE = 0.05  # a run may land this far (relative) from its target
# where the planner's ratio is the run's (tokens: every step the same shape), it must land as close as
# `train` and `bench` check a run (alast's simulated steps are only an estimate of a short run's)
EXACT_TOLERANCE = 0.03
PROJECTION_STEPS = 64  # sparse steps the solver simulates to predict the projected ratio
CARRY_SLACK = 0.01  # how far above its target a run may land if its sparse steps spend all theirs (see _fit)
EARLY_ROUNDS = 8  # secant steps on the sparse steps' target that pay for a memory-bound early phase


class TargetError(PlannerError):
    """The FLOPs target is malformed or out of the policy's reach. ``reason``: the message without
    the advice to train another policy (``other_policy``), which a caller that picks the policies
    itself (``alast bench``) leaves out."""

    def __init__(self, reason: str, other_policy: str | None = None) -> None:
        super().__init__(reason + (f", or use --policy {other_policy}" if other_policy else ""))
        self.reason, self.other_policy = reason, other_policy


@dataclass(frozen=True)
class TargetSolution:
    policy: str
    target: float
    knobs: dict[str, Any]
    predicted_ratio: float
    ratio_range: tuple[float, float]

    def info(self) -> dict[str, Any]:
        return {**asdict(self), "ratio_range": list(self.ratio_range), "tolerance": TARGET_TOLERANCE,
                "method": "expected FLOPs on the profiled cost model (ratio to full fine-tuning); alast: "
                          "simulated steps, each projected onto the target"}


def check_target(target: float) -> float:
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise TargetError(f"--target-flops must be in (0, 1] (a fraction of full fine-tuning), got {target:g}")
    return target


def _largest_at_most(fn: Callable[[float], float], limit: float, lo: float, hi: float) -> float:
    """Largest x in [lo, hi] with fn(x) <= limit for a nondecreasing fn (lo if none)."""
    if fn(hi) <= limit:
        return hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) <= limit else (lo, mid)
    return lo


def _nearest(fn: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The x in [lo, hi] whose fn(x) is nearest ``target``, for a nondecreasing step function;
    rounded to 4 decimals where that does not change fn(x)."""
    below = _largest_at_most(fn, target, lo, hi)
    above = min(hi, below + 1e-7)
    x = min((below, above), key=lambda v: _miss(fn(v), target))
    for digits in range(2, 10):
        scale = 10**digits
        for nice in (math.floor(x * scale) / scale, math.ceil(x * scale) / scale):
            if lo <= nice <= hi and fn(nice) == fn(x):
                return nice
    return x


def solve_target(cm: CostModel, planner: str, target: float, options: dict[str, Any],
                 full_cm: CostModel | None = None, policy: str | None = None) -> TargetSolution:
    """Knobs for ``planner`` on ``cm`` (LoRA or not) so its FLOPs are ``target`` x full fine-tuning
    of ``full_cm`` (default ``cm``). ``options`` are the policy's other settings."""
    target = check_target(target)
    full = full_step_flops(full_cm or cm)
    policy = policy or planner
    solver = {"alast": _solve_alast, "tokens": _solve_tokens, "freeze": _solve_k, "random": _solve_k,
              "full": _solve_full}.get(planner)
    if solver is None:
        raise TargetError(f"policy {policy!r} has no FLOPs knob the planner knows; use alast or tokens")
    return solver(cm, planner, policy, target, full, options)


def _miss(ratio: float, target: float) -> float:
    return abs(ratio / target - 1.0)


def _solve_full(cm, planner, policy, target, full, options) -> TargetSolution:
    ratio = full_step_flops(cm) / full
    if _miss(ratio, target) > TARGET_TOLERANCE:
        raise TargetError(f"policy {policy!r} has no knob: it always costs {ratio:.3f}x full fine-tuning, not "
                          f"{target:g}; use alast or tokens for a FLOPs target")
    return TargetSolution(policy, target, {}, ratio, (ratio, ratio))


def _solve_k(cm, planner, policy, target, full, options) -> TargetSolution:
    L = cm.num_blocks
    ratios = {k: expected_step_flops(cm, 1.0, k) / full for k in range(1, L + 1)}
    if planner == "freeze":
        ratios = {k: _freeze_ratio(cm, k) / full for k in range(1, L + 1)}
    k = min(ratios, key=lambda k: _miss(ratios[k], target))
    if _miss(ratios[k], target) > TARGET_TOLERANCE:
        low = min(ratios.values())
        why = (" (the patch embedding is trainable, so every block still computes its input gradient)"
               if cm.embed.trainable else "")
        raise TargetError(f"policy {policy!r} cannot reach {target:g}x full FLOPs: its only knob k_trained spans "
                          f"{low:.3f}x (k_trained=1) to {max(ratios.values()):.3f}x{why}; the closest is "
                          f"k_trained={k} at {ratios[k]:.3f}x; use alast or tokens")
    return TargetSolution(policy, target, {"k_trained": k}, ratios[k], (ratios[k], ratios[k]))


def _freeze_ratio(cm: CostModel, k: int) -> float:
    L, N = cm.num_blocks, cm.num_patches
    return step_flops(cm, StepShape((N,) * L, (N,) * L, tuple(i >= L - k for i in range(L))), 1)


def _tokens_flops(cm: CostModel, r: float, min_tokens: int, token_multiple: int = 1) -> float:
    L = cm.num_blocks
    tin, tout = kept_token_counts([r] * L, cm.num_patches, min_tokens, token_multiple)
    return step_flops(cm, StepShape(tin, tout, (True,) * L), 1)


def _solve_tokens(cm, planner, policy, target, full, options) -> TargetSolution:
    mt = int(options.get("min_tokens", 1))
    tm = int(options.get("token_multiple", 1))
    fn = lambda r: _tokens_flops(cm, r, mt, tm) / full  # noqa: E731
    floor = fn(BUDGET_FLOOR)
    if floor > target * (1 + TARGET_TOLERANCE):
        L = cm.num_blocks
        tin, tout = kept_token_counts([BUDGET_FLOOR] * L, cm.num_patches, mt, tm)
        raise TargetError(_floor_message(cm, policy, target, floor, mt, StepShape(tin, tout, (True,) * L),
                                         "every keep ratio at the floor"))
    best = _nearest(fn, target, BUDGET_FLOOR, 1.0)
    if _miss(fn(best), target) > EXACT_TOLERANCE:
        below = _largest_at_most(fn, target, BUDGET_FLOOR, 1.0)
        near = sorted({round(fn(below), 3), round(fn(min(1.0, below + 1e-7)), 3)})
        raise TargetError(f"policy {policy!r} cannot get within {EXACT_TOLERANCE:.0%} of {target:g}x full FLOPs: "
                          f"the keep ratios nearest it give {' and '.join(f'{r:.3f}x' for r in near)} (too few "
                          f"tokens to divide finer); ask for --target-flops {' or '.join(f'{r:.3f}' for r in near)}, "
                          "or use a larger input")
    return TargetSolution(policy, target, {"keep_ratio": best, "min_tokens": mt}, fn(best), (fn(best), fn(best)))


@dataclass(frozen=True)
class _AlastRun:
    """The alast policy's steps, each kind's train FLOPs as a fraction of ``full``: the sparse steps
    (the top ``k`` trained, budgets at ``b``), the early phase's (one block more), the dense final
    phase's (every token, the top blocks; with ``dense_final_interleave`` some of its steps sparse)."""

    cm: CostModel
    full: float
    options: dict[str, Any]
    mode: str
    min_tokens: int
    token_multiple: int
    trim: bool  # only where the head reads no patch token
    top: int | None  # the blocks the dense final phase trains (None: the planner's k)
    dense_frac: float
    dense: float  # the share of the steps the dense final phase will take
    inter: float  # with dense_final_interleave, this share of the steps are the phase's sparse steps
    early_frac: float
    early: float  # the share of the steps that train one block more
    sparse_steps: int  # the other sparse steps the solver simulates: the run's, at most PROJECTION_STEPS

    @classmethod
    def create(cls, cm: CostModel, full: float, options: dict[str, Any]) -> _AlastRun:
        mode = str(options.get("freeze_mode", "sample"))
        frac = float(options.get("dense_final_frac") or 0.0)
        early_frac = float(options.get("early_frac") or 0.0)
        try:
            period = interleave_period(options.get("dense_final_interleave"))
        except ValueError as e:
            raise TargetError(str(e)) from None
        if early_frac and mode != "last":
            raise TargetError(f"policy.early_frac trains the block below the top k_trained ones: it needs "
                              f"freeze_mode='last', not {mode!r}")
        try:
            top = dense_final_top(cm.num_blocks, options.get("dense_final_blocks", "auto"))
        except ValueError as e:
            raise TargetError(str(e)) from None
        steps = options.get("steps")
        dense, early = dense_final_share(frac, steps), early_share(early_frac, steps)
        # each of these steps may spend what the ones before left of their target: a short run's mean
        # is its own few steps', a long one's within a fraction of a step's rounding of the target
        sparse = PROJECTION_STEPS if not steps else max(1, min(PROJECTION_STEPS, round(steps * (1 - dense - early))))
        return cls(cm, full, options, mode, int(options.get("min_tokens", 1)), int(options.get("token_multiple", 1)),
                   bool(options.get("trim_last")) and cm.head_reads_prefix, top, frac, dense,
                   interleaved_share(frac, steps, period) if frac else 0.0, early_frac, early, sparse)

    def dense_ratio(self, k: int) -> float:
        cm, L = self.cm, self.cm.num_blocks
        if self.top is None:
            return expected_step_flops(cm, 1.0, k, self.min_tokens, self.mode) / self.full
        ratios = [1.0] * (L - 1) + [0.0 if self.trim else 1.0]
        tin, tout = kept_token_counts(ratios, cm.num_patches, self.min_tokens, self.token_multiple)
        shape = StepShape(tin, tout, tuple(i >= L - self.top for i in range(L)), False)
        return step_flops(cm, shape, 1) / self.full

    def spare(self, k: int) -> int:
        return spared_blocks(self.options.get("spare_first") or 0, self.cm.num_blocks, k, self.mode)

    def sparse_ratio(self, b: float, k: int) -> float:
        return expected_step_flops(self.cm, b, k, self.min_tokens, self.mode, self.spare(k), self.token_multiple,
                                   self.trim) / self.full

    def early_floor(self, k: int) -> float:
        """An early step's cost with every budget at the floor (0 without an early phase)."""
        return self.sparse_ratio(BUDGET_FLOOR, min(self.cm.num_blocks, k + 1)) if self.early else 0.0

    def phase_cost(self, k: int, interleaved: float | None = None) -> float:
        """The dense final phase's FLOPs per step of the run; an interleaved step holds a dense step's
        cost where its floor allows (``interleaved``: its simulated mean cost)."""
        if interleaved is None:
            interleaved = max(self.dense_ratio(k), self.sparse_ratio(BUDGET_FLOOR, k))
        return (self.dense - self.inter) * self.dense_ratio(k) + self.inter * interleaved

    def total(self, b: float, k: int) -> float:
        """The run's FLOPs per step; the early steps hold the sparse steps' target, or their floor."""
        sparse = self.sparse_ratio(b, k)
        early_cost = max(sparse, self.early_floor(k))
        return (1.0 - self.dense - self.early) * sparse + self.early * early_cost + self.phase_cost(k)

    def choose_k(self, target: float) -> int:
        """The fewest trained blocks that reach ``target`` with every token, unless fewer cost less."""
        L = self.cm.num_blocks
        k = int(self.options.get("k_trained") or default_k_trained(L, self.mode))
        while k < L and self.total(1.0, k) < target:
            k += 1
        # fewer trained blocks cost less, unless each one more frozen block keeps every token ('frozen')
        while k > 1 and self.total(BUDGET_FLOOR, k) > target and \
                self.total(BUDGET_FLOOR, k - 1) < self.total(BUDGET_FLOOR, k):
            k -= 1
        return k

    def floor_error(self, policy: str, target: float, k: int) -> TargetError:
        """Why ``target`` is below the cheapest run with ``k`` trained blocks, and what to change."""
        cm, L, spare = self.cm, self.cm.num_blocks, self.spare(k)
        ratios = [1.0] * spare + [BUDGET_FLOOR] * (L - spare - self.trim) + [0.0] * self.trim
        tin, tout = kept_token_counts(ratios, cm.num_patches, self.min_tokens, self.token_multiple)
        # a step of the sparse phase, the top k trained (a sampled draw may train lower blocks)
        shape = StepShape(tin, tout, tuple(i >= L - k for i in range(L)), False)
        why = _floor_message(cm, policy, target, self.total(BUDGET_FLOOR, k), self.min_tokens, shape,
                             f"k_trained={k} and every budget at the floor")
        if spare:
            setting = self.options.get("spare_first") or 0
            why += (f"; the bottom {spare} blocks keep every token (policy.spare_first={setting}): "
                    "set policy.spare_first=0 to let them drop tokens")
        if self.dense:
            why += (f"; its dense final phase (policy.dense_final_frac={self.dense_frac:g}) costs "
                    f"{self.dense_ratio(k):.3f}x per step: lower dense_final_frac or set it to 0")
        if self.early and self.early_floor(k) > self.sparse_ratio(BUDGET_FLOOR, k):
            why += (f"; its early phase (policy.early_frac={self.early_frac:g}) trains {min(L, k + 1)} blocks, "
                    f"{self.early_floor(k):.3f}x per step at the floor: lower early_frac or set it to 0")
        return TargetError(why)

    def predict(self, k: int, knobs: dict[str, Any]) -> tuple[float, list[float], list[float], float]:
        """The run's mean ratio with the planner's projection (``knobs``), the sparse and early steps'
        simulated ratios, and the dense final phase's share of the mean."""
        options = {**self.options, **knobs}
        ratios = _projected_ratios(self.cm, self.full, options, early=False, steps=self.sparse_steps)
        early_ratios = _projected_ratios(self.cm, self.full, options, early=True) if self.early else ratios
        inter = _mean(_projected_ratios(self.cm, self.full, options, interleaved=True)) if self.inter else None
        total = (1.0 - self.dense - self.early) * _mean(ratios) + self.early * _mean(early_ratios)
        phase = self.phase_cost(k, inter)
        return total + phase, ratios, early_ratios, phase


def _solve_alast(cm, planner, policy, target, full, options) -> TargetSolution:
    """K as the closed form says (the fewest blocks trained with all tokens at or above the target),
    then a per-step ``target_flops`` the planner projects its budgets onto, lowered for the sparse
    steps when the dense final phase costs more, so the run's total lands on ``target``. Where the
    early steps, held to the others' memory, leave more than the other sparse steps can spend with
    every token, one block more trains."""
    run = _AlastRun.create(cm, full, options)
    ceiling = run.total(1.0, cm.num_blocks)
    if target > ceiling * (1 + TARGET_TOLERANCE):
        raise TargetError(f"target {target:g}x full FLOPs is above what policy {policy!r} spends with every block "
                          f"trained on every token: {ceiling:.3f}x at most (the embeddings stay frozen and the last "
                          "block skips the tokens the head does not read: policy.freeze_embeddings, "
                          f"policy.trim_last); ask for --target-flops {ceiling:.3f} or less", other_policy="full")
    k = run.choose_k(target)
    if run.total(BUDGET_FLOOR, k) > target * (1 + TARGET_TOLERANCE):
        raise run.floor_error(policy, target, k)
    sparse_target = (target - run.phase_cost(k)) / (1.0 - run.dense)
    if run.early and run.early_floor(k) > sparse_target * (1 + TARGET_TOLERANCE):
        raise TargetError(f"target {target:g}x full FLOPs is out of reach for policy {policy!r} with its early phase "
                          f"(policy.early_frac={run.early_frac:g}): training k_trained+1={min(cm.num_blocks, k + 1)} "
                          f"blocks costs {run.early_floor(k):.3f}x per step at the floor, above the "
                          f"{sparse_target:.3f}x the sparse steps may spend; lower early_frac or set it to 0")
    fits = [_fit(run, target, k)]
    while fits[-1].predicted < target * (1 - TARGET_TOLERANCE) and k < cm.num_blocks and (run.early or run.inter):
        k += 1
        fits.append(_fit(run, target, k))
    knobs, predicted, ratios, early_ratios, phase = min(reversed(fits), key=lambda f: _miss(f.predicted, target))
    k = knobs["k_trained"]
    # the run's total had it stopped after any number of simulated steps: a step spends what the
    # ones before left of the target, so their running mean, not one step, says where a run lands
    sparse = 1.0 - run.dense - run.early
    totals = [sparse * _mean(ratios[:n]) + run.early * _mean(early_ratios[:n]) + phase
              for n in range(1, len(ratios) + 1)]
    lo, hi = min(totals), max(totals)
    if _miss(predicted, target) > TARGET_TOLERANCE:
        tm, early = run.token_multiple, run.early
        hint = (f"ask for --target-flops {predicted:.3f}, or use more steps or a larger input"
                + (f", or a smaller backend.token_multiple (now {tm})" if tm > 1 else "")
                + (f", or set policy.early_frac=0 (its {early:.0%} of the steps hold their activation memory to the "
                   "others' by dropping tokens)" if early and _mean(early_ratios) < 0.95 * _mean(ratios) else ""))
        raise TargetError(f"policy {policy!r} cannot get within {TARGET_TOLERANCE:.0%} of {target:g}x full FLOPs "
                          f"with k_trained={k}: projecting the budgets gives {predicted:.3f}x (too few tokens or "
                          f"steps to divide finer); {hint}")
    return TargetSolution(policy, target, knobs, predicted, (lo, hi))


class _Fit(NamedTuple):
    """Knobs for one K, and their simulated run (see :meth:`_AlastRun.predict`)."""

    knobs: dict[str, Any]
    predicted: float
    ratios: list[float]
    early_ratios: list[float]
    phase: float


def _fit(run: _AlastRun, target: float, k: int) -> _Fit:
    """The knobs with ``k`` trained blocks whose simulated run lands nearest ``target``."""
    cm, options = run.cm, run.options
    own = full_step_flops(cm)  # the planner measures against its own cost model's full step
    knobs = {"k_trained": k, "b_init": float(options.get("b_init", B_INIT)),
             "b_min": float(options.get("b_min", B_MIN)), "b_max": float(options.get("b_max", B_MAX)),
             "min_tokens": run.min_tokens, "trim_last": run.trim}

    def knob(sparse_target: float) -> float:  # with LoRA the planner's own full step is the LoRA variant's
        return sparse_target if run.full == own else sparse_target * run.full / own

    def predict(sparse_target: float) -> tuple[float, list[float], list[float], float]:
        knobs["target_flops"] = knob(sparse_target)
        return run.predict(k, knobs)

    sparse_target = (target - run.phase_cost(k)) / (1.0 - run.dense)
    predicted, ratios, early_ratios, phase = predict(sparse_target)
    if run.early or run.inter:
        # The early steps (and the interleaved ones) peak no higher in memory than the others, so they
        # may spend less: the other sparse steps' target rises (and the caps with it) until the total
        # is on target.
        # Whole token counts make the total a step function, so the secant may circle the target:
        # the run takes the nearest point it visited (the latest of equals).
        points = [(sparse_target, predicted, ratios, early_ratios, phase)]
        for _ in range(EARLY_ROUNDS):
            (s0, p0, *_), (s1, p1, *_) = points[-2:] if len(points) > 1 else (points[0], points[0])
            if _miss(p1, target) < 1e-3:
                break
            slope = (p1 - p0) / (s1 - s0) if s1 != s0 and p1 != p0 else 1.0 - run.dense
            sparse_target = min(1.0, max(0.0, s1 + (target - p1) / slope))
            points.append((sparse_target, *predict(sparse_target)))
        sparse_target, predicted, ratios, early_ratios, phase = min(reversed(points), key=lambda p: _miss(p[1], target))
        # The simulated steps keep every budget at b_init, so their counts move together and a step of
        # few tokens falls short of its target. A run's budgets part after its first steps, its counts
        # then divide finer, and each step spends what the ones before left: its sparse steps may land
        # on their target. The target is held where that would not overshoot the run's by more than
        # CARRY_SLACK (9 patch tokens over 3 steps: a knob raised to 0.632 counted 0.576x at 0.5x).
        sparse = 1.0 - run.dense - run.early
        ceiling = (target * (1 + CARRY_SLACK) - run.early * _mean(early_ratios) - phase) / sparse if sparse > 0 \
            else sparse_target
        if sparse_target > ceiling:
            sparse_target = ceiling
            predicted, ratios, early_ratios, phase = predict(sparse_target)
        knobs["target_flops"] = knob(sparse_target)
    return _Fit(knobs, predicted, ratios, early_ratios, phase)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _projected_ratios(cm: CostModel, full: float, options: dict[str, Any], early: bool = False,
                      interleaved: bool = False, steps: int = PROJECTION_STEPS) -> list[float]:
    """Per-step train FLOPs / ``full`` of the planner's sparse steps (budgets at ``b_init``, its own
    trained-block draws, each step projected onto its target): those of its early phase (one block
    more trained, ``early_frac``), those interleaved in its dense final phase
    (``dense_final_interleave``), or the others."""
    accepted = set(planner_options("alast"))
    opts = {k: v for k, v in options.items() if k in accepted}
    opts["dense_final_frac"] = 0.5 if interleaved else 0.0
    period = interleave_period(opts.get("dense_final_interleave"))
    opts["early_frac"] = 0.5 if early else 0.0
    planner = create_planner("alast", cm.num_blocks, cost_model=cm, **opts)
    out = []
    for step in range(steps):
        step, progress = (period * step + period - 1, 0.75) if interleaved else (step, 0.0)
        budget = planner.plan(step, progress)
        out.append(step_flops(cm, StepShape.from_budget(budget, cm.num_patches), 1) / full)
    return out


def _floor_message(cm: CostModel, policy: str, target: float, floor: float, mt: int, shape: StepShape,
                   setting: str) -> str:
    """Say what the cheapest setting (one of its steps: ``shape``) still pays for, largest share first."""
    L, N = cm.num_blocks, cm.num_patches
    cost = step_cost(cm, shape, 1)
    full_width = next((i for i in range(L) if shape.tokens_in[i] < N), L)  # blocks 0.. that see every token
    block = [sum(b) for b in cost.per_block]
    wide, rest = sum(block[:full_width]), sum(block[full_width:])
    other = cost.train_flops - wide - rest

    def blocks(a: int, b: int) -> str:
        return f"block {a}" if a == b else f"blocks {a}-{b}"

    see = "sees" if full_width == 1 else "see"
    parts = [(wide, f"{blocks(0, full_width - 1)}, which {see} all {N} patch tokens"),
             (other, "the patch embedding and head")]
    if full_width < L:
        parts.append((rest, f"{blocks(full_width, L - 1)} at min_tokens={mt}"))
    parts.sort(key=lambda part: part[0], reverse=True)
    return (f"target {target:g}x full FLOPs is out of reach for policy {policy!r}: its cheapest setting ({setting}) "
            f"costs {floor:.3f}x, {parts[0][0] / cost.train_flops:.0%} of it in {parts[0][1]}; "
            "raise --target-flops" + (" or lower policy.min_tokens" if mt > 1 else ""))

