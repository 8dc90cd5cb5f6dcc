"""The bench's arithmetic without training: step counts, run order and composition, comparisons."""
import math

import pytest

from alast.bench_runs import (
    BY_STEPS,
    LORA_MATCHED,
    MATCHED,
    RunSpec,
    choose_lrs,
    compare,
    curve_runs,
    judgement,
    matched_steps,
    off_target,
    same_step_runs,
    scaled_steps,
    tune_key,
    tuning_runs,
    with_lrs,
)


def test_matched_steps_from_counted_flops():
    summary = {"policy": "alast", "steps": 150, "train_flops": 4.13e12, "full_ft_train_flops": 10.0e12}
    assert matched_steps(summary) == 62  # round(150 * 0.413 = 61.95)
    assert matched_steps({**summary, "train_flops": 0.001e12}) == 1  # never zero steps


def test_matched_steps_refuses_uncounted_run():
    with pytest.raises(ValueError, match="counted FLOPs"):
        matched_steps({"policy": "alast", "steps": 10, "train_flops": None, "full_ft_train_flops": 5.0})


def test_scaled_steps():
    assert [scaled_steps(150, t) for t in (0.3, 0.4, 0.5, 0.7, 1.0)] == [45, 60, 75, 105, 150]
    assert scaled_steps(4, 0.1) == 1


def test_scaled_steps_round_half_up():
    """round(2.5) is 2 in Python (half to even): full@steps at 0.5 of 5 steps would cost 0.4x."""
    assert scaled_steps(5, 0.5) == 3 and scaled_steps(3, 0.5) == 2 and scaled_steps(7, 0.5) == 4
    assert matched_steps({"policy": "alast", "steps": 5, "train_flops": 2.5, "full_ft_train_flops": 5.0}) == 3


def test_off_target_flags_more_than_3_percent():
    assert off_target(0.4, 0.5) == pytest.approx(-0.2) and off_target(0.6, 0.5) == pytest.approx(0.2)
    assert off_target(0.51, 0.5) is None and off_target(0.49, 0.5) is None
    assert off_target(None, 0.5) is None and off_target(0.4, None) is None


def test_curve_runs_cover_every_policy_target_and_seed_once_rotated():
    runs = curve_runs(["full", "alast", "tokens", "lora"], [0, 1], (0.5, 0.7), steps=10)
    by_seed = {s: [r for r in runs if r.seed == s] for s in (0, 1)}
    for seed, rs in by_seed.items():
        assert sorted((r.name, r.target, r.steps) for r in rs) == sorted([
            (BY_STEPS, 0.5, 5), (BY_STEPS, 0.7, 7), (BY_STEPS, 1.0, 10), ("alast", 0.5, None),
            ("alast", 0.7, None), ("tokens", 0.5, None), ("tokens", 0.7, None), ("lora", None, None)])
        assert all(r.solve == (r.policy in ("alast", "tokens")) for r in rs)
    assert by_seed[0][0] != by_seed[1][0]  # the second seed starts elsewhere
    assert len({r.dir_name() for r in runs}) == len(runs)


def test_curve_runs_do_not_repeat_full_at_one():
    runs = curve_runs(["full", "alast"], [3], (0.5, 1.0), steps=8)
    assert [r.steps for r in runs if r.name == BY_STEPS].count(8) == 1


def test_same_step_runs_rotate_and_target_every_policy_with_a_knob():
    """As over several targets (--targets), freeze and random are solved for --target-flops too;
    full (the reference) and lora (no FLOPs knob) run at their own cost."""
    runs = same_step_runs(["full", "alast", "freeze", "random", "lora"], [0, 1, 2], 0.5)
    assert [runs[i * 5].policy for i in range(3)] == ["full", "alast", "freeze"]
    assert {(r.policy, r.target, r.solve) for r in runs} == {
        ("full", None, False), ("alast", 0.5, True), ("freeze", 0.5, True), ("random", 0.5, True),
        ("lora", None, False)}
    curves = curve_runs(["full", "alast", "freeze", "random", "lora"], [0], (0.5,), steps=4)
    assert {r.policy for r in curves if r.solve} == {r.policy for r in runs if r.solve}


def test_dir_names():
    assert RunSpec("alast+lora", 2, 0.3, solve=True).dir_name() == "alast-lora-t0.3-seed2"
    assert RunSpec("full", 0, 0.5, MATCHED, 7).dir_name() == "full-matched-t0.5-seed0"
    assert RunSpec("lora", 1).dir_name() == "lora-seed1"
    assert RunSpec("alast", 0, 0.5, solve=True, lr=5e-4, tune=True).dir_name() == "alast-t0.5-seed0-lr0.0005"
    assert RunSpec("alast", 0, 0.5, solve=True, lr=5e-4).dir_name() == "alast-t0.5-seed0"  # a row's run: one rate


def test_one_learning_rate_run_per_row_and_rate_and_the_most_accurate_chosen():
    """--lrs: one tuning run per rate for each policy at each target and step count (full fine-tuning by
    steps at 1x is full at the bench's steps; a compute-matched row takes its policy's rate), on the
    first seed; the most accurate rate wins, the first listed on a tie; a row whose runs were all
    skipped keeps the base rate."""
    runs = curve_runs(["full", "alast", "lora"], [3, 4], (0.5,), 10)
    runs += [RunSpec("full", 3, 0.5, MATCHED, 6), RunSpec("lora", 3, None, LORA_MATCHED, 4)]
    tuning = tuning_runs(runs, (1e-3, 5e-4), 3, ["alast+lora"], base_steps=10)
    keys = [tune_key(r, 10) for r in tuning[::2]]
    assert keys == [("full", None, 5), ("alast", 0.5, None), ("lora", None, None), ("full", None, None)]
    assert [(r.seed, r.lr, r.tune) for r in tuning[:2]] == [(3, 1e-3, True), (3, 5e-4, True)]
    assert tuning[0].label == BY_STEPS and tuning[0].steps == 5 and tuning[2].solve and tuning[2].target == 0.5
    assert {r.steps for r in tuning} == {5, 10}  # a tuning run on fewer images keeps its row's step count
    alone = tuning_runs([RunSpec("full", 0), RunSpec("alast+lora", 0)], (1e-3, 5e-4), 0, ["alast+lora"])
    assert [r.policy for r in alone] == ["full", "full", "alast+lora", "alast+lora", "lora", "lora"]  # lora@matched's
    # over curves full@matched takes the rate of full@steps at its target, whose run it is at equal steps
    assert tune_key(RunSpec("full", 3, 0.5, MATCHED, 6), 10, curves=True) == ("full", None, 5)
    assert tune_key(RunSpec("full", 3, 1.0, MATCHED, 9), 10, curves=True) == ("full", None, None)
    assert tune_key(RunSpec("full", 3, 0.5, MATCHED, 6), 10) == ("full", None, None)
    accuracy = {("full", 1e-3): 0.5, ("full", 5e-4): 0.6, ("alast", 1e-3): 0.7, ("alast", 5e-4): 0.7}
    tuned = [(r, {"skipped": "out of reach"} if r.policy == "lora" else {"val_accuracy": accuracy[r.policy, r.lr]})
             for r in tuning]
    choices = choose_lrs(tuned, 10)
    assert [c["chosen"] for c in choices] == [5e-4, 1e-3, None, 5e-4]  # alast: a tie, the first listed
    assert choices[0]["accuracy"] == {"0.001": 0.5, "0.0005": 0.6} and choices[2]["accuracy"] == {"0.001": None,
                                                                                                "0.0005": None}
    chosen = with_lrs(runs, choices, 10)
    assert {(r.name, r.target, r.lr) for r in chosen} == {
        (BY_STEPS, 0.5, 5e-4), ("alast", 0.5, 1e-3), (BY_STEPS, 1.0, 5e-4), ("lora", None, None),
        (MATCHED, 0.5, 5e-4), (LORA_MATCHED, None, None)}


def test_compare_pooled_std_and_judgement():
    c = compare([0.80, 0.84], [0.70, 0.72])
    assert math.isclose(c["diff"], 0.11)
    assert math.isclose(c["pooled_std"], math.sqrt((0.0008 + 0.0002) / 2))
    assert c["exceeds_pooled_std"] is True and judgement(c).startswith("above, beyond")
    c = compare([0.70, 0.90], [0.78, 0.80])
    assert c["exceeds_pooled_std"] is False and "no clear difference" in judgement(c)
    c = compare([0.5], [0.6])
    assert c["pooled_std"] is None and judgement(c).startswith("below (one seed")
