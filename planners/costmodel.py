"""The per-block cost model of a ViT: FLOPs, bytes and time as functions of the token count.

Units are in every name: ``*_macs`` count one multiply-add as one (fvcore's convention),
``*_flops`` count it as two (``torch.utils.flop_counter``, which is what the runtime records).
Only matrix products are counted (linear layers, attention matmuls, the patch convolution);
normalisation and elementwise ops are not, in either convention.

Every cost is **per sample** (one image) and, for the transformer blocks and the head, a polynomial
``c0 + c1 * n + c2 * n**2`` in ``n``, the sequence length entering the block (prefix tokens such as
CLS plus the patch tokens still alive). A transformer block is exactly linear (projections, MLP) plus
quadratic (attention) in ``n``, so three coefficients fitted on a few profiled token counts
reproduce it at every count.

A block that drops tokens after it may select them *inside* (the torch runtime does, for timm's
standard block): then only the kept tokens are queries and pass the output projection and the MLP,
and its costs are bilinear in the tokens entering and leaving it, ``c0 + c_in n_in + c_out n_out +
c_io n_in n_out`` (:class:`DropCost`). A block without a ``DropCost`` runs whole, then drops.

Backward states of a block (what autograd has to compute in it):
  ``weights_and_input`` - the block is trained and something below it needs a gradient;
  ``weights_only``      - the block is trained but nothing below it needs a gradient (LoRA with the
                          embeddings frozen: the lowest trained block);
  ``input_only``        - frozen, but something below it needs a gradient;
  ``none``              - frozen and nothing below needs a gradient: no backward at all.

No torch here: a cost model is plain numbers, written and read as versioned JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

COST_MODEL_FORMAT = "alast-cost-model"
# 2: DropCost (tokens selected inside the block); 3: backward transients by batch and kept tokens; 4: memory events
# of the forward and the backward (the peak of either, exact in the batch), the runtime's per-sample records
COST_MODEL_VERSION = 4
# a version-2 or 3 model reads as before: backward transients ``(g, c[, c0])`` (none for a selecting block in
# version 2, two planes in version 3), no forward peak
READABLE_VERSIONS = (2, 3, 4)
BACKWARD_STATES = ("weights_and_input", "weights_only", "input_only", "none")
EMBED, HEAD, CLASSIFIER = -1, -2, -3  # owners of a parameter outside the blocks (MemoryModel.opt_groups)

Poly = tuple[float, ...]
Poly2 = tuple[float, float, float, float]  # c0 + c_in * n_in + c_out * n_out + c_io * n_in * n_out
# the moments of a block's forward or backward that can hold its most bytes, each ``(c..., s...)``: bytes
# ``c + batch * s``, ``c`` and ``s`` polynomials in the tokens (:data:`Poly`, three coefficients) or in the
# entering and kept ones (:data:`Poly2`); the block's peak is the largest, at least 0
MemoryEvents = tuple[tuple[float, ...], ...]


class CostModelError(ValueError):
    """A cost model file is missing, malformed, or does not belong to the model being planned."""


def poly(coeffs: Poly, n: float) -> float:
    """``c0 + c1 n + c2 n^2 + ...`` (Horner)."""
    acc = 0.0
    for c in reversed(coeffs):
        acc = acc * n + c
    return acc


def poly2(coeffs: Poly2, n_in: float, n_out: float) -> float:
    """``c0 + c_in n_in + c_out n_out + c_io n_in n_out``."""
    c0, c_in, c_out, c_io = coeffs
    return c0 + c_in * n_in + c_out * n_out + c_io * n_in * n_out


def events_peak(events: MemoryEvents, batch: float, n: float, n_out: float | None = None) -> float:
    """The most bytes any of ``events`` holds at ``batch`` and ``n`` tokens (or ``n`` entering and
    ``n_out`` kept, for a selecting block's events), at least 0."""
    best = 0.0
    for e in events:
        half = len(e) // 2
        c, s = e[:half], e[half:]
        v = poly(c, n) + batch * poly(s, n) if n_out is None else poly2(c, n, n_out) + batch * poly2(s, n, n_out)
        best = max(best, v)
    return best


def _events(value: Any, width: int) -> MemoryEvents:
    events = tuple(tuple(float(c) for c in e) for e in value)
    if any(len(e) != width for e in events):
        raise ValueError(f"a memory event has {width} coefficients")
    return events


def _poly(value: Any) -> Poly:
    return tuple(float(c) for c in value)


def _poly2(value: Any) -> Poly2:
    c = tuple(float(v) for v in value)
    if len(c) != 4:
        raise ValueError(f"a two-variable cost has 4 coefficients, got {len(c)}")
    return c  # type: ignore[return-value]


@dataclass(frozen=True)
class DropCost:
    """Costs of one block that keeps ``n_out`` of the ``n_in`` tokens entering it (prefix included)
    and selects them inside (see the module docstring), per sample, as :data:`Poly2`; the token
    scores and the gathers are included. ``bwd_flops`` and ``act_bytes`` by backward state
    (``none`` is zero)."""

    fwd_flops: Poly2
    bwd_flops: dict[str, Poly2]
    act_bytes: dict[str, Poly2]
    transient_bytes: dict[str, Poly] | None = None  # version 3: two planes (see :meth:`transient`)
    fwd_events: dict[str, MemoryEvents] | None = None  # version 4, by state (``none`` included)
    bwd_events: dict[str, MemoryEvents] | None = None  # version 4, by backward state

    def transient(self, state: str, n_in: float, n_out: float, batch: int) -> float | None:
        """Bytes the backward allocates at its peak beyond what was alive when it started (what the
        block saved, its input, the gradient arriving at its output): the largest of its
        :data:`MemoryEvents`. A version-3 model has ``c0 + batch * max(a0 + a_in n_in + a_out n_out,
        b0 + b_in n_in + b_out n_out)``; None where not profiled (a version-2 cost model)."""
        if self.bwd_events is not None:
            return events_peak(self.bwd_events[state], batch, n_in, n_out)
        if self.transient_bytes is None:
            return None
        c0, a0, a_in, a_out, b0, b_in, b_out = self.transient_bytes[state]
        return c0 + batch * max(a0 + a_in * n_in + a_out * n_out, b0 + b_in * n_in + b_out * n_out)


@dataclass(frozen=True)
class BlockCost:
    """Costs of one transformer block, per sample, as polynomials in the tokens entering it.

    fwd_macs: fvcore's count of the forward (matrix products only).
    fwd_flops, bwd_flops[state]: ``torch.utils.flop_counter`` counts of the forward and of the
        backward in each state (``none`` is always zero).
    select_flops: the CLS-attention scores computed when the block drops tokens after it.
    act_bytes[state]: tensors autograd saves for the backward (parameters excluded).
    select_act_bytes: what token selection keeps alive, per entering token (the block's full output,
        which ``gather`` saves) and ``select_index_bytes`` per kept token (the int64 indices).
    fwd_events[state], bwd_events[state]: the :data:`MemoryEvents` of the block's forward (beyond its
        input) and of its backward (beyond what was alive when it started: what the block saved, its
        input, the gradient arriving at its output).
    transient_bytes[state]: what a version-2 or 3 model has instead, for the backward alone:
        ``(g, c, c0)``, ``max(g, c0 + batch * n * c)`` (version 2: ``(g, c)``, ``c0`` 0).
    """

    index: int
    params: int
    trainable_params: int
    trainable_bytes: int
    largest_trainable_bytes: int
    fwd_macs: Poly
    fwd_flops: Poly
    bwd_flops: dict[str, Poly]
    select_flops: Poly
    act_bytes: dict[str, Poly]
    select_act_bytes: float
    select_index_bytes: float
    transient_bytes: dict[str, Poly] | None = None
    drop: DropCost | None = None
    fwd_events: dict[str, MemoryEvents] | None = None
    bwd_events: dict[str, MemoryEvents] | None = None

    def forward_flops(self, n: float) -> float:
        return poly(self.fwd_flops, n)

    def backward_flops(self, state: str, n: float) -> float:
        return 0.0 if state == "none" else poly(self.bwd_flops[state], n)

    def saved_bytes(self, state: str, n: float) -> float:
        return poly(self.act_bytes[state], n)

    def transient(self, state: str, n: float, batch: int) -> float:
        """Bytes the block's backward holds at its peak beyond what was alive when it started."""
        if state == "none":
            return 0.0
        if self.bwd_events is not None:
            return events_peak(self.bwd_events[state], batch, n)
        g, c, *rest = self.transient_bytes[state]
        return max(g, (rest[0] if rest else 0.0) + batch * n * c)

    def dropping_transient(self, state: str, n_in: float, n_out: float, batch: int) -> float:
        """:meth:`transient` of the block when it keeps ``n_out`` of the ``n_in`` tokens entering it
        (prefix included), from its :class:`DropCost` where profiled, else that of the whole block."""
        if state == "none":
            return 0.0
        t = self.drop.transient(state, n_in, n_out, batch) if self.drop is not None else None
        if t is None:
            return self.transient(state, n_in, batch)
        return t if self.bwd_events is not None else max(self.transient_bytes[state][0], t)

    def forward_excess(self, state: str, n_in: float, n_out: float, batch: int) -> float | None:
        """Bytes the block's forward holds at its peak beyond its input, keeping ``n_out`` of the
        ``n_in`` tokens entering it (all where equal); None for a version-2 or 3 model."""
        if self.fwd_events is None:
            return None
        if n_out < n_in and self.drop is not None and self.drop.fwd_events is not None:
            return events_peak(self.drop.fwd_events[state], batch, n_in, n_out)
        return events_peak(self.fwd_events[state], batch, n_in)

    def dropping(self, state: str, n_in: float, n_out: float) -> tuple[float, float, float, float]:
        """``(forward, backward, scores, saved bytes)`` per sample when the block keeps ``n_out`` of
        the ``n_in`` tokens entering it (``n_out < n_in``, prefix included); the forward excludes
        the scores."""
        scores = poly(self.select_flops, n_in)
        if self.drop is None:  # the whole block, then the selection
            saved = self.saved_bytes(state, n_in)
            if state != "none":
                saved += self.select_act_bytes * n_in + self.select_index_bytes * n_out
            return self.forward_flops(n_in), self.backward_flops(state, n_in), scores, saved
        d = self.drop
        if state == "none":
            return poly2(d.fwd_flops, n_in, n_out) - scores, 0.0, scores, 0.0
        return (poly2(d.fwd_flops, n_in, n_out) - scores, poly2(d.bwd_flops[state], n_in, n_out), scores,
                poly2(d.act_bytes[state], n_in, n_out))


@dataclass(frozen=True)
class SegmentCost:
    """The patch embedding (constant per image) or the head (norm, pool, classifier; polynomial in
    the tokens leaving the last block). ``bwd_flops`` has ``weights_only`` and, for the head,
    ``weights_and_input``; ``trainable`` says whether the runtime trains it."""

    params: int
    trainable: bool
    trainable_bytes: int
    largest_trainable_bytes: int
    fwd_macs: Poly
    fwd_flops: Poly
    bwd_flops: dict[str, Poly]
    act_bytes: Poly

    def scaled(self, factor: float) -> "SegmentCost":
        """Costs times ``factor`` (a classifier head with another number of classes)."""
        s = lambda p: tuple(c * factor for c in p)  # noqa: E731
        return replace(self, fwd_macs=s(self.fwd_macs), fwd_flops=s(self.fwd_flops),
                       bwd_flops={k: s(v) for k, v in self.bwd_flops.items()})


@dataclass(frozen=True)
class MemoryModel:
    """Bytes that do not depend on tokens. AdamW keeps two fp32 moments per trained parameter,
    created the first time the parameter is trained. ``optimizer_temp`` is what one optimizer step
    allocates on top: ``largest_param`` (single-tensor AdamW, the CPU default) or ``all_trained``
    (multi-tensor ``foreach`` AdamW, the CUDA default). ``record_bytes_per_sample``: what the torch
    runtime keeps per sample from the first block's forward to the optimizer step, the class
    token entering the blocks and leaving each (its deltas), or each block's delta without one.

    ``opt_groups``: AdamW's parameter groups as it steps them, each parameter ``(owner, bytes)``:
    its block's index, :data:`EMBED` or :data:`HEAD`, or :data:`CLASSIFIER` (scaled with the class
    count). Single-tensor AdamW steps the parameters of a group one by one, each with two
    temporaries of its size (``sqrt``, then the division), while the previous one's denominator is
    still bound: ``prev + 2 cur`` at most, among the parameters with a gradient in the step. Empty
    (a version-2 or 3 model): twice the largest trained parameter."""

    param_bytes: int
    buffer_bytes: int
    opt_state_bytes_per_param: int = 8
    optimizer_temp: str = "largest_param"
    input_bytes_per_sample: int = 0
    record_bytes_per_sample: int = 0
    opt_groups: tuple[tuple[tuple[int, int], ...], ...] = ()
    rope_bytes: int = 0  # the rotary embeddings a forward computes (timm's Eva), held through the backward


@dataclass(frozen=True)
class TimeModel:
    """Step time in seconds, ``sum(coefficients[k] * features[k])``.

    method: ``calibrated`` (least squares on real timed steps on ``device``) or ``throughput``
    (``train_flops / flops_per_s``, nothing else). Features: ``step`` (1), ``fwd_flops``,
    ``bwd_flops``, ``select_blocks`` (blocks that drop tokens), ``bwd_blocks`` (blocks with any
    backward), all for the whole batch. A calibration holds for its ``device``, ``batch_size``,
    ``count_flops``, ``precision`` and CPU ``threads`` (None: not recorded) only.

    What a torch runtime's step does beside training, timed by the calibration too (1 and 0: not
    timed, as with a given throughput): ``first_step_s``, the extra time of a run's first step
    (lazy initialisation); ``counted_factor``, a step run under the FLOP counter (one with a shape
    not counted before) over a plain one; ``probed_factor``, a step whose CPU memory is measured.
    """

    method: str
    coefficients: dict[str, float]
    device: str = ""
    batch_size: int | None = None
    count_flops: str = ""
    threads: int | None = None
    precision: str = "fp32"  # the steps' autocast: time models from before it was recorded timed fp32 steps
    points: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    first_step_s: float = 0.0
    counted_factor: float = 1.0
    probed_factor: float = 1.0

    @classmethod
    def from_throughput(cls, flops_per_s: float) -> "TimeModel":
        if not 0 < flops_per_s < math.inf:  # NaN and inf included: inf would predict no time at all
            raise CostModelError(f"throughput must be a finite number > 0 FLOP/s, got {flops_per_s}")
        return cls("throughput", {"fwd_flops": 1.0 / flops_per_s, "bwd_flops": 1.0 / flops_per_s},
                   note=f"train FLOPs / {flops_per_s:.3g} FLOP/s (given throughput)")

    def step_time_s(self, features: dict[str, float], *, first: bool = False, counted: bool = False,
                    probed: bool = False) -> float:
        """A step's time; ``first``, ``counted``, ``probed``: what it does beside training (above)."""
        plain = sum(c * features.get(k, 0.0) for k, c in self.coefficients.items())
        return plain * self.slowdown(counted, probed) + (self.first_step_s if first else 0.0)

    def slowdown(self, counted: bool, probed: bool) -> float:
        """A step's time over a plain one's. The FLOP counter and the memory tracker each slow every
        op down; together their extra times add (measured: a counted step 3x a plain one, a
        measured one 5x, both 6x)."""
        return 1.0 + (self.counted_factor - 1.0) * counted + (self.probed_factor - 1.0) * probed


@dataclass(frozen=True)
class CostModel:
    model: str
    img_size: int
    num_patches: int
    num_prefix_tokens: int
    num_classes: int
    embed_dim: int
    attention: str
    embed: SegmentCost
    blocks: tuple[BlockCost, ...]
    head: SegmentCost
    memory: MemoryModel
    lora: dict[str, Any] | None = None
    head_reads_prefix: bool = False  # the head reads only the prefix tokens (class token pooling)
    # a token schedule at inference selects inside the blocks that drop, with their DropCost (timm's
    # Eva); else it runs them whole, then selects
    inference_selects_inside: bool = False
    time: TimeModel | None = None
    token_counts: tuple[int, ...] = ()
    fit_max_rel_error: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int = COST_MODEL_VERSION

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        """Sequence length with every patch token: prefix + patches."""
        return self.num_prefix_tokens + self.num_patches

    def with_num_classes(self, num_classes: int) -> "CostModel":
        """The same model with a classifier head for ``num_classes``. The head's FLOPs scale linearly
        (the classifier is its only matrix product under token or average pooling); its parameters
        change by ``embed_dim`` weights and one bias per class, in the model's parameter bytes, the
        head's trainable bytes and its largest tensor (the classifier's weight, or the final norm's
        where that is larger)."""
        if num_classes == self.num_classes:
            return self
        head = self.head.scaled(num_classes / self.num_classes)
        added = (self.embed_dim + 1) * (num_classes - self.num_classes)  # parameters
        total = self.embed.params + self.head.params + sum(b.params for b in self.blocks)
        width = round(self.memory.param_bytes / total) if total else 4  # bytes per parameter
        if head.trainable:
            old_w, new_w = (self.embed_dim * c * width for c in (self.num_classes, num_classes))
            others = head.largest_trainable_bytes if head.largest_trainable_bytes != old_w else self.embed_dim * width
            head = replace(head, trainable_bytes=head.trainable_bytes + added * width,
                           largest_trainable_bytes=max(new_w, others))
        head = replace(head, params=head.params + added)
        groups = tuple(tuple((o, round(b * num_classes / self.num_classes) if o == CLASSIFIER else b) for o, b in g)
                       for g in self.memory.opt_groups)
        memory = replace(self.memory, param_bytes=self.memory.param_bytes + added * width, opt_groups=groups)
        return replace(self, num_classes=num_classes, head=head, memory=memory)

    def with_time(self, time: TimeModel | None) -> "CostModel":
        return replace(self, time=time)

    def selecting_after_blocks(self) -> CostModel:
        """The same model with every block run whole before it drops tokens (no :class:`DropCost`):
        the ``ort`` backend, and token fusion, which needs the dropped tokens' outputs."""
        return replace(self, blocks=tuple(replace(b, drop=None) for b in self.blocks))

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": COST_MODEL_FORMAT, **d}
        d["units"] = {
            "macs": "multiply-adds (fvcore convention), per sample",
            "flops": "2 per multiply-add (torch.utils.flop_counter convention), per sample",
            "polynomials": "[c0, c1, c2] = c0 + c1*n + c2*n^2, n = tokens entering the block incl. prefix",
            "drop": "[c0, c_in, c_out, c_io] = c0 + c_in*n_in + c_out*n_out + c_io*n_in*n_out, tokens entering and "
                    "leaving a block that selects inside (null: the block runs whole, then drops)",
            "bytes": "bytes; act_bytes per sample (polynomial); fwd_events / bwd_events: per state, the moments of "
                     "the block's forward (beyond its input) or backward (beyond what was alive at its start) that "
                     "can be its peak, each [c0, c1, c2, s0, s1, s2] = c(n) + batch*s(n) (drop: [c (4), s (4)] in "
                     "n_in, n_out); the peak is the largest, at least 0",
        }
        return d

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostModel":
        if not isinstance(d, dict) or d.get("format") != COST_MODEL_FORMAT:
            raise CostModelError("not an alast cost model (no 'format: alast-cost-model'); make one with "
                                 "`alast profile MODEL --out FILE`")
        if d.get("version") not in READABLE_VERSIONS:
            raise CostModelError(f"cost model version {d.get('version')} is not supported (this alast reads "
                                 f"versions {', '.join(map(str, READABLE_VERSIONS))}); "
                                 f"re-run `alast profile {d.get('model', 'MODEL')} --out FILE`")
        try:
            blocks = tuple(_block(b) for b in d["blocks"])
            time = d.get("time")
            return cls(
                model=str(d["model"]), img_size=int(d["img_size"]), num_patches=int(d["num_patches"]),
                num_prefix_tokens=int(d["num_prefix_tokens"]), num_classes=int(d["num_classes"]),
                embed_dim=int(d["embed_dim"]), attention=str(d["attention"]), embed=_segment(d["embed"]),
                blocks=blocks, head=_segment(d["head"]), memory=_memory(d["memory"]), lora=d.get("lora"),
                head_reads_prefix=bool(d.get("head_reads_prefix", False)),
                inference_selects_inside=bool(d.get("inference_selects_inside", False)),
                time=TimeModel(**time) if time else None, token_counts=tuple(d.get("token_counts", ())),
                fit_max_rel_error=float(d.get("fit_max_rel_error", 0.0)), provenance=dict(d.get("provenance", {})),
                version=int(d["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CostModelError(f"malformed cost model ({exc.__class__.__name__}: {exc}); "
                                 "re-run `alast profile MODEL --out FILE`") from None


def _block(b: dict[str, Any]) -> BlockCost:
    if b.get("transient_bytes") is None and b.get("bwd_events") is None:
        raise ValueError(f"block {b.get('index')} has neither bwd_events nor transient_bytes")
    return BlockCost(
        index=int(b["index"]), params=int(b["params"]), trainable_params=int(b["trainable_params"]),
        trainable_bytes=int(b["trainable_bytes"]), largest_trainable_bytes=int(b["largest_trainable_bytes"]),
        fwd_macs=_poly(b["fwd_macs"]), fwd_flops=_poly(b["fwd_flops"]),
        bwd_flops={k: _poly(v) for k, v in b["bwd_flops"].items()}, select_flops=_poly(b["select_flops"]),
        act_bytes={k: _poly(v) for k, v in b["act_bytes"].items()}, select_act_bytes=float(b["select_act_bytes"]),
        select_index_bytes=float(b["select_index_bytes"]),
        transient_bytes=_by_state(b.get("transient_bytes"), _poly),
        drop=_drop(b["drop"]) if b.get("drop") is not None else None,
        fwd_events=_by_state(b.get("fwd_events"), lambda v: _events(v, 6)),
        bwd_events=_by_state(b.get("bwd_events"), lambda v: _events(v, 6)),
    )


def _memory(m: dict[str, Any]) -> MemoryModel:
    groups = tuple(tuple((int(o), int(b)) for o, b in g) for g in m.get("opt_groups", ()))
    return MemoryModel(**{**m, "opt_groups": groups})


def _by_state(value: dict[str, Any] | None, read: Any) -> dict[str, Any] | None:
    return None if value is None else {k: read(v) for k, v in value.items()}


def _drop(d: dict[str, Any]) -> DropCost:
    transient = d.get("transient_bytes")
    if transient is not None:
        transient = {k: _poly(v) for k, v in transient.items()}
        if any(len(v) != 7 for v in transient.values()):
            raise ValueError("a selecting block's transient_bytes has 7 coefficients")
    return DropCost(fwd_flops=_poly2(d["fwd_flops"]), bwd_flops={k: _poly2(v) for k, v in d["bwd_flops"].items()},
                    act_bytes={k: _poly2(v) for k, v in d["act_bytes"].items()}, transient_bytes=transient,
                    fwd_events=_by_state(d.get("fwd_events"), lambda v: _events(v, 8)),
                    bwd_events=_by_state(d.get("bwd_events"), lambda v: _events(v, 8)))


def _segment(s: dict[str, Any]) -> SegmentCost:
    return SegmentCost(
        params=int(s["params"]), trainable=bool(s["trainable"]), trainable_bytes=int(s["trainable_bytes"]),
        largest_trainable_bytes=int(s["largest_trainable_bytes"]), fwd_macs=_poly(s["fwd_macs"]),
        fwd_flops=_poly(s["fwd_flops"]), bwd_flops={k: _poly(v) for k, v in s["bwd_flops"].items()},
        act_bytes=_poly(s["act_bytes"]),
    )


def load_cost_model(path: Path, model: str | None = None, img_size: int | None = None,
                    lora: dict[str, Any] | None | bool = False) -> CostModel:
    """Read a cost model and check it belongs to ``model`` at ``img_size`` (and, unless ``lora`` is
    False, to that LoRA setting); a mismatch is a :class:`CostModelError` that names both."""
    path = Path(path)
    if not path.is_file():
        raise CostModelError(f"cost model not found: {path}; make one with `alast profile MODEL --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CostModelError(f"cannot read cost model {path}: {exc.__class__.__name__}; is it JSON from `alast profile`?") from None
    cm = CostModel.from_dict(data)
    size = f" --img-size {img_size}" if img_size is not None else ""
    if model is not None and cm.model != model:
        raise CostModelError(f"cost model {path} is for {cm.model!r}, not {model!r}; make one with "
                             f"`alast profile {model}{size} --out FILE` and pass that, or leave out --cost-model")
    if img_size is not None and cm.img_size != img_size:
        raise CostModelError(f"cost model {path} was profiled at image size {cm.img_size}, not {img_size}; make one "
                             f"with `alast profile {cm.model}{size} --out FILE` and pass that, or leave out "
                             "--cost-model")
    if lora is not False and (cm.lora or None) != (lora or None):
        raise CostModelError(f"cost model {path} has lora={cm.lora}, the plan needs lora={lora}")
    return cm


def fit_error(measured: list[float], predicted: list[float]) -> float:
    """Largest relative difference (0 where both are 0)."""
    worst = 0.0
    for m, p in zip(measured, predicted, strict=True):
        if m == 0 and abs(p) < 1e-6:
            continue
        worst = max(worst, abs(p - m) / max(abs(m), 1e-12))
    return worst if math.isfinite(worst) else float("inf")


def block_cost_split(cm: CostModel, n: int | None = None) -> list[dict[str, float]]:
    """Per block, per sample at ``n`` tokens (default all): forward, backward trained and frozen,
    and token-selection FLOPs."""
    n = cm.num_tokens if n is None else n
    return [{"fwd_flops": b.forward_flops(n), "bwd_trained_flops": b.backward_flops("weights_and_input", n),
             "bwd_frozen_flops": b.backward_flops("input_only", n), "select_flops": poly(b.select_flops, n)}
            for b in cm.blocks]
