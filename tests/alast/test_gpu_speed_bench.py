"""benchmarks/gpu_speed.py runs end to end on the CPU with tiny settings and writes complete rows."""
from __future__ import annotations

import json

from tests.conftest import load_benchmark

FIELDS = ("device", "torch", "model", "batch", "precision", "compile", "policy", "target", "median_step_ms",
          "images_per_s", "peak_memory_bytes", "flops_ratio", "speedup_vs_full", "share_of_flop_bound",
          "compile_time_s", "token_multiple")


def test_gpu_speed_grid_on_cpu(tmp_path):
    bench = load_benchmark("gpu_speed")
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


def test_a_grid_stopped_part_way_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    bench = load_benchmark("gpu_speed")
    measured = []

    def measure(model, batch, compiled, policy, target, args, solved):
        if len(measured) == 2:
            raise KeyboardInterrupt  # as a job's deadline would stop it
        measured.append(policy)
        return {"model": model, "batch": batch, "precision": "fp32", "compile": compiled, "policy": policy,
                "window_step_ms": 10.0 * len(measured), "flops_ratio": 1.0}

    monkeypatch.setattr(bench, "measure", measure)
    out = tmp_path / "grid.json"
    try:
        bench.main(["--device", "cpu", "--models", "alast_demo_vit", "--batches", "2", "--compile", "off",
                    "--out", str(out)])
    except KeyboardInterrupt:
        pass
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["full", "alast@1.0"]
    assert rows[1]["speedup_vs_full"] == 0.5


def test_gpu_profile_times_launch_and_step_and_names_the_top_ops_on_cpu(tmp_path):
    prof = load_benchmark("gpu_profile")
    out = tmp_path / "profile.json"
    prof.main(["--device", "cpu", "--model", "alast_demo_vit", "--batch", "2", "--steps", "1", "--warmup", "1",
               "--precision", "fp32", "--out", str(out)])
    full, alast = json.loads(out.read_text())
    assert (full["policy"], alast["policy"]) == ("full", "alast@0.5")
    for row in (full, alast):
        assert row["host_launch_ms"] > 0 and row["device_step_ms"] > 0
        assert row["top_host_ops"] and all(op["calls"] > 0 for op in row["top_host_ops"])
    assert sum(alast["kept_tokens"]) < sum(full["kept_tokens"])  # the target drops tokens


def test_op_count_on_cpu(tmp_path):
    """benchmarks/op_count.py counts a step's kernels; the machinery at full budget adds none, and a
    dropping block launches no zero-filled copy of its qkv gradient (one unbind, not three slices)
    and one log for its sampled tokens."""
    bench = load_benchmark("op_count")
    out = tmp_path / "ops.json"
    bench.main(["--models", "alast_demo_vit", "--targets", "0.5", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["full", "alast@1.0", "alast@0.5"]
    full, machinery, target = rows
    assert machinery["step_ops"] == full["step_ops"]
    assert target["step_ops"] > full["step_ops"] and target["optimizer_ops"] < full["optimizer_ops"]
    assert full["step_host_reads"] == target["step_host_reads"] == 0
    ops = target["step_ops_by_name"]
    dropping = ops["topk"]
    assert dropping >= 1
    assert ops["select_backward"] == full["step_ops_by_name"]["select_backward"]  # the head's class token alone
    assert ops["log"] == dropping
