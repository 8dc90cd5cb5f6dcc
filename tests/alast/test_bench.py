import json

from click.testing import CliRunner

from alast.bench import BenchPlan, aggregate
from alast.bench_runs import MATCHED, matched_steps
from alast.config import load_config
from alast_cli.main import cli


def test_bench_writes_results_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "--policies", "full,alast,tokens", "--steps", "4", "--batch-size", "8",
                                   "--set", "backend.threads=1", "--target-flops", "0.5", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    full, alast, tokens = (table["policies"][p] for p in ("full", "alast", "tokens"))
    assert full["train_flops_ratio"] == 1.0
    assert abs(alast["train_flops_ratio"] / 0.5 - 1) < 0.05 and abs(tokens["train_flops_ratio"] / 0.5 - 1) < 0.05
    assert alast["plan"]["knobs"]["k_trained"] >= 1 and "keep_ratio" in tokens["plan"]["knobs"]
    for name in ("results.json", "results.md", "accuracy_vs_flops.png", "step_time.png", "budgets_alast.png"):
        assert (out / name).exists(), name
    assert "| alast |" in (out / "results.md").read_text()
    same = table["same_steps"]
    assert abs(same["diff"] - (alast["val_accuracy"] - full["val_accuracy"])) < 1e-12
    assert same["line"].startswith("Same steps: alast") and same["line"] in (out / "results.md").read_text()
    assert f"at {alast['train_flops_ratio']:.3f}x full's counted FLOPs" in same["line"]
    _check_matched(out, table)


def _check_matched(out, table):
    """--target-flops turns on full@matched: full fine-tuning for the alast run's counted FLOPs, run right after it."""
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in raw]
    assert labels[labels.index("alast") + 1] == MATCHED and labels.count(MATCHED) == 1
    alast_run, matched_run = raw[labels.index("alast")], raw[labels.index(MATCHED)]
    assert matched_run["policy"] == "full" and matched_run["seed"] == alast_run["seed"]
    assert matched_run["steps"] == matched_steps(alast_run) == 2  # round(4 x ~0.5)
    row, alast = table["policies"][MATCHED], table["policies"]["alast"]
    assert row["steps"] == 2 and abs(row["train_flops_ratio"] - 0.5) < 1e-9  # the achieved ratio: 2 of 4 steps
    assert abs(row["train_flops_ratio"] - alast["train_flops_ratio"]) <= 0.5 / 4
    m = table["matched"]
    assert abs(m["diff"] - (alast["val_accuracy"] - row["val_accuracy"])) < 1e-12
    assert m["line"] in (out / "results.md").read_text()
    assert (out / "runs" / "full-matched-t0.5-seed0" / "summary.json").exists()


def test_bench_rotates_policy_order_across_seeds():
    plan = BenchPlan(load_config(), ["full", "alast", "freeze"], [0, 1, 2], out=None)
    firsts = [plan.runs[i * 3].policy for i in range(3)]
    assert firsts == ["full", "alast", "freeze"]
    assert sorted((r.policy, r.seed) for r in plan.runs) == sorted((p, s) for p in ("full", "alast", "freeze")
                                                                   for s in (0, 1, 2))


def test_bench_refuses_without_full(tmp_path):
    res = CliRunner().invoke(cli, ["bench", "--policies", "alast", "--steps", "2", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "needs 'full'" in res.stderr


def test_aggregate_means_and_ratios():
    rs = [{"policy": "full", "seed": s, "val_accuracy": a, "train_flops": 10.0, "peak_memory_bytes": 100,
           "wall_time_s": 2.0, "median_step_time_s": 1.0, "train_time_s": 1.5, "full_ft_train_flops": 10.0}
          for s, a in ((0, 0.9), (1, 0.8))]
    rs += [{"policy": "alast", "seed": 0, "val_accuracy": 0.85, "train_flops": 4.0, "peak_memory_bytes": 50,
            "wall_time_s": 1.0, "median_step_time_s": 0.5, "train_time_s": 0.7, "full_ft_train_flops": 10.0}]
    t = aggregate(rs, ["full", "alast"])
    assert abs(t["policies"]["full"]["val_accuracy"] - 0.85) < 1e-12
    a = t["policies"]["alast"]
    assert a["train_flops_ratio"] == 0.4 and a["peak_memory_bytes_ratio"] == 0.5 and a["speedup_vs_full"] == 2.0
    assert abs(a["speedup_share_of_flop_bound"] - 0.8) < 1e-12


def test_a_target_out_of_a_policys_reach_fails_the_bench_before_any_run(tmp_path):
    """Full fine-tuning runs first (seed 0's order); the alast target it cannot reach must stop the
    bench before that run trains, not after it."""
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "--policies", "full,alast", "--steps", "2", "--batch-size", "2",
                                   "--set", "backend.threads=1", "--set", "backend.token_multiple=32",
                                   "--target-flops", "0.35", "--out", str(out)])
    assert res.exit_code == 2 and "too few tokens or steps to divide finer" in res.stderr
    assert not (out / "runs").exists() and not (out / "raw.jsonl").exists()
