"""Simulate a training run on a :class:`~planners.costmodel.CostModel`: FLOPs, peak memory, time.

Three ways to get the sequence of step shapes (tokens per block, trained blocks):
  * ``exact`` - deterministic policies (full, freeze, tokens, random with its seeded draws): the
    planner itself is run for every step;
  * ``expected`` - alast, whose budgets follow data-dependent CLS deltas: the planner is run with the
    budgets held at ``b_init`` (its trained-block draws use the run's seed), and again at ``b_min``
    and ``b_max`` for the [min, max] range; with ``target_flops`` each step is projected onto the
    target, so the range is tight;
  * ``trace`` - the tokens and trained blocks a real run logged in ``metrics.jsonl``.

A step's costs follow the runtime exactly: every block runs forward on the tokens entering it; a
block that drops tokens also computes CLS-attention scores, and where the cost model says it
selects them inside (:class:`~planners.costmodel.DropCost`) it costs what its kept tokens cost; the backward state of each block
depends on whether it is trained and whether anything below it (a trained block, or the trainable
patch embedding) needs a gradient. No torch.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .costmodel import EMBED, CostModel, poly, poly2
from .countfit import StepCounts
from .registry import create_planner
from .rules import MemoryProbes, flop_count_keys, kept_token_counts, schedule_from_steps, schedule_window
from .types import Observation


@dataclass(frozen=True)
class StepShape:
    """What one step runs: patch tokens entering/leaving each block, the trained blocks, and whether
    the embeddings are trained this step (where the cost model's embeddings are trainable at all)."""

    tokens_in: tuple[int, ...]
    kept_tokens: tuple[int, ...]
    trained: tuple[bool, ...]
    embed_trained: bool = True
    # the bottom blocks the step starts above, read from a runtime's cache for some of its images
    # (0: it runs every block); the embeddings' output is then never alive (:func:`_forward_peak`)
    cached: int = 0
    # the share of its images read so: their forward there is neither run nor timed (:class:`RunAccumulator`);
    # the costs of steps that differ in it alone are the same otherwise, so it is left out of comparisons
    read: float = field(default=0.0, compare=False)

    @classmethod
    def from_budget(cls, budget: Any, num_patches: int) -> "StepShape":
        tin, tout = kept_token_counts(budget.keep_ratios, num_patches, budget.min_tokens, budget.token_multiple)
        return cls(tin, tout, tuple(budget.trained), bool(budget.train_embeddings))

    @classmethod
    def from_record(cls, rec: dict[str, Any], num_blocks: int) -> "StepShape":
        trained = set(int(i) for i in rec["trained_blocks"])
        return cls(tuple(int(t) for t in rec["tokens_in"]), tuple(int(t) for t in rec["kept_tokens"]),
                   tuple(i in trained for i in range(num_blocks)), bool(rec.get("embeddings_trained", True)))


def block_states(trained: Sequence[bool], embed_trainable: bool) -> list[str]:
    """Backward state of each block (see :mod:`planners.costmodel`)."""
    states, below = [], embed_trainable
    for t in trained:
        if t:
            states.append("weights_and_input" if below else "weights_only")
        else:
            states.append("input_only" if below else "none")
        below = below or t
    return states


@dataclass(frozen=True)
class StepCost:
    """One step's costs for the whole (per-device) batch."""

    fwd_flops: float
    bwd_flops: float
    select_blocks: int
    bwd_blocks: int
    bwd_peak_bytes: float  # activations + gradients in flight at the backward's peak (what the early cap holds)
    act_bytes: float  # the activations the blocks save for the backward
    grad_bytes: float
    opt_temp_bytes: float
    trained_params: tuple[int, ...]  # per block, 0 when frozen
    per_block: tuple[tuple[float, float, float], ...]  # (fwd, bwd, select) flops
    peak_bytes: float  # the step's: the larger of the forward's peak and the backward's

    @property
    def train_flops(self) -> float:
        return self.fwd_flops + self.bwd_flops

    def time_features(self) -> dict[str, float]:
        return {"step": 1.0, "fwd_flops": self.fwd_flops, "bwd_flops": self.bwd_flops,
                "select_blocks": float(self.select_blocks), "bwd_blocks": float(self.bwd_blocks)}


def _flops(cm: CostModel, shape: StepShape, batch: int, states: Sequence[str], embed_on: bool
           ) -> tuple[float, float, list[tuple[float, float, float]], list[float]]:
    """A step's forward and backward FLOPs, each block's ``(forward, backward, scores)`` and the
    bytes each block saves for its backward (:func:`step_cost`)."""
    p = cm.num_prefix_tokens
    fwd = cm.embed.fwd_flops[0] * batch
    bwd = cm.embed.bwd_flops["weights_only"][0] * batch if embed_on else 0.0
    per_block, acts = [], []
    for blk, state, n_in, n_out in zip(cm.blocks, states, shape.tokens_in, shape.kept_tokens):
        n = p + n_in
        if n_out < n_in:
            f, b, s, a = (v * batch for v in blk.dropping(state, n, p + n_out))
        else:
            f, b, s = blk.forward_flops(n) * batch, blk.backward_flops(state, n) * batch, 0.0
            a = blk.saved_bytes(state, n) * batch
        per_block.append((f, b, s))
        acts.append(a)
        fwd += f + s
        bwd += b
    n_final = p + shape.kept_tokens[-1]
    fwd += poly(cm.head.fwd_flops, n_final) * batch
    head_state = "weights_and_input" if any(st != "none" for st in states) or embed_on else "weights_only"
    bwd += poly(cm.head.bwd_flops[head_state], n_final) * batch
    return fwd, bwd, per_block, acts


def step_flops(cm: CostModel, shape: StepShape, batch: int) -> float:
    """``step_cost(cm, shape, batch).train_flops``, the same sums, without the memory peaks and the
    optimizer's temporaries (less than half the time: the target projection asks for it dozens of
    times a step)."""
    embed_on = cm.embed.trainable and shape.embed_trained
    fwd, bwd, _, _ = _flops(cm, shape, batch, block_states(shape.trained, embed_on), embed_on)
    return fwd + bwd


def step_cost(cm: CostModel, shape: StepShape, batch: int, grads_held: bool = False) -> StepCost:
    """Costs of one step of ``batch`` samples with the given shape. ``grads_held``: a later pass of
    a step that accumulates gradients (``train.micro_batch_size``): the trained parameters' gradients
    are alive from its start (its forward holds them; its backward adds to them in place)."""
    embed_on = cm.embed.trainable and shape.embed_trained
    states = block_states(shape.trained, embed_on)
    fwd, bwd, per_block, acts = _flops(cm, shape, batch, states, embed_on)
    select_blocks = sum(n_out < n_in for n_in, n_out in zip(shape.tokens_in, shape.kept_tokens))
    bwd_blocks = sum(state != "none" for state in states)
    grad = cm.head.trainable_bytes + (cm.embed.trainable_bytes if embed_on else 0)
    largest = max(cm.head.largest_trainable_bytes, cm.embed.largest_trainable_bytes if embed_on else 0)
    trained_params = []
    for blk, t in zip(cm.blocks, shape.trained):
        trained_params.append(blk.trainable_params if t else 0)
        if t:
            grad += blk.trainable_bytes
            largest = max(largest, blk.largest_trainable_bytes)
    n_final = cm.num_prefix_tokens + shape.kept_tokens[-1]
    saved = cm.embed.act_bytes[0] * batch if embed_on else 0.0  # what the embeddings keep for their backward
    bwd_peak = _backward_peak(cm, states, shape, acts, batch, n_final, saved, grad if grads_held else None)
    fwd_peak = _forward_peak(cm, states, shape, acts, batch, saved)
    if grads_held and fwd_peak is not None:
        fwd_peak += grad
    opt_temp = grad if cm.memory.optimizer_temp == "all_trained" else _adamw_temp(cm, shape, embed_on, largest)
    return StepCost(fwd, bwd, select_blocks, bwd_blocks, bwd_peak, float(sum(acts)), float(grad), float(opt_temp),
                    tuple(trained_params), tuple(per_block), max(bwd_peak, fwd_peak or 0.0))


def _adamw_temp(cm: CostModel, shape: StepShape, embed_on: bool, largest: int) -> float:
    """What single-tensor AdamW allocates at most beyond the state, stepping the parameters with a
    gradient one by one (:attr:`~planners.costmodel.MemoryModel.opt_groups`); without the groups
    (a version-2 or 3 model), twice the largest."""
    if not cm.memory.opt_groups:
        return 2.0 * largest
    worst = 0
    for group in cm.memory.opt_groups:
        prev = 0
        for owner, size in group:
            if (shape.trained[owner] if owner >= 0 else embed_on if owner == EMBED else cm.head.trainable):
                worst, prev = max(worst, prev + 2 * size), size
    return float(worst)


def _forward_peak(cm: CostModel, states: list[str], shape: StepShape, acts: list[float], batch: int,
                  embed: float) -> float | None:
    """Bytes alive at the worst moment of the forward, walking the blocks up: what the blocks below
    saved, the block's input and what its forward holds beyond it; the first block's input too
    where that block saves nothing (the caller holds it until the last block returns), unless the
    step starts above the cached bottom blocks (``shape.cached``); and what
    the torch runtime keeps once the first block has run, the class token's rows
    (:attr:`~planners.costmodel.MemoryModel.record_bytes_per_sample`, to the optimizer step)
    and the float32 scores of every dropping block's tokens (until the backward starts). ``embed``:
    what the embeddings saved (nothing where they do not train). None for a cost model without
    forward events (version 2 or 3)."""
    p, per_token = cm.num_prefix_tokens, 4 * batch * cm.embed_dim  # an fp32 activation, per token
    below = embed
    held = per_token * (p + shape.tokens_in[0]) if states[0] == "none" and not shape.cached else 0.0
    peak = 0.0
    for i, (blk, state) in enumerate(zip(cm.blocks, states)):
        n_in, n_out = p + shape.tokens_in[i], p + shape.kept_tokens[i]
        excess = blk.forward_excess(state, n_in, n_out, batch)
        if excess is None:
            return None
        if i >= shape.cached:  # the step starts above the cached blocks (their misses run before it)
            peak = max(peak, below + per_token * n_in + excess)
        if i == 0:
            below += held + cm.memory.record_bytes_per_sample * batch
        below += acts[i] + (4 * n_in * batch if n_out < n_in else 0.0)
    return peak


def _backward_peak(cm: CostModel, states: list[str], shape: StepShape, acts: list[float], batch: int,
                   n_final: int, embed: float, held: float | None = None) -> float:
    """Bytes alive at the worst moment of the backward, walking it from the head down: the
    activations not yet consumed, the gradients of the blocks already done, and the block's own
    gradients in flight (the one arriving at its output and what its backward allocates). ``embed``:
    what the embeddings saved (nothing where they do not train). ``held``: the bytes of every
    trained gradient, alive from the start (a later pass of an accumulating step)."""
    p, grad_bytes = cm.num_prefix_tokens, 4 * batch * cm.embed_dim  # an fp32 gradient, per token
    embed += cm.memory.record_bytes_per_sample * batch
    remaining = sum(acts)
    grads_done = float(cm.head.trainable_bytes if held is None else held)
    peak = embed + poly(cm.head.act_bytes, n_final) * batch + remaining + grads_done
    for i in reversed(range(len(cm.blocks))):
        blk, state = cm.blocks[i], states[i]
        if state != "none":
            n_in, n_out = p + shape.tokens_in[i], p + shape.kept_tokens[i]
            transient = (blk.dropping_transient(state, n_in, n_out, batch) if n_out < n_in
                         else blk.transient(state, n_in, batch))
            # a version-4 transient holds the gradient arriving at the block's output until it frees it
            arriving = 0.0 if blk.bwd_events is not None else n_out * grad_bytes
            peak = max(peak, embed + remaining + grads_done + arriving + transient)
        remaining -= acts[i]
        if shape.trained[i] and held is None:
            grads_done += blk.trainable_bytes
    return peak


@dataclass
class Prediction:
    """What a run is predicted to cost. Times are None without a time model."""

    policy: str
    method: str
    steps: int
    batch_size: int
    train_flops: float
    fwd_flops: float
    bwd_flops: float
    peak_memory_bytes: float
    step_time_s: float | None
    time_s: float | None
    time_method: str
    peak_memory_sampled_bytes: float | None = None  # the peak over the steps a runtime samples
    train_flops_range: tuple[float, float] | None = None
    peak_memory_range: tuple[float, float] | None = None
    time_range: tuple[float, float] | None = None
    per_block: dict[str, list[float]] = field(default_factory=dict)
    knobs: dict[str, Any] = field(default_factory=dict)
    eval_kept_tokens: tuple[int, ...] | None = None  # the token schedule of the final steps (None: every token)
    # a forward on it, over one on every token: as the deployed model runs it, set by the caller
    # that knows how (``alast.planning.plan``; the training cost model may run blocks otherwise)
    inference_flops_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunAccumulator:
    """Folds step costs, in order, into totals, the peak memory and the time."""

    def __init__(self, cm: CostModel, batch_per_device: int) -> None:
        self.cm = cm
        self.batch = batch_per_device
        self.fwd = self.bwd = 0.0
        self.steps = 0
        self.peak = 0.0
        self.step_peaks: list[float] = []
        self.times: list[float] = []
        self.counted = StepCounts()  # the step pieces a torch runtime has counted FLOPs of, and can solve
        self.probes = MemoryProbes()
        self.ever = [False] * cm.num_blocks
        self.ever_other = False
        self.kept: list[tuple[int, ...]] = []
        self.trim_last = False  # the last block's kept count is a trim, not part of the token schedule
        self.sums = {"tokens_in": [0.0] * cm.num_blocks, "trained": [0.0] * cm.num_blocks,
                     "fwd_flops": [0.0] * cm.num_blocks, "bwd_flops": [0.0] * cm.num_blocks,
                     "select_flops": [0.0] * cm.num_blocks}

    def _beside_training(self, shape: StepShape) -> dict[str, bool]:
        """What the torch runtime does in this step beside training: its first step, a step counted
        under the FLOP counter (a piece neither counted before nor solvable from counted ones), a step
        whose CPU memory it measures."""
        tm = self.cm.time
        embeddings = shape.embed_trained and self.cm.embed.trainable
        blocks, rest = flop_count_keys(self.batch, shape.tokens_in, shape.kept_tokens, shape.trained, embeddings)
        counted = tm.count_flops == "every" and not self.counted.known((blocks, rest))
        if counted:
            self.counted.record((blocks, rest))
        probed = tm.device.startswith("cpu") and self.probes(self.steps, shape.tokens_in, sum(shape.trained))
        return {"first": self.steps == 0, "counted": counted, "probed": probed}

    def _opt_state(self) -> float:
        cm, per = self.cm, self.cm.memory.opt_state_bytes_per_param / 4
        other = cm.head.trainable_bytes + (cm.embed.trainable_bytes if cm.embed.trainable else 0)
        total = other if self.ever_other else 0.0
        total += sum(b.trainable_bytes for b, e in zip(cm.blocks, self.ever) if e)
        return total * per

    def add(self, shape: StepShape, cost: StepCost, flops_scale: float = 1.0) -> None:
        mem = self.cm.memory
        static = mem.param_bytes + mem.buffer_bytes + mem.input_bytes_per_sample * self.batch
        before = static + self._opt_state()
        self.ever = [e or t for e, t in zip(self.ever, shape.trained)]
        self.ever_other = True
        after = static + self._opt_state()
        # the optimizer steps with the gradients and the runtime's class-token rows alive
        records = mem.record_bytes_per_sample * self.batch
        step_peak = max(before + cost.peak_bytes + mem.rope_bytes,
                        after + cost.grad_bytes + cost.opt_temp_bytes + records)
        self.step_peaks.append(step_peak)
        self.peak = max(self.peak, step_peak)
        # the images read from a cache ran none of the cached part's forward
        saved = shape.read * self.batch * bottom_flops(self.cm, shape.cached) if shape.read else 0.0
        self.fwd += (cost.fwd_flops - saved) * flops_scale
        self.bwd += cost.bwd_flops * flops_scale
        if self.cm.time is not None:
            features = cost.time_features()
            features["fwd_flops"] -= saved
            self.times.append(self.cm.time.step_time_s(features, **self._beside_training(shape)))
        self.kept.append(shape.kept_tokens)
        for i, (f, b, s) in enumerate(cost.per_block):
            self.sums["tokens_in"][i] += shape.tokens_in[i]
            self.sums["trained"][i] += shape.trained[i]
            self.sums["fwd_flops"][i] += f * flops_scale
            self.sums["bwd_flops"][i] += b * flops_scale
            self.sums["select_flops"][i] += s * flops_scale
        self.steps += 1

    def result(self, policy: str, method: str, batch_size: int) -> Prediction:
        n = max(self.steps, 1)
        tm = self.cm.time
        kept = schedule_from_steps(self.kept[-schedule_window(self.steps):],
                                   self.cm.num_patches if self.trim_last else None)
        if kept is not None and all(k >= self.cm.num_patches for k in kept):
            kept = None
        return Prediction(
            policy=policy, method=method, steps=self.steps, batch_size=batch_size,
            train_flops=self.fwd + self.bwd, fwd_flops=self.fwd, bwd_flops=self.bwd,
            peak_memory_bytes=self.peak,
            step_time_s=statistics.median(self.times) if self.times else None,
            time_s=sum(self.times) if self.times else None,
            time_method=(tm.note or tm.method) if tm is not None else "none (pass --calibrate or --throughput)",
            per_block={k: [v / n for v in vals] for k, vals in self.sums.items()},
            eval_kept_tokens=kept,
        )


def run_shapes(cm: CostModel, shapes: Iterable[tuple[StepShape, int]], policy: str, method: str,
               batch_size: int, world_size: int = 1, sampled: Sequence[int] | None = None,
               trim_last: bool = False, micro_batch: int | None = None) -> Prediction:
    """Fold ``(shape, global batch)`` pairs; memory is per device (batch / world_size). ``sampled``:
    positions of the steps whose memory a runtime measures (their peak is reported too).
    ``trim_last``: the steps trimmed the last block (see :func:`planners.rules.schedule_from_steps`).
    ``micro_batch``: a device's step runs in passes of at most this many samples, its gradients
    accumulated: the activations are a pass's (a later pass's, with every trained gradient alive)."""
    acc = RunAccumulator(cm, max(1, batch_size // world_size))
    acc.trim_last = trim_last
    cache: dict[tuple[StepShape, int], StepCost] = {}
    for shape, batch in shapes:
        per_device = max(1, batch // world_size)
        key = (shape, per_device)
        if key not in cache:
            cache[key] = _accumulated(cm, shape, per_device, micro_batch)
        acc.batch = per_device
        acc.add(shape, cache[key], flops_scale=batch / per_device)
    pred = acc.result(policy, method, batch_size)
    if sampled is not None:
        peaks = [acc.step_peaks[i] for i in sampled if 0 <= i < len(acc.step_peaks)]
        pred.peak_memory_sampled_bytes = max(peaks) if peaks else None
    return pred


def _accumulated(cm: CostModel, shape: StepShape, batch: int, micro_batch: int | None) -> StepCost:
    """:func:`step_cost` of ``batch`` samples run in passes of at most ``micro_batch``: the whole
    batch's FLOPs, the memory of a later pass (which :func:`step_cost` ``grads_held`` gives)."""
    cost = step_cost(cm, shape, batch)
    if micro_batch is None or micro_batch >= batch:
        return cost
    later = step_cost(cm, shape, micro_batch, grads_held=True)
    return replace(cost, bwd_peak_bytes=later.bwd_peak_bytes, act_bytes=later.act_bytes, peak_bytes=later.peak_bytes)


def planner_shapes(cm: CostModel, planner_name: str, options: dict[str, Any], steps: int,
                   batch_size: int, cached: Sequence[float] | None = None) -> Iterable[tuple[StepShape, int]]:
    """Run the planner for ``steps`` steps with zero deltas (alast budgets stay where they start).
    A ``target_flops`` option without a ``cost_model`` projects on ``cm``. ``cached``: per step, the
    share of its images whose frozen bottom blocks a runtime reads from its cache (the planner's
    ``expect_cached``)."""
    if options.get("target_flops") is not None and options.get("cost_model") is None:
        options = {**options, "cost_model": cm}
    planner = create_planner(planner_name, cm.num_blocks, **options)
    if cached is not None and hasattr(planner, "expect_cached"):
        planner.expect_cached(cached, steps)
    depth = getattr(planner, "frozen_bottom", 0) if cached is not None else 0
    zeros = (0.0,) * cm.num_blocks
    for step in range(steps):
        progress = step / steps
        budget = planner.plan(step, progress)
        shape = StepShape.from_budget(budget, cm.num_patches)
        yield (replace(shape, cached=depth, read=cached[step]) if depth and cached[step] > 0 else shape), batch_size
        planner.observe(Observation(step, progress, zeros))


def simulate(cm: CostModel, planner_name: str, options: dict[str, Any], steps: int, batch_size: int,
             policy: str | None = None, micro_batch: int | None = None,
             cached: tuple[Sequence[float], int] | None = None) -> Prediction:
    """Predict a run of ``planner_name`` with planner ``options``; alast gets a [min, max] range.
    ``micro_batch``: see :func:`run_shapes`. ``cached``: ``(shares, depth)``, per step the share of its
    images whose embeddings and first ``depth`` blocks a runtime reads from its cache instead of
    computing them (:func:`planner_shapes`; their forward FLOPs are not spent)."""
    policy = policy or planner_name
    shares = None if cached is None else cached[0]
    if planner_name != "alast":
        return run_shapes(cm, planner_shapes(cm, planner_name, options, steps, batch_size, shares), policy, "exact",
                          batch_size, micro_batch=micro_batch)
    trim = bool(options.get("trim_last"))
    pred = run_shapes(cm, planner_shapes(cm, "alast", options, steps, batch_size, shares), policy, "expected",
                      batch_size, trim_last=trim, micro_batch=micro_batch)
    bounds = []
    for b in (options.get("b_min", 0.5), options.get("b_max", 1.0)):
        held = {**options, "b_init": b, "b_min": b, "b_max": b}
        bounds.append(run_shapes(cm, planner_shapes(cm, "alast", held, steps, batch_size, shares), policy, "bound",
                                 batch_size, trim_last=trim, micro_batch=micro_batch))
    lo, hi = bounds
    pred.train_flops_range = (lo.train_flops, hi.train_flops)
    pred.peak_memory_range = (lo.peak_memory_bytes, hi.peak_memory_bytes)
    if lo.time_s is not None and hi.time_s is not None:
        pred.time_range = (lo.time_s, hi.time_s)
    return pred


def replay(cm: CostModel, records: Sequence[dict[str, Any]], policy: str = "trace", world_size: int = 1,
           memory_sampled: Callable[[int], bool] | None = None, trim_last: bool = False,
           micro_batch: int | None = None, cached_depth: int = 0) -> Prediction:
    """Predict exactly what the logged steps cost (``metrics.jsonl`` records, in step order).
    ``memory_sampled(step)`` says which steps the runtime measured memory on; ``micro_batch``: see
    :func:`run_shapes`; ``cached_depth``: the bottom blocks a step that read images from the
    runtime's cache (``cached_images``) started above; those images' forward there is neither counted
    nor timed."""
    if not records:
        raise ValueError("the trace has no steps")
    batch = int(records[0].get("batch_size", 1))

    def shape(r: dict[str, Any]) -> StepShape:
        s = StepShape.from_record(r, cm.num_blocks)
        read = int(r.get("cached_images", 0))
        return replace(s, cached=cached_depth, read=read / int(r.get("batch_size", batch))) if cached_depth and read else s

    shapes = ((shape(r), int(r.get("batch_size", batch))) for r in records)
    sampled = None
    if memory_sampled is not None and any("memory_measured" in r for r in records):
        # the runtime logged which steps it measured
        sampled = [i for i, r in enumerate(records) if r.get("memory_measured")]
    elif memory_sampled is not None:
        sampled = [i for i, r in enumerate(records) if memory_sampled(int(r["step"]))]
    return run_shapes(cm, shapes, policy, "trace", batch, world_size, sampled, trim_last, micro_batch)


# -- expected costs in closed form (for the target solver) ------------------------------------------
def state_probabilities(num_blocks: int, k: int, embed_trainable: bool) -> list[dict[str, float]]:
    """Per block, the probability of each backward state when ``k`` of the blocks are trained,
    drawn uniformly without replacement (ALaST's draw from softmax of equal budgets)."""
    total = math.comb(num_blocks, k)
    out = []
    for l in range(num_blocks):
        p_tr = k / num_blocks
        if embed_trainable:
            out.append({"weights_and_input": p_tr, "weights_only": 0.0, "input_only": 1 - p_tr, "none": 0.0})
            continue
        above = num_blocks - l - 1
        tr_alone = math.comb(above, k - 1) / total  # trained, nothing trained below
        fr_alone = math.comb(above, k) / total  # frozen, nothing trained below
        out.append({"weights_and_input": p_tr - tr_alone, "weights_only": tr_alone,
                    "input_only": 1 - p_tr - fr_alone, "none": fr_alone})
    return out


def expected_step_flops(cm: CostModel, keep_ratio: float, k: int, min_tokens: int = 1,
                        freeze_mode: str = "sample", spare_first: int = 0, token_multiple: int = 1,
                        trim_last: bool = False) -> float:
    """Expected train FLOPs of one sample's step: every budget at ``keep_ratio`` (the first
    ``spare_first`` blocks at 1, the last at 0 with ``trim_last``) and ``k`` blocks trained, drawn
    uniformly (``sample``: softmax of equal budgets) or the deepest ``k`` (``last``; and ``topk``,
    which breaks ties of equal budgets towards the head)."""
    L, p = cm.num_blocks, cm.num_prefix_tokens
    ratios = [1.0] * spare_first + [keep_ratio] * (L - spare_first)
    if trim_last:
        ratios[-1] = 0.0
    tin, tout = kept_token_counts(ratios, cm.num_patches, min_tokens, token_multiple)
    if freeze_mode in ("topk", "last"):
        return step_flops(cm, StepShape(tin, tout, tuple(i >= L - k for i in range(L))), 1)
    total = cm.embed.fwd_flops[0] + (cm.embed.bwd_flops["weights_only"][0] if cm.embed.trainable else 0.0)
    for blk, probs, n_in, n_out in zip(cm.blocks, state_probabilities(L, k, cm.embed.trainable), tin, tout):
        n = p + n_in
        if n_out < n_in:
            f, _, sel, _ = blk.dropping("none", n, p + n_out)
            total += f + sel + sum(pr * blk.dropping(s, n, p + n_out)[1] for s, pr in probs.items() if pr > 0)
        else:
            total += blk.forward_flops(n) + sum(pr * blk.backward_flops(s, n) for s, pr in probs.items() if pr > 0)
    n_final = p + tout[-1]
    total += poly(cm.head.fwd_flops, n_final) + poly(cm.head.bwd_flops["weights_and_input"], n_final)
    return total


def inference_flops(cm: CostModel, kept: Sequence[int] | None = None) -> float:
    """FLOPs of one image's eval forward on the token schedule ``kept`` (patch tokens leaving each
    block; None: every token): the blocks that drop tokens also compute CLS-attention scores, or
    select inside (:attr:`CostModel.inference_selects_inside`), where the last block of a head that
    reads only the prefix keeps one patch token (``runtimes.token_schedule.scheduled_keep``)."""
    p, n = cm.num_prefix_tokens, cm.num_patches
    kept = list(kept) if kept is not None else [n] * cm.num_blocks
    inside = cm.inference_selects_inside and all(b.drop is not None for b in cm.blocks)
    entering = kept[-2] if len(kept) > 1 else n
    if inside and cm.head_reads_prefix and entering > 1 and any(k < n for k in kept):
        kept[-1] = 1
    total = cm.embed.fwd_flops[0]
    for blk, k in zip(cm.blocks, kept):
        if k < n and inside:
            total += poly2(blk.drop.fwd_flops, p + n, p + k)
        else:
            total += blk.forward_flops(p + n) + (poly(blk.select_flops, p + n) if k < n else 0.0)
        n = k
    return total + poly(cm.head.fwd_flops, p + n)


def full_step_flops(cm: CostModel) -> float:
    """Train FLOPs of one sample's full fine-tuning step (every token, every block trained)."""
    L = cm.num_blocks
    return step_flops(cm, StepShape((cm.num_patches,) * L, (cm.num_patches,) * L, (True,) * L), 1)


def bottom_flops(cm: CostModel, depth: int) -> float:
    """One sample's forward FLOPs in the embeddings and the first ``depth`` blocks on every token: what a
    runtime that caches those frozen blocks' outputs saves for each image it reads from the cache."""
    n = cm.num_prefix_tokens + cm.num_patches
    return cm.embed.fwd_flops[0] + sum(cm.blocks[i].forward_flops(n) for i in range(depth))
