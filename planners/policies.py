"""Training policies: ALaST and the baselines it is compared against.

Every policy speaks the same :class:`~planners.types.Planner` protocol so one training loop runs
them all and comparisons are fair.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import rules
from .checks import check_alast, check_early, check_k, check_multiple, check_spare
from .costmodel import CostModel
from .projection import TargetProjection
from .registry import PlannerError, register_planner
from .simulate import StepShape, bottom_flops, step_cost, step_flops
from .types import Budget, Observation


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

    frozen_bottom = 0  # the bottom blocks no step trains, each keeping every token (see AlastPlanner)

    def serves_cache(self, step: int, progress: float) -> bool:
        return self.frozen_bottom > 0


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
        self.k_trained = check_k(k_trained, num_blocks)


@register_planner("freeze")
class FreezePlanner(_KBlocks):
    """Static freezing: train only the last ``k_trained`` blocks, all tokens."""

    def plan(self, step: int, progress: float) -> Budget:
        first = self.num_blocks - self.k_trained
        return self._budget([1.0] * self.num_blocks, [i >= first for i in range(self.num_blocks)])

    @property
    def frozen_bottom(self) -> int:
        return self.num_blocks - self.k_trained


@register_planner("tokens")
class TokensPlanner(_Stateless):
    """Static token dropping: a fixed keep ratio per block (one number or one per block)."""

    def __init__(self, num_blocks: int, keep_ratio: float | Sequence[float] = 0.8,
                 min_tokens: int = 1, seed: int = 0, token_multiple: int = 1) -> None:
        super().__init__(num_blocks, min_tokens, seed)
        self.token_multiple = check_multiple(token_multiple)
        ratios = [float(keep_ratio)] * num_blocks if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
        if len(ratios) != num_blocks:
            raise PlannerError(f"policy.keep_ratio has {len(ratios)} entries for {num_blocks} blocks; give one value "
                               f"for all blocks, or {num_blocks} values, one per block")
        if any(not 0.0 < r <= 1.0 for r in ratios):
            raise PlannerError(f"keep_ratio values must lie in (0, 1], got {ratios}")
        self.keep_ratios = ratios

    def plan(self, step: int, progress: float) -> Budget:
        ratios = tuple(self.keep_ratios)
        return Budget(ratios, (True,) * self.num_blocks, self.min_tokens, ratios, self.token_multiple)


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

    Budgets start at ``b_init``, live in ``[b_min, b_max]`` and follow *changes* in each block's
    CLS delta. Each step the budget is also the block's token keep ratio, and ``k_trained`` blocks
    (default 9 of 12, :func:`planners.rules.default_k_trained`) are trained: sampled without
    replacement from ``softmax(b)`` (``freeze_mode='sample'``, the paper), the ``k_trained``
    largest (``'topk'``), or (beyond the paper) always the top ``k_trained`` blocks (``'last'``):
    with the embeddings frozen, the backward then stops below them, and the budgets spend the
    savings on tokens.

    ``rule='normalized'`` (default, scale-free): each step's deltas become shares of their mean
    over blocks, smoothed by an EMA (``ema``: the weight of the past). The first observations set a
    reference; a block's budget is ``b_init + gain * (change in log2 of its smoothed share since the
    reference, minus the mean change over blocks)``, clipped. So a block whose share of the CLS
    change doubles, relative to the others, keeps ``gain`` more of its tokens (default 0.1), on any
    model and at any learning rate; a change common to all blocks moves nothing. See
    :func:`planners.rules.normalized_budgets`.
    ``rule='paper'``: the literal ``b_l <- clip(b_l + alpha * (delta_l - delta_prev_l), b_min,
    b_max)`` with ``delta_prev = 0`` at the start; ``alpha`` is the learning rate in the paper
    (the caller passes it). Its step depends on the scale of the deltas.

    ``target_flops`` with ``cost_model`` (beyond the paper): each step's keep ratios are the budgets
    shifted by one common amount so the step's train FLOPs are ``target_flops`` x the full
    fine-tuning step of ``cost_model`` (see :mod:`planners.projection`); the budgets themselves
    still follow the deltas. Token counts are whole, so a step lands at or just below its target; the
    next sparse step's target carries the shortfall, and their mean lands on ``target_flops`` even
    with few patch tokens. ``Budget.budgets`` logs the raw budgets, ``keep_ratios`` the projected
    ones. ``cost_model`` alone changes nothing.

    ``spare_first`` (beyond the paper, default 0): the first ``spare_first`` blocks keep every token;
    dropping starts after them, and under a target the other blocks' shift pays for it.
    ``'frozen'``: with ``freeze_mode='last'``, the blocks below the trained ones. Their budgets
    stay at ``b_init`` (the rule compares frozen blocks only with each other, and with the
    embeddings frozen their class-token changes move only with the batch), a token costs them a
    forward only, and a token they drop is lost to every trained block above.

    ``trim_last`` (beyond the paper, for a model whose head reads only the prefix tokens): the last
    block's keep ratio is 0 in every step, dense final phase included, so it keeps ``min_tokens``
    patch tokens whose outputs nothing reads; a runtime that selects inside the block computes it
    for the kept tokens only. Its budget still follows its delta, and under a target the other
    blocks' shift spends the saving.

    ``early_frac`` (beyond the paper; progressive freezing as in FreezeOut, Brock et al. 2017), with
    ``freeze_mode='last'``: the first fraction of training trains ``k_trained + 1`` blocks, the one
    below the top ``k_trained`` too (with ``'frozen'`` sparing, it then drops tokens like the others),
    which then stays frozen. Under a target its steps spend at most the others' per-step FLOPs and
    peak at no more memory in the backward than an other sparse step does at ``b_init``, plus the
    weight gradients of the block they train more, which no token count buys back
    (``early_peak_cap``: the cost model's backward walk at ``batch_size``, the samples one device
    runs per step; None prices a large batch): each keeps fewer tokens, so that its activations
    fit in what the others' need, and the target solver raises the other steps' target to pay for
    what they do not spend. Without a target they cost one trained block more.

    ``dense_final_frac`` (beyond the paper): in the last fraction of training every block sees all
    tokens again, so the model adapts to the full-token inputs it gets at evaluation and export.
    ``dense_final_blocks`` says which blocks that phase trains: the top N (``'auto'``: a quarter of
    the depth) with the embeddings frozen, so the backward stops at the lowest of them and the
    phase needs few FLOPs and little activation memory; or ``'sampled'``, the ``k_trained`` blocks
    drawn as in the sparse phase, with the embeddings (the backward then runs through every block
    at full width). Budget updates continue unchanged.

    ``expect_cached`` (beyond the paper), with a target: the share of each step's images whose
    embeddings and :attr:`frozen_bottom` blocks the runtime reads from its cache instead of computing
    them. The sparse steps spend what that saves on tokens, evenly: each projects onto the target
    plus the mean saving over the sparse steps, so a step with fewer cached images spends above the
    target and one with more below it, and the run still lands on ``target_flops``.

    ``dense_final_interleave`` (beyond the paper): one step in N of the dense final phase (the last of
    every N; ``True``: N = 2, the odd steps) is a sparse step instead, so the blocks below the
    phase's top ones keep training to the end of the run. Its keep ratios are the budgets projected
    onto what a dense step of the phase costs (without a target: the budgets, as in the other sparse
    steps), and its backward peaks no higher than the phase's dense step or a sparse step at
    ``b_init``, whichever is higher: the phase costs the FLOPs and memory it costs without
    interleaving, and the other steps keep their tokens.
    """

    name = "alast"

    def __init__(
        self,
        num_blocks: int,
        alpha: float = 1e-3,
        b_init: float = rules.B_INIT,
        b_min: float = rules.B_MIN,
        b_max: float = rules.B_MAX,
        k_trained: int | None = None,
        freeze_mode: str = "sample",
        delta_reduction: str = "mean",
        min_tokens: int = 1,
        seed: int = 0,
        dense_final_frac: float = 0.0,
        dense_final_blocks: int | str = "auto",
        dense_final_interleave: bool | int = False,
        rule: str = "normalized",
        gain: float = 0.1,
        ema: float = 0.9,
        target_flops: float | None = None,
        cost_model: CostModel | None = None,
        spare_first: int | str = 0,
        token_multiple: int = 1,
        trim_last: bool = False,
        early_frac: float = 0.0,
        batch_size: int | None = None,
    ) -> None:
        check_alast(num_blocks, alpha, b_init, b_min, b_max, freeze_mode, delta_reduction, min_tokens,
                     dense_final_frac, rule, gain, ema, target_flops, cost_model)
        self.k_trained = check_k(k_trained, num_blocks, freeze_mode)
        self.early_frac = check_early(early_frac, dense_final_frac, freeze_mode)
        # the early steps train one block more (none where every block already trains)
        self.k_early = min(num_blocks, self.k_trained + 1) if self.early_frac else self.k_trained
        self.spare_first, self.spare_early = (check_spare(spare_first, num_blocks, k, freeze_mode)
                                              for k in (self.k_trained, self.k_early))
        self.trim_last = bool(trim_last)
        self.token_multiple = check_multiple(token_multiple)
        self.num_blocks = num_blocks
        self.rule = rule
        self.alpha, self.gain, self.ema = float(alpha), float(gain), float(ema)
        self.b_init, self.b_min, self.b_max = float(b_init), float(b_min), float(b_max)
        self.freeze_mode = freeze_mode
        self.delta_reduction = delta_reduction
        self.min_tokens = int(min_tokens)
        self.seed = int(seed)
        self.dense_final_frac = float(dense_final_frac)
        try:
            self.dense_top = rules.dense_final_top(num_blocks, dense_final_blocks)
        except ValueError as e:
            raise PlannerError(str(e)) from None
        try:
            self.interleave = rules.interleave_period(dense_final_interleave)
        except ValueError as e:
            raise PlannerError(str(e)) from None
        self.target_flops = None if target_flops is None else float(target_flops)
        if batch_size is not None and int(batch_size) < 1:
            raise PlannerError(f"batch_size must be >= 1 (the samples one device runs per step), got {batch_size}")
        self.projection = (None if self.target_flops is None else
                           TargetProjection(cost_model, self.target_flops, self.min_tokens,
                                            token_multiple=self.token_multiple, batch_size=batch_size))
        self.budgets = [self.b_init] * num_blocks
        self.prev_deltas = [0.0] * num_blocks
        # under a target, the sparse steps' FLOPs so far (ratios to full) and their count: each step
        # may spend what the ones before left of the target (see :meth:`_step_target`)
        self.spent, self.spent_steps = 0.0, 0
        self._early_targets: dict[tuple[bool, ...], float] = {}
        self.early_peak_cap = self._early_peak_cap(cost_model)
        # the runtime's cache of the frozen bottom blocks (expect_cached): per step, the share of the
        # images it reads; what the bottom blocks cost a sample, over full fine-tuning's; the mean share
        # over the sparse steps; and the FLOPs the sparse steps so far were planned to spend
        self.cached: list[float] = []
        self.bottom_ratio = self.cached_mean = 0.0
        self.planned = 0.0
        self._step = 0
        # the interleaved sparse steps of the dense final phase: the target and peak of its dense steps
        self._interleave_limits: dict[tuple[bool, ...], tuple[float, float]] = {}
        self.shares = rules.ShareState()
        # With freeze_mode 'last' the trained top blocks' CLS changes grow as they train while the
        # frozen ones' cannot: the normalized rule compares each block with its own kind only.
        self.share_groups = (tuple(int(i >= num_blocks - self.k_trained) for i in range(num_blocks))
                             if freeze_mode == "last" else None)

    def _early_peak_cap(self, cost_model: CostModel | None) -> float | None:
        """Under a target the early steps peak no higher in the backward than the others do at
        ``b_init``, but for the weight gradients of the one block they train more (None: no cap)."""
        if self.projection is None or self.k_early == self.k_trained:
            return None
        L = self.num_blocks
        main = tuple(i >= L - self.k_trained for i in range(L))
        ratios = self.projection.project([self.b_init] * L, main, self.spare_first, self.trim_last)
        # the extra block's weight gradients are the phase's price: no token count buys them back
        extra = cost_model.blocks[L - self.k_early].trainable_bytes
        return self.projection.peak_bytes(ratios, main) + extra

    @property
    def frozen_bottom(self) -> int:
        """The bottom blocks that no sparse step trains and that keep every token in it: every block below
        the top ``k_trained`` with ``freeze_mode='last'`` where ``spare_first`` spares them all (the
        default, ``'frozen'``), else 0. The early phase trains the top one of them; the dense final
        phase none, where it trains the top blocks."""
        bottom = self.num_blocks - self.k_trained
        # the cached output is the lowest trained block's input, which the step keeps for its backward
        # anyway; a spared block that is frozen above them would hold a batch's tokens the plan never priced
        return bottom if self.freeze_mode == "last" and self.spare_first == bottom else 0

    def serves_cache(self, step: int, progress: float) -> bool:
        """Whether step ``step`` leaves the :attr:`frozen_bottom` blocks untrained and whole, so a
        runtime may read and fill its cache of them (else the step trains one, and empties it)."""
        bottom = self.frozen_bottom
        if not bottom:
            return False
        if rules.in_dense_final(progress, self.dense_final_frac) and not rules.interleaved(step, self.interleave):
            return self.num_blocks - (self.dense_top or self.k_trained) >= bottom
        k = self.k_early if rules.in_early(progress, self.early_frac) else self.k_trained
        return self.num_blocks - k >= bottom

    def expect_cached(self, shares: Sequence[float], steps: int, start: int = 0) -> None:
        """Under a target, the sparse steps spend what the runtime's cache saves (see the class doc), in
        the dense final phase's steps too: ``shares[s]``, the share of step ``s``'s images it will read,
        of a run of ``steps`` steps, planned from step ``start`` on (a resumed run: its cache starts
        empty there; the steps before were spent and carried)."""
        if self.projection is None or not self.frozen_bottom:
            return
        self.bottom_ratio = bottom_flops(self.projection.cm, self.frozen_bottom) / self.projection.full_flops
        self.cached = [float(f) for f in shares]
        sparse = sum(not rules.in_early(s / steps, self.early_frac)
                     and not rules.in_dense_final(s / steps, self.dense_final_frac) for s in range(start, steps))
        # the sparse steps spend every step's saving, the dense final phase's too (whose steps the
        # target solver priced without the cache); a resumed run's remaining steps also repay what the
        # steps before were planned above the target, ahead of the reads a resume then lost
        ahead = self.planned - (self.target_flops or 0.0) * self.spent_steps
        self.cached_mean = (sum(self.cached[start:]) - ahead / self.bottom_ratio) / sparse if sparse else 0.0

    def plan(self, step: int, progress: float) -> Budget:
        self._step = step
        early = rules.in_early(progress, self.early_frac)
        if self.freeze_mode == "topk":
            chosen = rules.top_k_indices(self.budgets, self.k_trained)
        elif self.freeze_mode == "last":
            k = self.k_early if early else self.k_trained
            chosen = set(range(self.num_blocks - k, self.num_blocks))
        else:
            rng = rules.step_rng(self.seed, step)
            chosen = rules.sample_without_replacement(rules.softmax(self.budgets), self.k_trained, rng)
        trained = tuple(i in chosen for i in range(self.num_blocks))
        budgets = tuple(self.budgets)
        L = self.num_blocks
        last = (0.0,) if self.trim_last else ()  # the head reads none of the last block's patch tokens
        if rules.in_dense_final(progress, self.dense_final_frac):
            dense = (1.0,) * (L - len(last)) + last
            if rules.interleaved(step, self.interleave):
                return self._interleaved(budgets, trained, dense)
            top, embed = self._dense_step(trained)
            return Budget(dense, top, self.min_tokens, budgets, self.token_multiple, train_embeddings=embed)
        return self._sparse(budgets, trained, early)

    def _sparse(self, budgets: tuple[float, ...], trained: tuple[bool, ...], early: bool) -> Budget:
        """A sparse step: the budgets as keep ratios, projected onto the target where there is one."""
        L, last = self.num_blocks, (0.0,) if self.trim_last else ()
        if self.projection is not None and early:
            ratios = self.projection.project(budgets, trained, self.spare_early, self.trim_last, self.early_peak_cap,
                                             target=self._early_step_target(trained))
        elif self.projection is not None:
            share = self.cached[self._step] if self._step < len(self.cached) else 0.0
            saved = share * self.bottom_ratio
            planned = self.target_flops + self.bottom_ratio * (self.cached_mean - share)
            ratios = self.projection.project(budgets, trained, self.spare_first, self.trim_last,
                                             target=self._step_target(planned) + saved)
            self.spent += self.projection.ratio(ratios, trained) - saved
            self.spent_steps += 1
            self.planned += planned
        else:
            spare = self.spare_early if early else self.spare_first
            ratios = (1.0,) * spare + budgets[spare:L - len(last)] + last
        return Budget(ratios, trained, self.min_tokens, budgets, self.token_multiple)

    def _step_target(self, planned: float | None = None) -> float:
        """This sparse step's FLOPs target: what the plan gives it (``planned``; ``target_flops`` but for
        the cache's saving, :meth:`expect_cached`) plus what the sparse steps so far left of theirs (or
        minus what they spent above it), at most one step's target either way. A step's token counts
        are whole, so a projected step lands at or just below its target; carried over, the shortfall
        is spent by a later step and the steps' mean lands on ``target_flops`` however coarse the
        counts (with 9 patch tokens a step keeps all 9 or drops one in a block)."""
        carry = self.planned - self.spent
        planned = self.target_flops if planned is None else planned
        return planned + min(self.target_flops, max(-self.target_flops, carry))

    def _early_step_target(self, trained: tuple[bool, ...]) -> float:
        """An early step's FLOPs target: what the target solver planned for it, its cost with every
        budget at ``b_init`` under the early peak cap (the solver raises the other steps' target to
        pay for what it leaves). Once the budgets part, the cap alone could let an early step keep
        more tokens and spend what the plan gave the other steps. Not carried: a shortfall spent at
        once by the first sparse step would peak above every other step."""
        if trained not in self._early_targets:
            b = (self.b_init,) * self.num_blocks
            ratios = self.projection.project(b, trained, self.spare_early, self.trim_last, self.early_peak_cap)
            self._early_targets[trained] = self.projection.ratio(ratios, trained)
        return self._early_targets[trained]

    def _dense_step(self, trained: tuple[bool, ...]) -> tuple[tuple[bool, ...], bool]:
        """The trained blocks and embeddings of the dense final phase's dense step (``trained``: the
        sparse draw, which the phase trains where ``dense_final_blocks`` is 'sampled')."""
        if self.dense_top is None:
            return trained, True
        return tuple(i >= self.num_blocks - self.dense_top for i in range(self.num_blocks)), False

    def _interleaved(self, budgets: tuple[float, ...], trained: tuple[bool, ...],
                     dense: tuple[float, ...]) -> Budget:
        """A sparse step inside the dense final phase (``dense_final_interleave``)."""
        if self.projection is None:
            return self._sparse(budgets, trained, early=False)
        L = self.num_blocks
        if trained not in self._interleave_limits:
            top, embed = self._dense_step(trained)
            shape = StepShape.from_budget(Budget(dense, top, self.min_tokens, dense, self.token_multiple, embed),
                                          self.projection.cm.num_patches)
            dense_ratio = step_flops(self.projection.cm, shape, 1) / self.projection.full_flops
            dense_peak = step_cost(self.projection.cm, shape, self.projection.batch_size).bwd_peak_bytes
            sparse = self.projection.project((self.b_init,) * L, trained, self.spare_first, self.trim_last)
            peak = max(dense_peak, self.projection.peak_bytes(sparse, trained))
            self._interleave_limits[trained] = (dense_ratio, peak)
        target, peak = self._interleave_limits[trained]
        ratios = self.projection.project(budgets, trained, self.spare_first, self.trim_last, peak, target=target)
        return Budget(ratios, trained, self.min_tokens, budgets, self.token_multiple)

    def observe(self, observation: Observation) -> None:
        deltas = [float(d) for d in observation.deltas]
        if len(deltas) != self.num_blocks:
            raise PlannerError(f"observation has {len(deltas)} deltas for {self.num_blocks} blocks")
        if self.rule == "paper":
            self.budgets = rules.update_budgets(
                self.budgets, deltas, self.prev_deltas, self.alpha, self.b_min, self.b_max
            )
        else:
            self.shares = rules.normalized_update(self.shares, deltas, self.ema)
            if self.shares.count:
                self.budgets = rules.normalized_budgets(self.shares, self.b_init, self.gain, self.b_min, self.b_max,
                                                        self.share_groups)
        self.prev_deltas = deltas

    def state_dict(self) -> dict[str, Any]:
        state = {"name": self.name, "rule": self.rule, "budgets": list(self.budgets),
                 "prev_deltas": list(self.prev_deltas), "k_trained": self.k_trained,
                 "spent": self.spent, "spent_steps": self.spent_steps, "planned": self.planned}
        if self.rule == "normalized":
            state.update(shares=list(self.shares.shares), reference=list(self.shares.reference),
                         observations=self.shares.count)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A state without ``rule`` predates the normalized rule and
        loads into ``rule='paper'`` only."""
        if state.get("name") != self.name:
            raise PlannerError(f"planner state is for {state.get('name')!r}, not {self.name!r}")
        if len(state["budgets"]) != self.num_blocks:
            raise PlannerError("planner state was saved for a model of another depth")
        saved_rule = state.get("rule", "paper")
        if saved_rule != self.rule:
            raise PlannerError(f"planner state was saved with rule={saved_rule!r}, this planner has "
                               f"rule={self.rule!r}; resume with rule={saved_rule!r}")
        saved_k = state.get("k_trained", self.k_trained)  # states from before it was saved: unchecked
        if saved_k != self.k_trained:
            raise PlannerError(f"planner state was saved with k_trained={saved_k}, this planner trains "
                               f"{self.k_trained} blocks (the default K changed since the run started); "
                               "resume it with the alast version that started it, or start a new run")
        self.budgets = [float(b) for b in state["budgets"]]
        self.prev_deltas = [float(d) for d in state["prev_deltas"]]
        # states from before the carried target start its count again
        self.spent, self.spent_steps = float(state.get("spent", 0.0)), int(state.get("spent_steps", 0))
        # states from before the cache's saving was planned: every sparse step was planned at the target
        self.planned = float(state.get("planned", (self.target_flops or 0.0) * self.spent_steps))
        if self.rule == "normalized":
            self.shares = rules.ShareState(tuple(float(s) for s in state["shares"]),
                                           tuple(float(r) for r in state["reference"]),
                                           int(state["observations"]))
