"""benchmarks/ort_profile.py profiles one budget on both runtimes and groups the ops by family."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime.training.api")


def test_ort_profile_groups_both_runtimes_ops_by_family(tmp_path):
    spec = importlib.util.spec_from_file_location("ort_profile", REPO / "benchmarks" / "ort_profile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from runtimes.ort_backend import artifacts

    options = artifacts.ArtifactCache._session_options
    out = tmp_path / "profile.json"
    bench.main(["--batch-size", "4", "--warmup", "1", "--steps", "2", "--keep", "0.8", "--out", str(out)])
    assert artifacts.ArtifactCache._session_options is options  # the profiling patch is undone
    r = json.loads(out.read_text())
    fams = {f["family"]: f for f in r["families"]}
    assert r["kept_tokens"][:2] == [64, 64] and r["kept_tokens"][2] == 51  # frozen blocks keep all
    for side in ("torch", "ort"):
        assert fams["matrix products and attention"][f"{side}_ms"] > 0
        assert fams["layer norm gradient"][f"{side}_calls"] == 9  # 4 trained blocks x 2, and the final norm
    assert "GatherNDGrad" in r["ort_ops"] and "LayerNormalizationGrad" in r["ort_ops"]
    assert "aten::native_layer_norm_backward" in r["torch_ops"]
    assert any(k.startswith("aten::") for k in r["ort_ops"])  # the AdamW update the ort step runs in torch
