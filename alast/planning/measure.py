"""What the profiler measures one module with, and the fits it makes of the measurements.

* multiply-adds with fvcore (:func:`fvcore_macs`), forward and backward FLOPs with torch's counter
  and the bytes autograd saves (:func:`count_costs`), in each backward state (:data:`STATES`);
* the bytes a block's backward allocates at its peak beyond what was alive when it started, by
  torch's MemTracker (:func:`backward_excess`), as a line in the batch (:data:`TRANSIENT_BATCHES`);
* least-squares fits to the exact form of each cost: a polynomial in the token count
  (:func:`fit_poly`), a bilinear form in the entering and kept counts (:func:`fit_bilinear`), the
  larger of two planes (:func:`fit_max_of_planes`); coefficients snapped to the simple fractions
  counts are made of.
:mod:`alast.planning.profile` puts them together into a cost model.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from planners.costmodel import fit_error, poly2
from runtimes.torch_backend.flops import counter
from runtimes.torch_backend.patch import forward_selecting

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


TRANSIENT_BATCHES = (4, 16)  # the batches the backward transients are measured at (they are linear in it)


class _Call(nn.Module):
    """``fn(x)`` as a module owning ``block``: MemTracker refuses a module called twice at top level,
    and a selecting block calls its attention's q/k norms twice."""

    def __init__(self, block: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.block, self.fn = block, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.block, x)


def backward_excess(block: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                     state: str, x: torch.Tensor) -> float:
    """Bytes the backward of ``fn(block, x)`` allocates at its peak beyond what was alive when it
    started (the saved tensors, the input, the gradient arriving at the output), by torch's
    MemTracker; ``x`` enters as an activation, as it does inside a model."""
    from runtimes.torch_backend.memory import frozen_aware_mem_tracker

    weights, inp = STATES[state]
    set_grad(params, weights)
    leaf = x.requires_grad_(inp)
    call = _Call(block, fn)
    mt = frozen_aware_mem_tracker()
    mt.track_external(call)
    with mt:
        out = call(leaf * 1.0)
        grad = torch.ones_like(out)
        before = next(iter(mt.get_tracker_snapshot("current").values()))["Total"]
        out.backward(grad)
    peak = next(iter(mt.get_tracker_snapshot("peak").values()))["Total"]
    return max(0.0, float(peak - before))


def _per_sample(block: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                state: str, n: int, dim: int) -> tuple[float, float]:
    """:func:`backward_excess` of ``n`` tokens as a line in the batch, from the two
    :data:`TRANSIENT_BATCHES`: ``(bytes per sample, the rest)``."""
    (b1, y1), (b2, y2) = ((b, backward_excess(block, fn, params, state, torch.randn(b, n, dim)))
                          for b in TRANSIENT_BATCHES)
    per = (y2 - y1) / (b2 - b1)
    return per, y1 - b1 * per


def transient_bytes(block: nn.Module, params: list[nn.Parameter], state: str, dim: int, ns: list[int]
               ) -> tuple[float, float, float]:
    """``(g, c, c0)``: bytes the block's backward allocates at its peak (:func:`backward_excess`)
    ~ ``max(g, c0 + batch * n * c)``.

    Small inputs peak while the weight gradients are allocated (``g``, measured at batch 1 and the
    fewest tokens); large ones while activation gradients are: ``c`` per token and sample and ``c0``
    the rest, from all tokens at the two :data:`TRANSIENT_BATCHES`.
    """
    whole = lambda blk, x: blk(x)
    g = backward_excess(block, whole, params, state, torch.randn(1, ns[0], dim))
    per, rest = _per_sample(block, whole, params, state, ns[-1], dim)
    # a line falling with the batch counts as flat: all of the smaller batch's bytes are the rest
    return g, max(0.0, per) / ns[-1], max(0.0, rest + TRANSIENT_BATCHES[0] * min(per, 0.0))


def transient_pairs(ns: list[int], num_prefix: int) -> list[tuple[int, int]]:
    """(entering, kept) sequence lengths to measure a selecting block's backward transient at: for
    each entering count of ``ns``, one patch token kept, a quarter, a half, three quarters, all but one."""
    pairs = set()
    for n_in in ns:
        patches = n_in - num_prefix
        for keep in (1, patches // 4, patches // 2, 3 * patches // 4, patches - 1):
            if 1 <= keep < patches:
                pairs.add((n_in, num_prefix + keep))
    return sorted(pairs)


def fit_max_of_planes(pairs: list[tuple[int, int]], ys: list[float], rounds: int = 20
                       ) -> tuple[tuple[float, ...], float]:
    """Least-squares ``max(a0 + a_in n_in + a_out n_out, b0 + b_in n_in + b_out n_out)`` and its
    worst error relative to the largest value: the points split by kept share (the first plane
    below the split, the second above), the best split refined by giving each point to the plane
    that is the larger there."""
    x = np.asarray([(1.0, i, o) for i, o in pairs])
    y = np.asarray(ys, float)
    frac = np.asarray([o / i for i, o in pairs])

    def plane(mask: np.ndarray) -> np.ndarray:
        if mask.sum() < 3:  # too few points for a plane of its own: fit them all
            mask = np.ones_like(mask)
        return np.linalg.lstsq(x[mask], y[mask], rcond=None)[0]

    def fit(upper: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        a, b = plane(~upper), plane(upper)
        return float(np.max(np.abs(np.maximum(x @ a, x @ b) - y))), a, b

    err, a, b = min((fit(frac >= t) for t in np.unique(frac)), key=lambda f: f[0])
    for _ in range(rounds):
        upper = x @ b > x @ a
        new = fit(upper)
        if new[0] >= err:
            break
        err, a, b = new
    return tuple(float(v) for v in (*a, *b)), err / max(float(np.max(np.abs(y))), 1.0)


def drop_transient_bytes(block: nn.Module, params: list[nn.Parameter], state: str, dim: int, ns: list[int],
                    num_prefix: int, pool: int | None) -> tuple[float, ...]:
    """``(c0, a0, a_in, a_out, b0, b_in, b_out)``: bytes in flight at the peak of the backward of a
    block that selects inside (:meth:`planners.costmodel.DropCost.transient`), from
    :func:`transient_pairs` at the two :data:`TRANSIENT_BATCHES`."""
    pairs = transient_pairs(ns, num_prefix)
    slopes, rests = [], []
    for n_in, n_out in pairs:
        fn = lambda blk, x: forward_selecting(blk, x, n_out - num_prefix, num_prefix, pool=pool)[0]  # noqa: B023
        per, rest = _per_sample(block, fn, params, state, n_in, dim)
        slopes.append(per)
        rests.append(rest)
    planes, _ = fit_max_of_planes(pairs, slopes)
    return (max(0.0, float(np.median(rests))), *planes)


def fit_bilinear(pairs: list[tuple[int, int]], ys: list[float]) -> tuple[tuple[float, float, float, float], float]:
    """Least-squares ``c0 + c_in n_in + c_out n_out + c_io n_in n_out`` and its worst relative error."""
    a = np.asarray([(1.0, i, o, i * o) for i, o in pairs])
    coef = np.linalg.lstsq(a, np.asarray(ys, float), rcond=None)[0]
    c = tuple(_snap(float(v), max(map(abs, ys)) or 1.0) for v in coef)
    return c, fit_error(list(ys), [poly2(c, i, o) for i, o in pairs])  # type: ignore[arg-type]
