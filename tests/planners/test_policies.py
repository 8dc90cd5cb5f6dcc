import ast
import json
import math
import pathlib

import pytest

from planners import Budget, Observation, PlannerError, create_planner, kept_token_counts, rules

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_planners_never_import_torch():
    for path in (ROOT / "planners").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{path} imports torch"


def test_top_level_packages_are_this_projects():
    import alast_cli
    import planners
    import runtimes

    for mod in (alast_cli, planners, runtimes):
        assert pathlib.Path(mod.__file__).resolve().parent.parent == ROOT


@pytest.mark.parametrize("ratios,n,min_tokens,expected_in,expected_out", [
    ((1.0, 1.0), 16, 1, (16, 16), (16, 16)),
    ((0.5, 0.5, 0.5), 16, 1, (16, 8, 4), (8, 4, 2)),
    ((0.9, 0.9), 10, 1, (10, 9), (9, 8)),
    ((0.1, 0.1), 16, 1, (16, 1), (1, 1)),
    ((0.1, 0.1), 16, 3, (16, 3), (3, 3)),
    ((0.7,), 10, 1, (10,), (7,)),  # 0.7 * 10 = 7.000000000000001 in floats
])
def test_kept_token_counts(ratios, n, min_tokens, expected_in, expected_out):
    assert kept_token_counts(ratios, n, min_tokens) == (expected_in, expected_out)


def test_budget_update_matches_hand_computation():
    b = rules.update_budgets([0.9, 0.9, 0.6], [2.0, 0.5, 0.0], [0.0, 1.0, 0.0], alpha=0.1, b_min=0.5, b_max=1.0)
    # 0.9 + 0.1*2.0 = 1.1 -> clipped 1.0; 0.9 + 0.1*(-0.5) = 0.85; 0.6 unchanged
    assert b == pytest.approx([1.0, 0.85, 0.6])
    b = rules.update_budgets([0.55], [0.0], [1.0], alpha=0.2, b_min=0.5, b_max=1.0)
    assert b == pytest.approx([0.5])


def test_alast_planner_rule_and_state():
    p = create_planner("alast", 4, rule="paper", alpha=0.1, k_trained=2, seed=3)
    b0 = p.plan(0, 0.0)
    assert b0.keep_ratios == (0.9,) * 4 and len(b0.trained_blocks) == 2
    p.observe(Observation(0, 0.0, (1.0, 0.0, 0.5, 2.0)))
    assert p.budgets == pytest.approx([1.0, 0.9, 0.95, 1.0])
    p.observe(Observation(1, 0.1, (0.0, 0.0, 0.5, 0.0)))  # changes: -1, 0, 0, -2
    assert p.budgets == pytest.approx([0.9, 0.9, 0.95, 0.8])
    state = p.state_dict()
    q = create_planner("alast", 4, rule="paper", alpha=0.1, k_trained=2, seed=3)
    q.load_state_dict(state)
    assert q.plan(7, 0.5) == p.plan(7, 0.5)


def test_alast_selection_is_a_function_of_seed_and_step():
    a = create_planner("alast", 12, seed=1)
    b = create_planner("alast", 12, seed=1)
    assert [a.plan(s, 0).trained for s in range(20)] == [b.plan(s, 0).trained for s in range(20)]
    assert len({a.plan(s, 0).trained for s in range(20)}) > 1
    assert all(len(a.plan(s, 0).trained_blocks) == 9 for s in range(5))  # 9 of 12 by default


def test_alast_topk_mode_takes_highest_budgets():
    p = create_planner("alast", 4, k_trained=2, freeze_mode="topk", rule="paper", alpha=1.0)
    p.observe(Observation(0, 0, (0.0, 0.05, 0.0, 0.1)))
    assert p.plan(1, 0).trained_blocks == (1, 3)


def test_alast_last_mode_trains_the_top_blocks_whatever_the_budgets():
    p = create_planner("alast", 4, k_trained=2, freeze_mode="last", rule="paper", alpha=1.0)
    p.observe(Observation(0, 0, (0.1, 0.05, 0.0, 0.0)))  # the lowest blocks have the highest budgets
    assert p.budgets[0] > p.budgets[3]
    assert p.plan(1, 0).trained_blocks == (2, 3)
    assert p.plan(1, 0).keep_ratios == tuple(p.budgets)  # the budgets still set the tokens


def test_alast_last_mode_compares_trained_and_frozen_blocks_apart():
    """The trained top blocks' CLS changes grow while the frozen ones' stay: the normalized rule does
    not read that as the frozen blocks losing importance (no budget pushed to a clip bound)."""
    last = create_planner("alast", 4, k_trained=2, freeze_mode="last")
    sample = create_planner("alast", 4, k_trained=2, freeze_mode="sample")
    for step in range(60):
        grow = 4.0 ** (step / 59)
        for p in (last, sample):
            p.observe(Observation(step, step / 60, (1.0, 1.0, grow, 2 * grow)))
    assert last.budgets == pytest.approx([0.9] * 4)
    assert sample.budgets[0] < 0.85 < 0.95 < sample.budgets[3]


def test_sampling_follows_softmax_weights():
    rng = rules.step_rng(0, 0)
    counts = [0, 0, 0]
    for _ in range(3000):
        for i in rules.sample_without_replacement([0.8, 0.1, 0.1], 1, rng):
            counts[i] += 1
    assert counts[0] > 2000 and counts[1] > 150


@pytest.mark.parametrize("name,kwargs,trained,ratios", [
    ("full", {}, (True,) * 4, (1.0,) * 4),
    ("freeze", {"k_trained": 1}, (False, False, False, True), (1.0,) * 4),
    ("tokens", {"keep_ratio": 0.5}, (True,) * 4, (0.5,) * 4),
    ("tokens", {"keep_ratio": [1.0, 0.5, 1.0, 0.25]}, (True,) * 4, (1.0, 0.5, 1.0, 0.25)),
])
def test_static_policies(name, kwargs, trained, ratios):
    p = create_planner(name, 4, **kwargs)
    assert p.plan(0, 0.0) == p.plan(99, 0.9)
    b = p.plan(5, 0.5)
    assert b.trained == trained and b.keep_ratios == ratios


def test_random_policy_draws_k_blocks_per_step():
    p = create_planner("random", 6, k_trained=2, seed=0)
    sets = {p.plan(s, 0).trained_blocks for s in range(30)}
    assert all(len(s) == 2 for s in sets) and len(sets) > 5


def test_default_k_trained():
    assert rules.default_k_trained(12) == 9 and rules.default_k_trained(6) == 5
    assert rules.default_k_trained(4) == 3 and rules.default_k_trained(1) == 1
    # the top blocks: the bottom quarter frozen, halves round up; the same K where 0.75 L is whole
    assert [rules.default_k_trained(n, "last") for n in (1, 2, 4, 6, 8, 10, 12, 24)] == [1, 1, 3, 4, 6, 7, 9, 18]
    assert create_planner("alast", 6, freeze_mode="last").k_trained == 4
    assert create_planner("alast", 6, freeze_mode="sample").k_trained == 5


@pytest.mark.parametrize("name,kwargs,fragment", [
    ("nope", {}, "unknown policy 'nope'"),
    ("alast", {"b_min": 0.9, "b_init": 0.5}, "b_init"),
    ("alast", {"freeze_mode": "x"}, "freeze_mode"),
    ("alast", {"k_trained": 13}, "k_trained"),
    ("alast", {"rule": "lr"}, "rule must be"),
    ("alast", {"gain": -0.1}, "gain"),
    ("alast", {"ema": 1.0}, "ema"),
    ("alast", {"target_flops": 0.5}, "needs the model's cost model"),
    ("alast", {"target_flops": 0.0}, "target_flops must be > 0"),
    ("alast", {"batch_size": 0}, "batch_size must be >= 1"),
    ("full", {"keep_ratio": 0.5}, "does not take option(s) keep_ratio"),
    ("tokens", {"keep_ratio": 1.5}, "keep_ratio"),
])
def test_planner_errors_name_the_problem(name, kwargs, fragment):
    with pytest.raises(PlannerError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        create_planner(name, 12, **kwargs)


def test_budget_validates():
    assert Budget((0.0,), (True,)).keep_ratios == (0.0,)  # keeps min_tokens
    with pytest.raises(ValueError):
        Budget((-0.1,), (True,))
    with pytest.raises(ValueError):
        Budget((1.1,), (True,))
    with pytest.raises(ValueError):
        Budget((1.0, 1.0), (True,))


def test_duplicate_registration_is_an_error():
    from planners import register_planner

    with pytest.raises(PlannerError, match="already registered"):
        @register_planner("full")
        class Again:  # noqa: F841
            def plan(self): ...
            def observe(self): ...
            def state_dict(self): ...
            def load_state_dict(self): ...


def test_delta_reduction():
    assert rules.reduce_deltas([1.0, 3.0], "mean") == 2.0
    assert rules.reduce_deltas([1.0, 3.0], "sum") == 4.0
    assert math.isclose(rules.softmax([0.0, 0.0])[0], 0.5)


def test_dense_final_phase_sampled_keeps_all_tokens_but_still_freezes():
    p = create_planner("alast", 6, k_trained=4, b_init=0.6, b_min=0.6, dense_final_frac=0.2, seed=0,
                       dense_final_blocks="sampled")
    early, late = p.plan(10, 0.5), p.plan(90, 0.85)
    assert early.keep_ratios == (0.6,) * 6 and late.keep_ratios == (1.0,) * 6
    assert len(late.trained_blocks) == 4 and late.budgets == (0.6,) * 6
    assert early.train_embeddings and late.train_embeddings
    with pytest.raises(PlannerError, match="dense_final_frac"):
        create_planner("alast", 6, dense_final_frac=1.0)


@pytest.mark.parametrize("setting,top", [("auto", (4, 5)), (1, (5,)), (3, (3, 4, 5))])
def test_dense_final_phase_trains_the_top_blocks_without_the_embeddings(setting, top):
    p = create_planner("alast", 6, b_init=0.6, b_min=0.6, dense_final_frac=0.2, seed=0, dense_final_blocks=setting)
    early, late = p.plan(10, 0.5), p.plan(90, 0.85)
    assert early.keep_ratios == (0.6,) * 6 and early.train_embeddings and len(early.trained_blocks) == 5
    assert late.keep_ratios == (1.0,) * 6 and late.trained_blocks == top and not late.train_embeddings
    assert late.budgets == (0.6,) * 6  # the budgets still follow the deltas


@pytest.mark.parametrize("setting", [0, 7, "top", True, 2.5])
def test_dense_final_blocks_out_of_range_is_refused(setting):
    with pytest.raises(PlannerError, match="dense_final_blocks"):
        create_planner("alast", 6, dense_final_frac=0.2, dense_final_blocks=setting)


@pytest.mark.parametrize("L,top", [(1, 1), (2, 1), (4, 1), (6, 2), (12, 3), (24, 6)])
def test_dense_final_phase_auto_trains_a_quarter_of_the_depth(L, top):
    assert rules.dense_final_top(L, "auto") == top
    assert rules.dense_final_top(L, "sampled") is None


# -- the normalized rule through the planner ------------------------------------------------------
def _observe_all(planner, deltas):
    for i, d in enumerate(deltas):
        planner.observe(Observation(i, i / len(deltas), d))
    return planner


def test_alast_defaults_to_the_normalized_rule():
    p = create_planner("alast", 4)
    assert p.rule == "normalized" and p.gain == 0.1 and p.ema == 0.9
    p.observe(Observation(0, 0.0, (1e6, 1e-3, 5.0, 0.0)))  # the first step moves nothing
    assert p.plan(1, 0.0).keep_ratios == (0.9,) * 4


def test_alast_planner_state_round_trip_resumes_exactly():
    from tests.planners.fixtures import lognormal_deltas

    deltas = lognormal_deltas((4.0, 2.0, 1.0, 0.5, 0.5, 0.25), 80, sigma=0.4, seed=5)
    a = _observe_all(create_planner("alast", 6, seed=2), deltas[:40])
    state = json.loads(json.dumps(a.state_dict()))
    b = create_planner("alast", 6, seed=2)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for i, d in enumerate(deltas[40:], start=40):
        assert a.plan(i, i / 80) == b.plan(i, i / 80)
        a.observe(Observation(i, i / 80, d))
        b.observe(Observation(i, i / 80, d))
    assert a.budgets == b.budgets and a.budgets != [0.9] * 6


def test_a_state_resumes_only_with_the_k_it_was_saved_with():
    """The default K may change between versions (4 of 6 since the bottom quarter stays frozen); a run
    saved with another K is refused, not silently continued with other blocks trained."""
    state = create_planner("alast", 6, freeze_mode="last", k_trained=5).state_dict()
    with pytest.raises(PlannerError, match=r"saved with k_trained=5, this planner trains 4 blocks"):
        create_planner("alast", 6, freeze_mode="last").load_state_dict(state)
    create_planner("alast", 6, freeze_mode="last", k_trained=5).load_state_dict(state)
    del state["k_trained"]  # saved before the key existed: loads unchecked
    create_planner("alast", 6, freeze_mode="last").load_state_dict(state)


def test_state_saved_before_the_normalized_rule_loads_into_the_paper_rule():
    old = {"name": "alast", "budgets": [0.8, 0.95, 1.0, 0.5], "prev_deltas": [1.0, 2.0, 3.0, 4.0]}
    p = create_planner("alast", 4, rule="paper", alpha=0.1)
    p.load_state_dict(old)
    p.observe(Observation(0, 0.0, (1.0, 2.0, 3.0, 3.0)))
    assert p.budgets == pytest.approx([0.8, 0.95, 1.0, 0.5 - 0.0])  # 0.5 - 0.1 clips at b_min
    with pytest.raises(PlannerError, match="rule='paper'"):
        create_planner("alast", 4).load_state_dict(old)


@pytest.mark.parametrize("alpha,deltas,expected", [
    (0.1, [(1.0, 0.0, 0.5, 2.0), (0.0, 0.0, 0.5, 0.0)], [0.9, 0.9, 0.95, 0.8]),
    (1e-3, [(1e3, 2e3, 5e2, 1.0)], [1.0, 1.0, 1.0, 0.901]),
    (0.05, [(1.0,) * 4, (3.0, 0.0, 1.0, 9.0), (3.0, 1.0, 1.0, 0.0)], [1.0, 0.95, 0.95, 0.55]),
])
def test_paper_rule_reproduces_the_literal_update(alpha, deltas, expected):
    p = _observe_all(create_planner("alast", 4, rule="paper", alpha=alpha), deltas)
    assert p.budgets == pytest.approx(expected)
    budgets, prev = [0.9] * 4, [0.0] * 4
    for d in deltas:
        budgets, prev = rules.update_budgets(budgets, d, prev, alpha, 0.5, 1.0), d
    assert p.budgets == budgets


def test_cost_model_is_an_argument_not_a_setting():
    from planners import planner_options
    from tests.planners.fixtures import synthetic_cost_model

    opts = planner_options("alast")
    assert "cost_model" not in opts and {"rule", "gain", "ema", "target_flops"} <= set(opts)
    p = create_planner("alast", 4, cost_model=synthetic_cost_model(4, 16))
    assert p.plan(0, 0.0).keep_ratios == (0.9,) * 4  # a cost model alone changes nothing
    full = create_planner("full", 4, cost_model=synthetic_cost_model(4, 16))  # any planner may be handed one
    assert full.plan(0, 0.0).keep_ratios == (1.0,) * 4
    with pytest.raises(PlannerError, match="it takes: min_tokens, seed$"):
        create_planner("full", 4, cost_modle=None)


def test_an_interleaved_dense_phase_without_a_target_uses_the_budgets_on_odd_steps():
    p = create_planner("alast", 6, k_trained=4, b_init=0.6, b_min=0.6, freeze_mode="last", spare_first="frozen",
                       dense_final_frac=0.2, dense_final_interleave=True)
    dense, sparse = p.plan(90, 0.9), p.plan(91, 0.91)
    assert dense.keep_ratios == (1.0,) * 6 and dense.trained_blocks == (4, 5) and not dense.train_embeddings
    assert sparse.keep_ratios == (1.0, 1.0, 0.6, 0.6, 0.6, 0.6) and sparse.trained_blocks == (2, 3, 4, 5)
    assert p.plan(11, 0.11) == sparse  # as the sparse phase's steps
    plain = create_planner("alast", 6, k_trained=4, b_init=0.6, b_min=0.6, freeze_mode="last",
                           spare_first="frozen", dense_final_frac=0.2)
    assert plain.plan(91, 0.91) == dense
    # a period of 3: the last of every three steps is sparse; 2 is True's period, 0 is off
    every3 = create_planner("alast", 6, k_trained=4, b_init=0.6, b_min=0.6, freeze_mode="last",
                            spare_first="frozen", dense_final_frac=0.2, dense_final_interleave=3)
    assert [every3.plan(s, s / 100) == sparse for s in range(90, 96)] == [False, False, True, False, False, True]
    assert [every3.plan(s, s / 100) == dense for s in range(90, 96)] == [True, True, False, True, True, False]
    assert create_planner("alast", 6, dense_final_frac=0.2, dense_final_interleave=2).plan(91, 0.91) == \
        create_planner("alast", 6, dense_final_frac=0.2, dense_final_interleave=True).plan(91, 0.91)
    assert create_planner("alast", 6, dense_final_frac=0.2, dense_final_interleave=0).plan(91, 0.91) == \
        create_planner("alast", 6, dense_final_frac=0.2).plan(91, 0.91)
    for bad in (1, -2):
        with pytest.raises(PlannerError, match="dense_final_interleave must be"):
            create_planner("alast", 6, dense_final_frac=0.2, dense_final_interleave=bad)
