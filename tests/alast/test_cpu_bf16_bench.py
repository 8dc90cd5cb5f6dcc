"""benchmarks/cpu_bf16.py runs end to end with tiny settings and writes complete rows."""
from __future__ import annotations

import json

import pytest

from runtimes.torch_backend import precision
from tests.conftest import load_benchmark


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # functional on any CPU, fast on some
    module = load_benchmark("cpu_bf16")
    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: True)
    return module


def test_the_step_grid_alternates_precisions_and_relates_each_row_to_both_full_runs(bench, tmp_path):
    out = tmp_path / "rows.json"
    bench.main(["--models", "alast_demo_vit:2", "--targets", "0.5", "--rounds", "2", "--steps", "1", "--warmup", "0",
                "--out", str(out)])
    rows = json.loads(out.read_text())
    assert sorted((r["precision"], r["policy"]) for r in rows) == [
        ("bf16", "alast@0.5"), ("bf16", "full"), ("fp32", "alast@0.5"), ("fp32", "full")]
    by = {(r["precision"], r["policy"]): r for r in rows}
    for r in rows:
        assert len(r["round_ms"]) == 2 and r["step_ms"] > 0
        assert r["speedup_vs_full_fp32"] == pytest.approx(by["fp32", "full"]["step_ms"] / r["step_ms"])
        own_full = by[r["precision"], "full"]["step_ms"]
        assert r["speedup_vs_full_same_precision"] == pytest.approx(own_full / r["step_ms"])
    assert by["fp32", "full"]["flops_ratio"] == by["bf16", "full"]["flops_ratio"] == 1.0
    assert 0.3 < by["bf16", "alast@0.5"]["flops_ratio"] < 0.7  # the same solved target in both precisions


def test_the_attention_table_times_both_passes_and_query_counts(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ATTENTION_SHAPES", ((2, 2, 10, 8),))
    out = tmp_path / "attention.json"
    rows = bench.main(["--attention", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["queries"], r["pass"]) for r in rows] == [
        (10, "forward"), (10, "forward and backward"), (6, "forward"), (6, "forward and backward")]
    assert all(r["bf16_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)


def test_a_cpu_without_bf16_instructions_is_refused_in_one_line(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(SystemExit, match="no bf16 matrix instructions"):
        bench.main(["--models", "alast_demo_vit:2"])
