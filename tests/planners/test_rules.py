"""The normalized budget rule as pure functions: scale-free, no first-step jump, follows changes in
relative importance, neither sticks at a clip bound nor random-walks on batch noise. No torch."""
import itertools
import math
import statistics

import pytest

from planners import rules
from tests.planners.fixtures import lognormal_deltas

B_INIT, B_MIN, B_MAX, GAIN, EMA = 0.9, 0.5, 1.0, 0.1, 0.9


def run(deltas, ema=EMA, gain=GAIN, b_init=B_INIT, b_min=B_MIN, b_max=B_MAX):
    """Budgets after each observation."""
    state, out = rules.ShareState(), []
    for d in deltas:
        state = rules.normalized_update(state, d, ema)
        out.append(rules.normalized_budgets(state, b_init, gain, b_min, b_max))
    return out


def growing(steps=200, block=2, factor=4.0, levels=(5.0, 3.0, 2.0, 1.0, 1.0, 0.5)):
    """Deltas where ``block``'s level grows geometrically by ``factor`` over the run."""
    out = []
    for i in range(steps):
        lv = list(levels)
        lv[block] *= factor ** (i / (steps - 1))
        out.append(tuple(lv))
    return out


@pytest.mark.parametrize("scale", [1e-6, 1e6])
@pytest.mark.parametrize("deltas", [
    lognormal_deltas((5.0, 3.0, 2.0, 1.0), 120, sigma=0.5, seed=3),
    growing(60),
])
def test_budgets_do_not_depend_on_the_scale_of_the_deltas(deltas, scale):
    scaled = [tuple(scale * d for d in step) for step in deltas]
    for a, b in zip(run(deltas), run(scaled)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("first", [(1e4, 1e4, 1e4), (1e-9, 5.0, 1e9), (0.0, 0.0, 0.0), (3.0, 0.0, 1.0)])
def test_first_observation_sets_the_reference_and_moves_nothing(first):
    state = rules.normalized_update(rules.ShareState(), first, EMA)
    assert state.count == 1 and state.reference == state.shares
    assert rules.normalized_budgets(state, B_INIT, GAIN, B_MIN, B_MAX) == [B_INIT] * 3


def test_a_growing_share_raises_its_budget_and_lowers_the_others():
    budgets = run(growing(200, block=2))
    first, mid, last = budgets[0], budgets[100], budgets[-1]
    assert first == [B_INIT] * 6
    assert mid[2] > B_INIT + 0.05 and last[2] > mid[2]
    assert all(last[i] < mid[i] < B_INIT for i in (0, 1, 3, 4, 5))
    assert len({round(b, 6) for b in last}) > 1  # blocks differ


def test_groups_compare_each_block_with_its_own_group_only():
    """Blocks 0-1 (frozen) keep their level while blocks 2-3 (trained) grow 8x together: over all
    blocks that would sink the frozen pair and lift the trained pair; within groups nothing moved
    relative to the group, so every budget stays at b_init. A change inside a group still counts."""
    deltas = [(1.0, 1.0, 8.0 ** (i / 99), 8.0 ** (i / 99)) for i in range(100)]
    state = rules.ShareState()
    for d in deltas:
        state = rules.normalized_update(state, d, EMA)
    mixed = rules.normalized_budgets(state, B_INIT, GAIN, B_MIN, B_MAX)
    assert mixed[0] < B_INIT - 0.1 and mixed[3] == B_MAX  # the trained pair at the clip bound
    grouped = rules.normalized_budgets(state, B_INIT, GAIN, B_MIN, B_MAX, groups=(0, 0, 1, 1))
    assert grouped == pytest.approx([B_INIT] * 4)
    for d in [(1.0, 1.0, 16.0, 8.0)] * 60:  # block 2 doubles against block 3
        state = rules.normalized_update(state, d, EMA)
    grouped = rules.normalized_budgets(state, B_INIT, GAIN, B_MIN, B_MAX, groups=(0, 0, 1, 1))
    assert grouped[2] > B_INIT + 0.04 > B_INIT - 0.04 > grouped[3]
    assert grouped[:2] == pytest.approx([B_INIT] * 2)
    with pytest.raises(ValueError, match="3 group labels for 4 blocks"):
        rules.normalized_budgets(state, B_INIT, GAIN, B_MIN, B_MAX, groups=(0, 0, 1))


def test_gain_is_the_budget_gap_per_doubling_of_relative_share():
    """Block 0's share doubles relative to the others': once the EMA has settled, its budget sits
    ``gain`` above theirs (and the mean stays at b_init while nothing clips)."""
    deltas = [(1.0, 1.0, 1.0, 1.0)] * 10 + [(2.0, 1.0, 1.0, 1.0)] * 400
    final = run(deltas, b_min=0.1)[-1]
    assert final[0] - final[1] == pytest.approx(GAIN, rel=1e-6)
    assert statistics.mean(final) == pytest.approx(B_INIT, rel=1e-9)
    final = run(deltas, gain=0.25, b_min=0.1, b_init=0.7)[-1]
    assert final[0] - final[3] == pytest.approx(0.25, rel=1e-6)


def test_a_change_common_to_every_block_moves_nothing():
    deltas = [(3.0, 2.0, 1.0)] * 20 + [(300.0, 200.0, 100.0)] * 50
    assert run(deltas)[-1] == pytest.approx([B_INIT] * 3)


@pytest.mark.parametrize("sigma,seed", [(0.3, 0), (0.5, 1), (0.5, 2)])
def test_stationary_noise_neither_sticks_at_a_bound_nor_wanders(sigma, seed):
    levels = (5.0, 3.0, 2.0, 1.0, 1.0, 0.5)
    budgets = run(lognormal_deltas(levels, 300, sigma=sigma, seed=seed, scale=1e3))
    for block in range(len(levels)):
        series = [b[block] for b in budgets]
        assert B_MIN + 0.2 < statistics.mean(series) < B_MAX - 0.05
        assert sum(b in (B_MIN, B_MAX) for b in series) <= 3
        steps = [abs(x - y) for x, y in itertools.pairwise(series)]
        assert max(steps) < 0.05 and statistics.mean(steps) < 0.01
        # no drift: the reference's own noise leaves an offset, but it does not grow
        assert statistics.mean(series[-100:]) == pytest.approx(B_INIT, abs=0.08)
        assert statistics.mean(series[-100:]) == pytest.approx(statistics.mean(series[100:200]), abs=0.02)


def test_the_paper_rule_sticks_where_the_normalized_one_does_not():
    """Same noisy sequence at a ViT-B-like delta scale, alpha = lr = 1e-3: the literal rule pins
    every budget at b_max after the first step."""
    deltas = lognormal_deltas((5.0, 3.0, 2.0, 1.0), 100, sigma=0.3, seed=0, scale=1e3)
    budgets, prev = [B_INIT] * 4, [0.0] * 4
    for d in deltas[:1]:
        budgets, prev = rules.update_budgets(budgets, d, prev, 1e-3, B_MIN, B_MAX), d
    assert budgets == [B_MAX] * 4
    assert max(abs(b - B_INIT) for b in run(deltas)[0]) == 0.0


def test_bad_steps_leave_the_state_alone():
    state = rules.normalized_update(rules.ShareState(), (1.0, 2.0), EMA)
    for bad in [(math.nan, 1.0), (math.inf, 1.0), (-1.0, 1.0)]:
        assert rules.normalized_update(state, bad, EMA) == state


@pytest.mark.parametrize("ema,horizon", [(0.0, 1), (0.5, 2), (0.9, 10), (0.98, 50)])
def test_reference_is_the_mean_of_the_first_steps(ema, horizon):
    assert rules.reference_horizon(ema) == horizon
    deltas = [(float(i + 1), 1.0) for i in range(horizon + 5)]
    state = rules.ShareState()
    for d in deltas:
        state = rules.normalized_update(state, d, ema)
    shares = [rules.delta_shares(d) for d in deltas[:horizon]]
    assert state.reference == pytest.approx([statistics.mean(s[i] for s in shares) for i in range(2)])
