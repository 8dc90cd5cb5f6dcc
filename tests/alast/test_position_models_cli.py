"""A timm ``Eva`` (EVA-02) and a ``Beit`` (BEiT v2) through the CLI: trained on a FLOPs target with
their token schedule deployed, the plan replayed exactly from the run's trace, exported and
evaluated."""
import json

import pytest
from click.testing import CliRunner

from alast_cli.main import cli


# slow (`pytest -m slow`): EVA-02 about 20 s, ViT-B's width about 40; the unit tests
# (tests/runtimes/test_position_models.py) cover their parts, `benchmarks/eva_audit.py` every family
@pytest.mark.slow
@pytest.mark.parametrize("model,img_size,patches", [
    ("eva02_tiny_patch14_224", 56, 16),
    ("beitv2_base_patch16_224", 48, 9),
])
def test_it_trains_on_target_replays_exactly_and_exports_its_token_schedule(model, img_size, patches, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(cli, ["train", "--model", model, "--no-pretrained", "--set", f"model.img_size={img_size}",
                              "--data", "digits", "--steps", "4", "--batch-size", "4", "--target-flops", "0.5",
                              "--set", "policy.eval_tokens=trained", "--set", "backend.threads=1", "--out", str(run)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    kept = summary["eval_kept_tokens"]
    assert kept and kept[-1] < patches and 0.48 < summary["flops_ratio_vs_full"] < 0.52
    res = runner.invoke(cli, ["plan", "--trace", str(run), "--json"])
    assert res.exit_code == 0, res.output
    trace = json.loads(res.output.strip().splitlines()[-1])["trace"]
    assert abs(trace["train_flops_rel_error"]) < 1e-6
    assert abs(trace["predicted_peak_memory_sampled_steps_bytes"] / summary["peak_memory_bytes"] - 1) < 1e-3
    assert abs(trace["predicted_inference_flops_ratio"] / trace["counted_inference_flops_ratio"] - 1) < 1e-6
    onnx = tmp_path / "m.onnx"
    res = runner.invoke(cli, ["export", str(run), "--out", str(onnx)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["eval", str(onnx), "--data", "digits", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["kept_tokens"] == kept and abs(got["accuracy"] - summary["val_accuracy"]) < 1e-9
