"""benchmarks/ort_profile.py profiles one budget on both runtimes and groups the ops by family."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

pytest.importorskip("onnxruntime.training.api")


def load_bench():
    return load_benchmark("ort_profile")


def test_ort_profile_groups_both_runtimes_ops_by_family(tmp_path, monkeypatch):
    bench = load_bench()
    from runtimes.ort_backend import artifacts

    options = artifacts.ArtifactCache._session_options
    traces, mkdtemp = [], bench.tempfile.mkdtemp

    def recorded(*args, **kwargs):
        path = mkdtemp(*args, **kwargs)
        if kwargs.get("prefix") == "alast-ort-profile-":
            traces.append(path)
        return path

    monkeypatch.setattr(bench.tempfile, "mkdtemp", recorded)
    out = tmp_path / "profile.json"
    bench.main(["--batch-size", "4", "--warmup", "1", "--steps", "3", "--keep", "0.8", "--gemm", "--out", str(out)])
    assert artifacts.ArtifactCache._session_options is options  # the profiling patch is undone
    assert traces and not Path(traces[0]).exists()  # and ORT's traces removed
    r = json.loads(out.read_text())
    fams = {f["family"]: f for f in r["families"]}
    assert r["kept_tokens"][:3] == [64, 64, 51]  # the frozen blocks keep every token
    for side in ("torch", "ort"):
        assert fams["matrix products and attention"][f"{side}_ms"] > 0
        assert fams["layer norm gradient"][f"{side}_calls"] == pytest.approx(9)  # 4 trained blocks x 2, final norm
    assert "GatherNDGrad" in r["ort_ops"] and "LayerNormalizationGrad" in r["ort_ops"]
    assert "aten::native_layer_norm_backward" in r["torch_ops"]
    assert r["ort_ops"]["aten::lerp_"]["calls"] > 0  # the AdamW update the ort step runs in torch
    assert {(g["m"], g["k"]) for g in r["gemm"]} >= {(4 * 65, 128)} and all(g["ort_ms"] > 0 for g in r["gemm"])


def test_ort_profile_takes_a_runs_step_and_checks_its_tokens(tmp_path):
    bench = load_bench()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("policy:\n  min_tokens: 1\nbackend:\n  token_multiple: 1\n")
    step = {"step": 7, "keep_ratios": [1.0, 1.0, 0.75, 0.5, 1.0, 0.0], "trained_blocks": [2, 3, 4, 5],
            "embeddings_trained": False, "kept_tokens": [64, 64, 48, 24, 24, 1]}
    (run / "metrics.jsonl").write_text(json.dumps({**step, "step": 6}) + "\n" + json.dumps(step) + "\n")
    budget, kept = bench.run_budget(run, 7, 6)
    assert budget.keep_ratios == tuple(step["keep_ratios"]) and kept == (64, 64, 48, 24, 24, 1)
    assert budget.trained == (False, False, True, True, True, True) and not budget.train_embeddings
    with pytest.raises(SystemExit, match="no step 8"):
        bench.run_budget(run, 8, 6)
    (run / "metrics.jsonl").write_text(json.dumps({**step, "kept_tokens": [64, 64, 47, 24, 24, 1]}) + "\n")
    with pytest.raises(SystemExit, match="where the run kept"):
        bench.main(["--batch-size", "2", "--warmup", "1", "--steps", "1", "--from-run", str(run), "--step", "7",
                    "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
