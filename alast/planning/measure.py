"""What the profiler measures one module with, and the fits it makes of the measurements.

* multiply-adds with fvcore (:func:`fvcore_macs`), forward and backward FLOPs with torch's counter
  and the bytes autograd saves (:func:`count_costs`), in each backward state (:data:`STATES`);
* the bytes a block holds after every op of its forward and of its backward, by torch's
  MemTracker (:func:`memory_timeline`), each op's a line in the batch (:data:`TRANSIENT_BATCHES`);
* least-squares fits to the exact form of each cost: a polynomial in the token count
  (:func:`fit_poly`), a bilinear form in the entering and kept counts (:func:`fit_bilinear`), and
  of each op's line over the counts, kept where it can hold the most (:func:`fit_events`);
  coefficients snapped to the simple fractions counts are made of.
:mod:`alast.planning.profile` puts them together into a cost model.
"""
from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from planners.costmodel import fit_error, poly2
from runtimes.torch_backend.flops import counter

_NOT_MATMUL = ("norm", "upsample", "pool", "grid_sampler")
STATES = {"weights_and_input": (True, True), "weights_only": (True, False), "input_only": (False, True)}


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: ``q @ k^T`` and ``attn @ v`` multiply-adds of scaled_dot_product_attention."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = int(np.prod(q[:-2]))
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def fvcore_macs(fn: nn.Module, x: torch.Tensor) -> float:
    """fvcore multiply-adds of ``fn(x)``: matrix products only (norms and elementwise ops excluded,
    as torch's counter excludes them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore.nn scripts a loss with torch.jit at import
        from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(fn, (x,)).set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation, inside fvcore
        ops = fa.by_operator()
    return float(sum(v for k, v in ops.items() if not any(t in k for t in _NOT_MATMUL)))


class AsModule(nn.Module):
    """A callable as a module (fvcore traces modules)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _saved_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` and total the distinct storages autograd saves, except those in ``exclude``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def count_costs(fn: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[float, float, int]:
    """(forward flops, backward flops, saved bytes) of ``fn`` with torch's counter."""
    with counter() as fc:
        out, saved = _saved_bytes(fn, exclude)
    fwd = float(fc.get_total_flops())
    if not out.requires_grad:
        return fwd, 0.0, 0
    with counter() as bc:
        out.backward(torch.ones_like(out))
    return fwd, float(bc.get_total_flops()), saved


def fit_poly(ns: list[int], ys: list[float], degree: int = 2) -> tuple[tuple[float, ...], float]:
    """Least-squares polynomial in ``n`` and its worst relative error on the measured points."""
    a = np.vander(np.asarray(ns, float), degree + 1, increasing=True)
    coef = np.linalg.lstsq(a, np.asarray(ys, float), rcond=None)[0]
    coef = [_snap(float(c), max(map(abs, ys)) or 1.0) for c in coef]
    return tuple(coef), fit_error(list(ys), [float(np.polyval(coef[::-1], n)) for n in ns])


def _snap(c: float, scale: float) -> float:
    """Drop float noise from a fitted coefficient: counts are integers or simple fractions."""
    if abs(c) < 1e-9 * scale:
        return 0.0
    r = round(c * 8) / 8
    return r if abs(c - r) <= 1e-6 * max(1.0, abs(c)) else float(f"{c:.12g}")


def set_grad(params: list[nn.Parameter], on: bool) -> None:
    for p in params:
        p.requires_grad_(on)
        p.grad = None


def param_storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


TRANSIENT_BATCHES = (2, 8)  # the batches memory timelines are measured at (every tensor is linear in it)
EVENT_BATCHES = tuple(2 ** k for k in range(13))  # the batches an event must lead at to be kept (1 to 4096)


class _Call(nn.Module):
    """``fn(x)`` as a module owning ``block``: MemTracker refuses a module called twice at top level,
    and a selecting block calls its attention's q/k norms twice."""

    def __init__(self, block: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.block, self.fn = block, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.block, x)


Timeline = list[tuple[str, int]]  # (op, bytes held beyond the start) after every op


@functools.lru_cache(maxsize=1)
def _timeline_tracker_cls() -> type:
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    from runtimes.torch_backend.memory import frozen_aware_tracker_cls

    class TimelineTracker(frozen_aware_tracker_cls()):
        """Records the bytes alive after every op while :attr:`record` is a list (the tracker
        the runtime measures its peaks with: each op's outputs tracked as MemTracker tracks them,
        without its per-module snapshots; tests/alast/test_profile.py holds a timeline to
        MemTracker's own)."""

        record: list[tuple[str, int]] | None = None

        def total(self) -> int:
            return sum(s[_TOTAL_KEY] for s in self._curr_mem_snap.values())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.record is not None:
                self.record.append((str(func), self.total()))
            return out

    return TimelineTracker


def memory_timeline(block: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    params: list[nn.Parameter], state: str, x: torch.Tensor,
                    held: Sequence[torch.Tensor] = ()) -> tuple[Timeline, Timeline]:
    """The bytes ``fn(block, x)`` holds after every op of its forward beyond what was alive when it
    started (``x``, which enters as an activation, as it does inside a model), and after every op of
    its backward beyond what was alive when that started (the saved tensors, the input; the gradient
    arriving at the output is the backward's first allocation), by torch's MemTracker. ``state``: a
    backward state or ``none``. ``held``: tensors ``fn`` reads that the model holds beside the block
    (rotary embeddings), alive before it starts: MemTracker counts a storage where an op first
    meets it, so each is met here first."""
    weights, inp = STATES.get(state, (False, False))
    set_grad(params, weights)
    call = _Call(block, fn)
    mt = _timeline_tracker_cls()()
    mt.track_external(call)
    fwd: Timeline = []
    bwd: Timeline = []
    with mt:
        x = x.requires_grad_(inp) * 1.0
        for t in held:
            t.view_as(t)
        start, mt.record = mt.total(), fwd
        out = call(x)
        mt.record = None
        if out.requires_grad:
            # the gradient arriving at the output comes out of the backward, as inside a model: it is
            # part of the backward's bytes, freed when the block is done with it
            weight = torch.ones_like(out)  # held here: the product saves it, and must not free it
            loss = (out * weight).sum()
            before, mt.record = mt.total(), bwd
            loss.backward()
            mt.record = None
            bwd = [(op, b - before) for op, b in bwd]
    return [(op, b - start) for op, b in fwd], bwd


def _aligned(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Index pairs of the ops two runs of the same code share, in order (all of them where the two
    ran the same ops, as they do but where a shape picks another kernel)."""
    if a == b:
        return [(i, i) for i in range(len(a))]
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return [(m.a + k, m.b + k) for m in blocks for k in range(m.size)]


Lines = list[tuple[str, float, float]]  # per op: (op, c, s), bytes held c + batch * s


def _lines(t1: Timeline, t2: Timeline) -> Lines:
    """Each op's bytes as a line in the batch, from timelines at the two :data:`TRANSIENT_BATCHES`."""
    (b1, b2), out = TRANSIENT_BATCHES, []
    for i, j in _aligned([op for op, _ in t1], [op for op, _ in t2]):
        s = (t2[j][1] - t1[i][1]) / (b2 - b1)
        out.append((t1[i][0], t1[i][1] - b1 * s, s))
    return out


def memory_lines(block: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                 state: str, n: int, dim: int, held: Sequence[torch.Tensor] = ()) -> tuple[Lines, Lines]:
    """:func:`memory_timeline` of ``n`` tokens, every op's bytes a line in the batch: ``(forward,
    backward)``."""
    (f1, g1), (f2, g2) = (memory_timeline(block, fn, params, state, torch.randn(b, n, dim), held)
                          for b in TRANSIENT_BATCHES)
    return _lines(f1, f2), _lines(g1, g2)


def transient_pairs(ns: list[int], num_prefix: int) -> list[tuple[int, int]]:
    """(entering, kept) sequence lengths to measure a selecting block's memory at: for each entering
    count of ``ns``, one patch token kept, a quarter, a half, three quarters, all but one."""
    pairs = set()
    for n_in in ns:
        patches = n_in - num_prefix
        for keep in (1, patches // 4, patches // 2, 3 * patches // 4, patches - 1):
            if 1 <= keep < patches:
                pairs.add((n_in, num_prefix + keep))
    return sorted(pairs)


def fit_events(keys: list, lines: list[Lines], fit: Callable[[list[float]], tuple[tuple[float, ...], float]],
               value: Callable[[np.ndarray, np.ndarray, tuple], np.ndarray], grid: list
               ) -> tuple[tuple[tuple[float, ...], ...], float]:
    """The moments of a block's forward or backward whose bytes can be its peak, each a line in the
    batch with coefficients fitted over the token counts: ``(c..., s...)``, bytes ``c(key) + batch
    * s(key)``; and the worst error of their largest against the peak measured at ``keys``.

    ``lines[k]``: every op's line at ``keys[k]``; the ops are matched across keys in order (the
    same code runs at every count), each op's ``c`` and ``s`` fitted with ``fit``. Kept are the ops
    that hold the most at some key of ``grid`` (token counts or pairs) and batch of
    :data:`EVENT_BATCHES`. ``value(c, s, key)``: a fitted event's two coefficient arrays at a key.
    """
    ref = [op for op, _, _ in lines[0]]
    maps = [dict(_aligned(ref, [op for op, _, _ in ln])) for ln in lines]
    common = [i for i in range(len(ref)) if all(i in m for m in maps)]
    if not common:
        return (), 0.0
    events = []
    for i in common:
        c, _ = fit([ln[m[i]][1] for ln, m in zip(lines, maps)])
        s, _ = fit([ln[m[i]][2] for ln, m in zip(lines, maps)])
        events.append((c, s))
    cs, ss = np.asarray([e[0] for e in events]), np.asarray([e[1] for e in events])
    batches = np.asarray(EVENT_BATCHES, float)
    lead = set()
    for key in grid:
        v = value(cs, ss, key)  # [events, 2]: c and s at the key
        lead.update(np.argmax(v[:, :1] + v[:, 1:] * batches, axis=0).tolist())
    kept = tuple(tuple(float(x) for x in (*events[i][0], *events[i][1])) for i in sorted(lead))
    kc, ks = np.asarray([e[: len(events[0][0])] for e in kept]), np.asarray([e[len(events[0][0]):] for e in kept])
    err = 0.0
    for key, ln in zip(keys, lines):
        v = value(kc, ks, key)
        for b in TRANSIENT_BATCHES:
            measured = max(0.0, max(c + b * s for _, c, s in ln))
            predicted = max(0.0, float(np.max(v[:, 0] + b * v[:, 1])))
            err = max(err, abs(predicted - measured) / max(measured, 1.0))
    return kept, err


def fit_bilinear(pairs: list[tuple[int, int]], ys: list[float]) -> tuple[tuple[float, float, float, float], float]:
    """Least-squares ``c0 + c_in n_in + c_out n_out + c_io n_in n_out`` and its worst relative error."""
    a = np.asarray([(1.0, i, o, i * o) for i, o in pairs])
    coef = np.linalg.lstsq(a, np.asarray(ys, float), rcond=None)[0]
    c = tuple(_snap(float(v), max(map(abs, ys)) or 1.0) for v in coef)
    return c, fit_error(list(ys), [poly2(c, i, o) for i, o in pairs])  # type: ignore[arg-type]
