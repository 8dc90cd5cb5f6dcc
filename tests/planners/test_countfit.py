"""Counted FLOPs of step pieces never counted, solved exactly from counted ones
(:mod:`planners.countfit`); used only once further counts agreed, never where they disagree."""
from __future__ import annotations

import random

import pytest

from planners.countfit import VERIFY, PieceCounts, StepCounts
from planners.rules import flop_count_keys


def block(n: int, o: int) -> float:
    """The form a ViT block's count takes: linear layers on its tokens, attention of o over n."""
    return float(198656 + 75776 * n + 124672 * o + 1792 * n * o)


def block_key(n, o, trained=True, below=True, batch=4):
    return (batch, n, o, trained, below)


def pieces() -> PieceCounts:
    return StepCounts().blocks


def points(k: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pts = set()
    while len(pts) < k:
        n = rng.randint(20, 196)
        pts.add((n, rng.randint(1, n - 1)))
    return sorted(pts, key=lambda p: rng.random())


def test_a_kind_is_solved_only_after_a_basis_and_agreeing_counts():
    pc = pieces()
    pts = points(6 + VERIFY + 1)
    unseen = (150, 77)
    for i, (n, o) in enumerate(pts[:-1]):
        assert not pc.known(block_key(*unseen)) and pc.get(block_key(*unseen)) is None, i
        pc.add(block_key(n, o), block(n, o))
    assert pc.known(block_key(*unseen))
    for n, o in [unseen, (196, 2), (21, 20), pts[-1]]:
        assert pc.get(block_key(n, o)) == block(n, o)


def test_a_kind_that_disagrees_is_never_solved():
    """A count that is not a polynomial of degree two (a cubic term) breaks its kind for good:
    every new shape of it is counted, as before."""
    pc = pieces()
    for n, o in points(20):
        pc.add(block_key(n, o), block(n, o) + n * n * o)
    assert not pc.known(block_key(150, 77)) and pc.get(block_key(150, 77)) is None
    assert pc.get(block_key(*points(20)[0])) is not None  # what was counted is still read back


def test_points_on_one_line_never_determine_the_kind():
    """A fixed keep ratio puts every point on one line: the monomials are dependent, nothing is
    guessed from them."""
    pc = pieces()
    for n in range(40, 196, 4):
        pc.add(block_key(n, n // 2 if n % 4 == 0 else n), block(n, n // 2))
    assert not pc.known(block_key(150, 77))


def test_kinds_do_not_mix():
    """Batch, trained flags, and whether the block drops at all or keeps a single token (no slot to
    fuse the dropped ones into) each have their own polynomial."""
    pc = pieces()
    for n, o in points(12):
        pc.add(block_key(n, o), block(n, o))
    assert pc.known(block_key(150, 77))
    for other in [block_key(150, 77, trained=False), block_key(150, 77, below=False), block_key(150, 77, batch=8),
                  block_key(150, 150), block_key(150, 1)]:
        assert not pc.known(other), other


def test_a_dense_block_kind_is_a_polynomial_in_its_tokens():
    pc = pieces()
    for n in [196, 120, 60, 33, 90, 150][:3 + VERIFY]:
        pc.add(block_key(n, n), block(n, n))
    assert pc.get(block_key(101, 101)) == block(101, 101)


def test_non_integer_solutions_are_not_used():
    """A count is a whole number of FLOPs: a solution that is not one is not read as a count."""
    pc = pieces()
    for n, o in points(6 + VERIFY):
        pc.add(block_key(n, o), block(n, o) + n * o / 2)
    assert pc.get(block_key(101, 51)) is None and pc.get(block_key(100, 51)) == block(100, 51) + 2550


def test_the_planner_knows_what_the_runtime_knows_without_values():
    """Which steps are counted depends on which keys were counted, not on their values: the planner
    (no values) and a runtime (values) agree step by step."""
    rng = random.Random(3)
    with_values, planner = StepCounts(), StepCounts()
    agree = counted = 0
    for _ in range(60):
        tokens_in, kept, n = [], [], 196
        for _ in range(6):
            o = max(1, int(n * rng.uniform(0.6, 1.0)))
            tokens_in.append(n)
            kept.append(o)
            n = o
        trained = [rng.random() < 0.6 for _ in range(6)]
        keys = flop_count_keys(4, tokens_in, kept, trained, rng.random() < 0.5)
        known = with_values.known(keys)
        assert known == planner.known(keys)
        if not known:
            counted += 1
            with_values.record(keys, [block(n, o) for n, o in zip(tokens_in, kept)], 1000.0)
            planner.record(keys)
        else:
            assert with_values.lookup(keys) == sum(block(n, o) for n, o in zip(tokens_in, kept)) + 1000.0
            agree += 1
    assert agree > 30 and counted < 30


@pytest.mark.parametrize("bad_key", [(4, 10, 5, True, True)])
def test_read_back_is_exact_for_counted_keys(bad_key):
    pc = pieces()
    pc.add(bad_key, 12345.0)
    assert pc.get(bad_key) == 12345.0 and pc.known(bad_key)
