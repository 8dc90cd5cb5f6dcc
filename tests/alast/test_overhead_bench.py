"""benchmarks/overhead.py times today's default at a FLOPs target, sparse and dense steps apart."""
from __future__ import annotations

import json

from tests.conftest import load_benchmark


def test_overhead_at_a_target_combines_the_two_phases(tmp_path):
    bench = load_benchmark("overhead")
    out = tmp_path / "overhead.json"
    bench.main(["--model", "alast_demo_vit", "--batch-size", "2", "--rounds", "1", "--device", "cpu",
                "--target-flops", "0.4", "--steps", "40", "--set", "policy.dense_final_frac=0.3", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["median_step_s"]) == {"plain", "patched", "full", "alast", "alast_dense"}
    assert r["dense_final_share"] == 0.3
    assert r["flops"]["alast"] < r["flops"]["alast_dense"] < r["flops"]["full"] == r["flops"]["plain"]
    assert abs(r["run_flops_ratio_alast_vs_full"] - 0.4) < 0.4 * 0.03  # the solver's target, counted
    assert r["run_speedup_alast_vs_full"] > 0 and r["memory_ratio_alast_vs_full"] < 1


def test_overhead_refuses_settings_its_timing_cannot_honour(tmp_path):
    bench = load_benchmark("overhead")
    base = ["--model", "alast_demo_vit", "--device", "cpu", "--out", str(tmp_path / "o.json")]
    for extra, says in ((["--target-flops", "0.4", "--set", "policy.early_frac=0.3"], "policy.early_frac is off"),
                        (["--target-flops", "0.4", "--set", "policy.no_such_key=1"], "no_such_key"),
                        (["--set", "policy.dense_final_frac=0.3"], "--set applies with --target-flops")):
        try:
            bench.main(base + extra)
        except SystemExit as e:
            assert says in str(e.code), e.code
        else:
            raise AssertionError(f"{extra} was not refused")
    assert not (tmp_path / "o.json").exists()
