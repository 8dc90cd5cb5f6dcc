"""Exact counted FLOPs of step pieces never counted, from pieces that were.

A transformer block's counted FLOPs (matrix products: linear layers on its tokens, attention of
its queries over its keys) are, for a fixed batch and fixed trained flags, a polynomial of degree
two in its token counts: ``a + b*n + c*o + d*n*o`` for a block that takes ``n`` tokens and keeps
``o``, on every timm ViT measured (ViT, DeiT, DINOv2, EVA/DINOv3, LoRA, average and attention
pooling, fused tokens: the tests and ``benchmarks/flop_solve_audit.py``). Under moving budgets
almost every step has a new ``(n, o)`` for some block, so counting each new shape under the FLOP
counter counts most steps. :class:`PieceCounts` instead solves the polynomial exactly (rational
arithmetic) from counted points of the same kind once they determine it, and uses it only after
further counted points agreed with it exactly; a kind whose counts ever disagree is never
predicted again (every new shape of it is counted, as before).

What is known depends on which keys were counted, not on their values (except for a
disagreement, which no measured model shows), so the planner predicts which steps a run counts
with the same class, given no values.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction

VERIFY = 3  # counted points beyond a basis that must agree before a kind is predicted


def _monomials(point: Sequence[int]) -> list[Fraction]:
    """Every monomial of degree <= 2 in the point's coordinates."""
    xs = [Fraction(v) for v in point]
    out = [Fraction(1), *xs]
    out += [xs[i] * xs[j] for i in range(len(xs)) for j in range(i, len(xs))]
    return out


def _solve(rows: list[list[Fraction]], values: list[Fraction]) -> list[Fraction]:
    """The exact solution of a square, non-singular system (Gauss-Jordan on Fractions)."""
    n = len(rows)
    a = [list(r) + [v] for r, v in zip(rows, values)]
    for col in range(n):
        piv = next(r for r in range(col, n) if a[r][col] != 0)
        a[col], a[piv] = a[piv], a[col]
        p = a[col][col]
        a[col] = [v / p for v in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0:
                f = a[r][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[r][n] for r in range(n)]


class _KindFit:
    """The counted points of one kind: a basis of independent monomial vectors, then checks."""

    def __init__(self, dims: int) -> None:
        self.size = len(_monomials([0] * dims))
        self.echelon: list[tuple[int, list[Fraction]]] = []  # (pivot column, reduced row)
        self.basis: list[tuple[list[Fraction], Fraction | None]] = []
        self.pending: list[tuple[list[Fraction], Fraction | None]] = []  # dependent points, checked once solved
        self.coef: list[Fraction] | None = None
        self.verified = 0
        self.broken = False

    @property
    def ready(self) -> bool:
        return self.coef is not None and self.verified >= VERIFY and not self.broken

    def _reduce(self, row: list[Fraction]) -> list[Fraction]:
        row = list(row)
        for col, er in self.echelon:
            if row[col] != 0:
                f = row[col]
                row = [x - f * y for x, y in zip(row, er)]
        return row

    def add(self, point: Sequence[int], value: float | None) -> None:
        m = _monomials(point)
        val = None if value is None else Fraction(value)
        if self.coef is None:
            reduced = self._reduce(m)
            col = next((j for j, v in enumerate(reduced) if v != 0), None)
            if col is None:
                self.pending.append((m, val))
                return
            p = reduced[col]
            reduced = [v / p for v in reduced]
            self.echelon = [(c, [x - r[col] * y for x, y in zip(r, reduced)]) for c, r in self.echelon]
            self.echelon.append((col, reduced))
            self.basis.append((m, val))
            if len(self.basis) < self.size:
                return
            if any(v is None for _, v in self.basis):
                self.coef = []  # geometry only (the planner): solved, values unknown
            else:
                self.coef = _solve([r for r, _ in self.basis], [v for _, v in self.basis])
            checks, self.pending = self.pending, []
            for mm, vv in checks:
                self._check(mm, vv)
            return
        self._check(m, val)

    def _check(self, m: list[Fraction], value: Fraction | None) -> None:
        if value is not None and self.coef and sum(c * x for c, x in zip(self.coef, m)) != value:
            self.broken = True
        self.verified += 1

    def predict(self, point: Sequence[int]) -> float | None:
        if not self.ready or not self.coef:
            return None
        v = sum(c * x for c, x in zip(self.coef, _monomials(point)))
        return float(v) if v.denominator == 1 and v >= 0 else None


class PieceCounts:
    """Counted FLOPs of pieces by key: the counted ones, and the rest of a kind once fitted.

    ``split(key) -> (kind, point)``: what must match exactly (batch, trained flags) and the token
    counts the count is a polynomial in.
    """

    def __init__(self, split: Callable[[tuple], tuple[Hashable, tuple[int, ...]]]) -> None:
        self.split = split
        self.exact: dict[tuple, float | None] = {}
        self.solved: dict[tuple, float] = {}
        self.fits: dict[Hashable, _KindFit] = {}

    def known(self, key: tuple) -> bool:
        if key in self.exact:
            return True
        fit = self.fits.get(self.split(key)[0])
        return fit is not None and fit.ready

    def get(self, key: tuple) -> float | None:
        """The piece's count: counted, or solved (once per key: steps repeat their shapes)."""
        if key in self.exact:
            return self.exact[key]
        if key in self.solved:
            return self.solved[key]
        kind, point = self.split(key)
        fit = self.fits.get(kind)
        value = fit.predict(point) if fit is not None else None
        if value is not None:
            self.solved[key] = value
        return value

    def add(self, key: tuple, value: float | None = None) -> None:
        """Record a counted piece (``value`` None: only that it was counted, for the planner)."""
        if key in self.exact:
            return
        self.exact[key] = value
        kind, point = self.split(key)
        fit = self.fits.setdefault(kind, _KindFit(len(point)))
        fit.add(point, value)
        if fit.broken:
            self.solved.clear()  # nothing solved is trusted once a count disagrees


def block_kind(fixed: tuple, n: int, o: int) -> tuple[Hashable, tuple[int, ...]]:
    """A block piece's kind and point: ``fixed`` (batch, trained flags, ...) and the tokens it takes
    (``n``) and keeps (``o``). A block that keeps every token runs whole, one that drops selects
    (different ops); keeping one token leaves no slot to fuse the dropped ones into (EViT): each
    its own kind."""
    if o >= n or o < 2:
        return (*fixed, "whole" if o >= n else "one"), (n,)
    return (*fixed, "drop"), (n, o)


def _split_block(key: tuple) -> tuple[Hashable, tuple[int, ...]]:
    batch, n, o, trained, below = key
    return block_kind((batch, trained, below), n, o)


def _split_rest(key: tuple) -> tuple[Hashable, tuple[int, ...]]:
    batch, last, embeddings = key
    return (batch, embeddings), (last,)


class StepCounts:
    """A step's counted FLOPs from its pieces (:func:`planners.rules.flop_count_keys`)."""

    def __init__(self) -> None:
        self.blocks = PieceCounts(_split_block)
        self.rest = PieceCounts(_split_rest)

    def known(self, keys: tuple[list[tuple], tuple]) -> bool:
        """Whether a step with these pieces needs no counting."""
        blocks, rest = keys
        return self.rest.known(rest) and all(self.blocks.known(k) for k in blocks)

    def lookup(self, keys: tuple[list[tuple], tuple]) -> float | None:
        """The step's count, or None where a piece is neither counted nor solvable (count the step)."""
        blocks, rest = keys
        total = self.rest.get(rest)
        for k in blocks:
            if total is None:
                return None
            part = self.blocks.get(k)
            total = None if part is None else total + part
        return total

    def record(self, keys: tuple[list[tuple], tuple], block_values: Sequence[float] | None = None,
               rest_value: float | None = None) -> None:
        blocks, rest = keys
        for i, k in enumerate(blocks):
            self.blocks.add(k, None if block_values is None else block_values[i])
        self.rest.add(rest, rest_value)
