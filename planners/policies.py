"""Training policies: ALaST and the baselines it is compared against.

Every policy speaks the same :class:`~planners.types.Planner` protocol so one training loop runs
them all and comparisons are fair.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import rules
from .registry import PlannerError, register_planner
from .types import Budget, Observation


def _check_k(k: int | None, num_blocks: int) -> int:
    k = rules.default_k_trained(num_blocks) if k is None else int(k)
    if not 1 <= k <= num_blocks:
        raise PlannerError(f"k_trained must be between 1 and {num_blocks} (the model depth), got {k}")
    return k


class _Stateless:
    """Shared plumbing for policies whose only state is their options."""

    name = "?"

    def __init__(self, num_blocks: int, min_tokens: int = 1, seed: int = 0) -> None:
        if num_blocks < 1:
            raise PlannerError("a model needs at least one block")
        if min_tokens < 1:
            raise PlannerError(f"min_tokens must be >= 1, got {min_tokens}")
        self.num_blocks = num_blocks
        self.min_tokens = int(min_tokens)
        self.seed = int(seed)

    def observe(self, observation: Observation) -> None:
        if len(observation.deltas) not in (0, self.num_blocks):
            raise PlannerError(
                f"observation has {len(observation.deltas)} deltas for {self.num_blocks} blocks"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise PlannerError(f"planner state is for {state.get('name')!r}, not {self.name!r}")

    def _budget(self, ratios: Sequence[float], trained: Sequence[bool]) -> Budget:
        return Budget(tuple(ratios), tuple(trained), self.min_tokens, tuple(ratios))


@register_planner("full")
class FullPlanner(_Stateless):
    """Full fine-tuning: every token through every block, every block trained."""

    def plan(self, step: int, progress: float) -> Budget:
        return self._budget([1.0] * self.num_blocks, [True] * self.num_blocks)


class _KBlocks(_Stateless):
    """A policy that trains ``k_trained`` blocks per step (default ``round(0.75 L)``)."""

    def __init__(self, num_blocks: int, k_trained: int | None = None, min_tokens: int = 1,
                 seed: int = 0) -> None:
        super().__init__(num_blocks, min_tokens, seed)
        self.k_trained = _check_k(k_trained, num_blocks)


@register_planner("freeze")
class FreezePlanner(_KBlocks):
    """Static freezing: train only the last ``k_trained`` blocks, all tokens."""

    def plan(self, step: int, progress: float) -> Budget:
        first = self.num_blocks - self.k_trained
        return self._budget([1.0] * self.num_blocks, [i >= first for i in range(self.num_blocks)])


@register_planner("tokens")
class TokensPlanner(_Stateless):
    """Static token dropping: a fixed keep ratio per block (one number or one per block)."""

    def __init__(self, num_blocks: int, keep_ratio: float | Sequence[float] = 0.8,
                 min_tokens: int = 1, seed: int = 0) -> None:
        super().__init__(num_blocks, min_tokens, seed)
        ratios = [float(keep_ratio)] * num_blocks if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
        if len(ratios) != num_blocks:
            raise PlannerError(f"keep_ratio has {len(ratios)} entries for {num_blocks} blocks")
        if any(not 0.0 < r <= 1.0 for r in ratios):
            raise PlannerError(f"keep_ratio values must lie in (0, 1], got {ratios}")
        self.keep_ratios = ratios

    def plan(self, step: int, progress: float) -> Budget:
        return self._budget(self.keep_ratios, [True] * self.num_blocks)


@register_planner("random")
class RandomPlanner(_KBlocks):
    """``k_trained`` blocks drawn uniformly each step (from a (seed, step) generator), all tokens."""

    def plan(self, step: int, progress: float) -> Budget:
        rng = rules.step_rng(self.seed, step)
        chosen = set(rng.sample(range(self.num_blocks), self.k_trained))
        return self._budget([1.0] * self.num_blocks, [i in chosen for i in range(self.num_blocks)])


@register_planner("alast")
class AlastPlanner:
    """Adaptive Layer Selection (Devoto et al., arXiv 2408.08670).

    Budgets start at ``b_init`` and follow *changes* in each block's CLS delta:
    ``b_l <- clip(b_l + alpha * (delta_l - delta_prev_l), b_min, b_max)``. Each step the budget is
    also the block's token keep ratio, and ``k_trained`` blocks are trained: sampled without
    replacement from ``softmax(b)`` (``freeze_mode='sample'``) or the ``k_trained`` largest
    (``'topk'``).

    ``dense_final_frac`` (beyond the paper, default 0): in the last fraction of training every
    block sees all tokens again, so the model adapts to the full-token inputs it gets at
    evaluation and export. Freezing and budget updates continue unchanged.
    """

    name = "alast"

    def __init__(
        self,
        num_blocks: int,
        alpha: float = 1e-3,
        b_init: float = 0.9,
        b_min: float = 0.5,
        b_max: float = 1.0,
        k_trained: int | None = None,
        freeze_mode: str = "sample",
        delta_reduction: str = "mean",
        min_tokens: int = 1,
        seed: int = 0,
        dense_final_frac: float = 0.0,
    ) -> None:
        if not 0.0 <= dense_final_frac < 1.0:
            raise PlannerError(f"dense_final_frac must lie in [0, 1), got {dense_final_frac}")
        if not 0.0 < b_min <= b_max <= 1.0:
            raise PlannerError(f"need 0 < b_min <= b_max <= 1, got b_min={b_min}, b_max={b_max}")
        if not b_min <= b_init <= b_max:
            raise PlannerError(f"b_init={b_init} must lie in [b_min, b_max] = [{b_min}, {b_max}]")
        if alpha < 0:
            raise PlannerError(f"alpha must be >= 0, got {alpha}")
        if freeze_mode not in ("sample", "topk"):
            raise PlannerError(f"freeze_mode must be 'sample' or 'topk', got {freeze_mode!r}")
        if delta_reduction not in ("mean", "sum"):
            raise PlannerError(f"delta_reduction must be 'mean' or 'sum', got {delta_reduction!r}")
        if min_tokens < 1:
            raise PlannerError(f"min_tokens must be >= 1, got {min_tokens}")
        self.num_blocks = num_blocks
        self.alpha = float(alpha)
        self.b_init, self.b_min, self.b_max = float(b_init), float(b_min), float(b_max)
        self.k_trained = _check_k(k_trained, num_blocks)
        self.freeze_mode = freeze_mode
        self.delta_reduction = delta_reduction
        self.min_tokens = int(min_tokens)
        self.seed = int(seed)
        self.dense_final_frac = float(dense_final_frac)
        self.budgets = [self.b_init] * num_blocks
        self.prev_deltas = [0.0] * num_blocks

    def plan(self, step: int, progress: float) -> Budget:
        if self.freeze_mode == "topk":
            chosen = rules.top_k_indices(self.budgets, self.k_trained)
        else:
            rng = rules.step_rng(self.seed, step)
            chosen = rules.sample_without_replacement(rules.softmax(self.budgets), self.k_trained, rng)
        trained = tuple(i in chosen for i in range(self.num_blocks))
        ratios = tuple(self.budgets)
        if self.dense_final_frac and progress >= 1.0 - self.dense_final_frac:
            return Budget((1.0,) * self.num_blocks, trained, self.min_tokens, ratios)
        return Budget(ratios, trained, self.min_tokens, ratios)

    def observe(self, observation: Observation) -> None:
        deltas = list(observation.deltas)
        if len(deltas) != self.num_blocks:
            raise PlannerError(f"observation has {len(deltas)} deltas for {self.num_blocks} blocks")
        self.budgets = rules.update_budgets(
            self.budgets, deltas, self.prev_deltas, self.alpha, self.b_min, self.b_max
        )
        self.prev_deltas = deltas

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "budgets": list(self.budgets), "prev_deltas": list(self.prev_deltas)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise PlannerError(f"planner state is for {state.get('name')!r}, not {self.name!r}")
        if len(state["budgets"]) != self.num_blocks:
            raise PlannerError("planner state was saved for a model of another depth")
        self.budgets = [float(b) for b in state["budgets"]]
        self.prev_deltas = [float(d) for d in state["prev_deltas"]]
