"""benchmarks/gpu_speed.py runs end to end on the CPU with tiny settings and writes complete rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("device", "torch", "model", "batch", "precision", "compile", "policy", "target", "median_step_ms",
          "images_per_s", "peak_memory_bytes", "flops_ratio", "speedup_vs_full", "share_of_flop_bound",
          "compile_time_s", "token_multiple")


def test_gpu_speed_grid_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_speed", REPO / "benchmarks" / "gpu_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu_speed.json"
    bench.main(["--device", "cpu", "--models", "alast_demo_vit", "--batches", "2", "--steps", "2", "--warmup", "1",
                "--precision", "fp32", "--compile", "off", "--targets", "0.5", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["full", "alast@1.0", "alast@0.5"]
    for r in rows:
        assert all(k in r for k in FIELDS), set(FIELDS) - set(r)
        assert r["median_step_ms"] > 0 and r["images_per_s"] > 0
    full, machinery, target = rows
    assert full["flops_ratio"] == 1.0 and full["speedup_vs_full"] == 1.0
    assert machinery["flops_ratio"] == 1.0  # every keep ratio 1, every block trained
    assert 0.3 < target["flops_ratio"] < 0.7  # solved for 0.5 of full fine-tuning
