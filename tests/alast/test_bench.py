import json

from click.testing import CliRunner

from alast.bench import BenchPlan, aggregate
from alast.config import load_config
from alast_cli.main import cli


def test_bench_writes_results_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "--policies", "full,alast,tokens", "--steps", "3", "--batch-size", "8",
                                   "--target-flops", "0.5", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    full, alast, tokens = (table["policies"][p] for p in ("full", "alast", "tokens"))
    assert full["train_flops_ratio"] == 1.0
    assert abs(alast["train_flops_ratio"] / 0.5 - 1) < 0.05 and abs(tokens["train_flops_ratio"] / 0.5 - 1) < 0.05
    assert alast["plan"]["knobs"]["k_trained"] >= 1 and "keep_ratio" in tokens["plan"]["knobs"]
    for name in ("results.json", "results.md", "accuracy_vs_flops.png", "step_time.png", "budgets_alast.png"):
        assert (out / name).exists(), name
    assert "| alast |" in (out / "results.md").read_text()


def test_bench_rotates_policy_order_across_seeds():
    plan = BenchPlan(load_config(), ["full", "alast", "freeze"], [0, 1, 2], out=None)
    firsts = [plan.runs[i * 3][0] for i in range(3)]
    assert firsts == ["full", "alast", "freeze"]
    assert sorted(plan.runs) == sorted((p, s) for p in ("full", "alast", "freeze") for s in (0, 1, 2))


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
