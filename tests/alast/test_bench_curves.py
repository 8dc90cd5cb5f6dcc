"""`alast bench --targets`: accuracy-versus-FLOPs curves, skips, verdicts; bad input."""
import json
import re

import pytest
from click.testing import CliRunner

from alast.bench_curves import verdicts
from alast.bench_runs import BY_STEPS, compare
from alast_cli.main import cli

FAST = ["--steps", "4", "--batch-size", "16", "--set", "backend.threads=1", "--set", "data.val_fraction=0.05"]


def test_bench_targets_writes_curves_skips_and_verdicts(tmp_path):
    """Curves over 0.05 and 0.5 in 5 steps: full@steps takes 3 steps at 0.5 (rounded half up: not
    round()'s 2), whose 0.6x is flagged as off its target in the table and the verdict; random
    reaches no target (its k_trained) and is skipped and named; at 0.05, which no policy reaches,
    full@steps does not run either."""
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "--targets", "0.05,0.5", "--policies", "full,alast,tokens,random",
                                   "--seeds", "1", "--steps", "5", "--batch-size", "16", "--set", "backend.threads=1",
                                   "--set", "data.val_fraction=0.05", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    records = json.loads((out / "curves.json").read_text())["records"]
    trained = {(r["policy"], r["target"]): r for r in records if "skipped" not in r}
    assert set(trained) == {(BY_STEPS, 0.5), (BY_STEPS, 1.0), ("alast", 0.5), ("tokens", 0.5)}
    assert [trained[(BY_STEPS, t)]["steps"] for t in (0.5, 1.0)] == [3, 5]
    for (policy, t), r in trained.items():
        assert r["train_flops"] > 0 and 0 <= r["val_accuracy"] <= 1 and r["wall_time_s"] > 0
        assert (out / "runs" / f"{policy.replace('@', '-')}-t{t:g}-seed0" / "summary.json").exists()
        if policy == BY_STEPS:
            assert abs(r["flops_ratio"] - r["steps"] / 5) < 1e-9
        else:
            assert abs(r["flops_ratio"] / t - 1) < 0.05 and r["steps"] == 5
    skipped = {(r["policy"], r["target"]): r["skipped"] for r in records if "skipped" in r}
    assert set(skipped) == {("random", 0.05), ("random", 0.5), ("alast", 0.05), ("tokens", 0.05), (BY_STEPS, 0.05)}
    assert all("cannot reach" in why and "k_trained" in why for (p, t), why in skipped.items() if p == "random")
    assert "nothing to compare with" in skipped[(BY_STEPS, 0.05)]
    assert not (out / "runs" / "full-steps-t0.05-seed0").exists()
    off = {p["target"]: p["off_target"] for p in result["points"] if p["policy"] == BY_STEPS and p["target"] < 1}
    assert off == {0.5: pytest.approx(0.2, abs=1e-9)}
    flag = "0.600x (20.0% over the target: not the same cost)"
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "### Target 0.5x" in md and "- random: skipped: policy 'random'" in md
    assert f"| {BY_STEPS} | 1 | 3 | {flag} |" in md and f"- {BY_STEPS}: skipped: no other policy reaches 0.05x" in md
    verdicts = [v for v in result["verdicts"] if v["target"] != 0.05]
    assert len(verdicts) == 1 and flag in verdicts[0]["line"]
    _check_verdicts(verdicts, trained, md)


def _check_verdicts(verdict_list, trained, md):
    """Each verdict's numbers and words follow from the records in curves.json."""
    assert [v["target"] for v in verdict_list] == [0.5]
    for v in verdict_list:
        t, acc = v["target"], trained[("alast", v["target"])]["val_accuracy"]
        assert set(v["comparisons"]) == {BY_STEPS, "tokens"}
        for name, c in v["comparisons"].items():
            diff = acc - trained[(name, t)]["val_accuracy"]
            assert abs(c["diff"] - diff) < 1e-12 and c["pooled_std"] is None  # one seed: no spread
            side = "above" if diff > 0 else "below" if diff < 0 else "level with"
            part = re.search(rf"vs {re.escape(name)} [^;]*", v["line"]).group(0)
            assert f"{100 * diff:+.2f} pts, {side}" in part
        assert f"- {v['line']}" in md


def test_verdicts_use_pooled_std_over_seeds():
    recs = [{"policy": p, "target": 0.5, "seed": s, "val_accuracy": a, "flops_ratio": 0.5}
            for p, s, a in (("alast", 0, 0.80), ("alast", 1, 0.82), (BY_STEPS, 0, 0.70), (BY_STEPS, 1, 0.71),
                            ("tokens", 0, 0.75), ("tokens", 1, 0.90))]
    recs.append({"policy": "alast", "target": 0.3, "seed": 0, "skipped": "out of reach"})
    v5, v3 = verdicts(recs, (0.5, 0.3))
    assert v5["comparisons"][BY_STEPS]["exceeds_pooled_std"] is True
    assert v5["comparisons"]["tokens"] == {**compare([0.80, 0.82], [0.75, 0.90]), "flops_ratio": 0.5,
                                           "off_target": None}
    assert v5["comparisons"]["tokens"]["exceeds_pooled_std"] is False and "no clear difference" in v5["line"]
    assert v3["alast"] is None and v3["line"] == "target 0.3: no verdict: out of reach"


@pytest.mark.parametrize("args, message", [
    (["--targets", "0.5,abc"], "'abc' is not a number"),
    (["--targets", "0.5,1.5"], "1.5 is not in (0, 1]"),
    (["--targets", "0.5,0.5"], "lists 0.5 twice"),
    (["--targets", "0.5", "--target-flops", "0.5"], "not both"),
    (["--matched", "--policies", "full,tokens"], "add alast to --policies"),
    (["--targets", "0.5", "--set", "backend.count_flops=off"], "count_flops is off"),
    # every point skipped: exit 0 with empty tables, and a results.md of "model `None`, data `None`"
    (["--targets", "1.0"], "no run of this bench reaches its --targets: target 1x full FLOPs is above what"),
])
def test_bench_bad_curve_options_exit_2(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["bench", "--policies", "full,alast", *FAST, "--out", str(tmp_path / "b"), *args])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (tmp_path / "b" / "runs").exists()


def test_verdicts_name_every_row_that_ran_at_the_target():
    """A loss to freeze or random at the same target was left out of the verdicts."""
    recs = [{"policy": p, "target": 0.8, "seed": 0, "val_accuracy": a, "flops_ratio": 0.8}
            for p, a in (("alast", 0.20), ("freeze", 0.29), (BY_STEPS, 0.15), ("random", 0.10))]
    recs.append({"policy": "tokens", "target": 0.8, "seed": 0, "skipped": "out of reach"})
    (v,) = verdicts(recs, (0.8,))
    assert list(v["comparisons"]) == [BY_STEPS, "freeze", "random"]
    assert "vs freeze 29.00% at 0.800x: -9.00 pts, below" in v["line"]


def test_matched_over_targets_does_not_run_full_by_steps_again(tmp_path):
    """Over targets, full@matched at the steps of full@steps is the same run; it ran twice."""
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "--targets", "0.5", "--policies", "full,alast", "--matched", "--seeds", "1",
                                   *FAST, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    records = json.loads((out / "curves.json").read_text())["records"]
    matched = [r for r in records if r["policy"] == "full@matched"]
    assert len(matched) == 1 and matched[0]["skipped"] == f"the same run as {BY_STEPS} at 0.5x (2 steps, seed 0)"
    assert not (out / "runs" / "full-matched-t0.5-seed0").exists()
    assert "- full@matched: skipped: the same run as" in (out / "results.md").read_text()
    trained = sum("skipped" not in r for r in records)
    last = re.findall(r"\[(\d+)/(\d+)\]", res.stderr)[-1]
    assert last == (str(trained), str(trained))  # the count ends full once the skip is known
