"""What `alast bench` runs, in which order and for how many steps, and how two rows compare.

Pure functions on numbers and summaries (no torch), so the bench's arithmetic is unit-tested alone.

* Order: seed index i rotates the policy order by i (over several targets, the target groups by i
  and each group's policies by i + j), so a machine that drifts (thermal, a noisy neighbour) does
  not favour the policy that always runs first.
* Step counts: a compute-matched full fine-tuning run (``full@matched``) takes
  ``round(steps * train_flops / full_ft_train_flops)`` steps of the ALaST run it matches, from that
  run's counted FLOPs; full fine-tuning "by steps" at target t (``full@steps``) takes
  ``round(steps * t)``. The learning-rate schedule follows the shorter step count as in any run.
* Comparison: the mean accuracy difference of two rows and whether it exceeds their pooled std.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

MATCHED = "full@matched"
BY_STEPS = "full@steps"
FIXED_COST = ("lora",)  # no FLOPs knob and no step change: one point at its own cost


class RunSpec(NamedTuple):
    """One planned training run.

    ``target`` is the FLOPs target the row belongs to (None: none); ``solve`` says whether the
    planner sets the policy's knobs for it; ``steps`` overrides ``train.steps`` (None: the base's)."""

    policy: str
    seed: int
    target: float | None = None
    label: str | None = None
    steps: int | None = None
    solve: bool = False

    @property
    def name(self) -> str:
        """The row the run reports to: the label (``full@matched``, ``full@steps``) or the policy."""
        return self.label or self.policy

    def dir_name(self) -> str:
        """``<policy>[-t<target>]-seed<k>``, with ``+`` and ``@`` spelled ``-``."""
        tag = f"-t{self.target:g}" if self.target is not None else ""
        return f"{self.name.replace('+', '-').replace('@', '-')}{tag}-seed{self.seed}"


def _rotate(items: list[Any], k: int) -> list[Any]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def same_step_runs(policies: list[str], seeds: list[int], target: float | None,
                   target_policies: tuple[str, ...]) -> list[RunSpec]:
    """Every policy once per seed at the base step count; ``target`` goes to ``target_policies``."""
    runs = []
    for i, seed in enumerate(seeds):
        for policy in _rotate(list(policies), i):
            t = target if target is not None and policy in target_policies else None
            runs.append(RunSpec(policy, seed, t, solve=t is not None))
    return runs


def curve_runs(policies: list[str], seeds: list[int], targets: tuple[float, ...], steps: int) -> list[RunSpec]:
    """Runs for accuracy-versus-FLOPs curves: at each target, full fine-tuning by steps and every
    other policy with its knobs solved for the target; once per seed, full fine-tuning at all
    ``steps`` (the reference, unless 1 is a target) and each fixed-cost policy (``lora``)."""
    def group(target: float, seed: int) -> list[RunSpec]:
        out = []
        for p in policies:
            if p == "full":
                out.append(RunSpec("full", seed, target, BY_STEPS, scaled_steps(steps, target)))
            elif p not in FIXED_COST:
                out.append(RunSpec(p, seed, target, solve=True))
        return out

    runs: list[RunSpec] = []
    for i, seed in enumerate(seeds):
        reference = [] if 1.0 in targets else [RunSpec("full", seed, 1.0, BY_STEPS, steps)]
        reference += [RunSpec(p, seed) for p in policies if p in FIXED_COST]
        groups = [g for g in [group(t, seed) for t in targets] + [reference] if g]
        for j, g in enumerate(_rotate(groups, i)):
            runs += _rotate(g, i + j)
    return runs


def scaled_steps(steps: int, fraction: float) -> int:
    """Steps of full fine-tuning that cost ``fraction`` of ``steps`` (at least one)."""
    return max(1, round(steps * fraction))


def matched_steps(summary: dict[str, Any]) -> int:
    """Steps of full fine-tuning whose counted FLOPs equal those of the run ``summary`` describes:
    ``round(steps * train_flops / full_ft_train_flops)`` (full fine-tuning costs the same each step)."""
    flops, full, steps = summary.get("train_flops"), summary.get("full_ft_train_flops"), summary.get("steps")
    if not flops or not full or not steps:
        raise ValueError(f"a compute-matched run needs the {summary.get('policy')} run's counted FLOPs, but its "
                         f"summary has train_flops={flops}, full_ft_train_flops={full}; keep backend.count_flops on")
    return scaled_steps(int(steps), flops / full)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the values that are not None (std 0 for one value; None for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a`` minus mean of ``b``, their pooled sample std (None unless both have two or more
    values) and whether the difference exceeds it (None when the spread is unknown)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma is None or mb is None:
        raise ValueError("compare needs at least one value on each side")
    pooled = None
    if len(a) > 1 and len(b) > 1:
        pooled = math.sqrt(((len(a) - 1) * sa**2 + (len(b) - 1) * sb**2) / (len(a) + len(b) - 2))
    diff = ma - mb
    return {"a_mean": ma, "b_mean": mb, "diff": diff, "pooled_std": pooled, "n_a": len(a), "n_b": len(b),
            "exceeds_pooled_std": (abs(diff) > pooled) if pooled is not None else None}


def judgement(c: dict[str, Any]) -> str:
    """Words for a :func:`compare` result: above / below / level, and how it stands to the spread."""
    side = "above" if c["diff"] > 0 else "below" if c["diff"] < 0 else "level with"
    if c["exceeds_pooled_std"] is None:
        return f"{side} (one seed on a side: no spread to judge by)"
    if c["exceeds_pooled_std"]:
        return f"{side}, beyond the pooled std {100 * c['pooled_std']:.2f} pts"
    return f"{side} but within the pooled std {100 * c['pooled_std']:.2f} pts: no clear difference"
