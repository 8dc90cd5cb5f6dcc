"""A run is evaluated, re-evaluated and exported on the token schedule of its final steps."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from alast.training.loop import _Tally
from alast.training.report import read_metrics
from alast_cli.main import cli
from planners import StepResult, schedule_from_steps

STEPS = 20
TRAIN = ["train", "--steps", str(STEPS), "--batch-size", "8", "--set", "backend.threads=1",
         "--set", "backend.count_flops=off", "--set", "policy.dense_final_frac=0",  # end sparse: a schedule
         "--set", "data.val_fraction=0.05"]
TARGET = ["--target-flops", "0.6"]


def _train(out: Path, *extra: str) -> dict:
    res = CliRunner().invoke(cli, [*TRAIN, "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run deployed on its token schedule."""
    out = tmp_path_factory.mktemp("sched") / "run"
    _train(out, *TARGET, "--set", "policy.eval_tokens=trained")
    return out


def test_schedule_is_the_mean_of_the_last_tenth_of_steps(run):
    summary = json.loads((run / "summary.json").read_text())
    records = read_metrics(run / "metrics.jsonl")
    window = [r["kept_tokens"] for r in records[-2:]]  # 10% of 20 steps
    assert summary["eval_tokens"] == "trained"
    assert all(k[-1] == 1 for k in window)  # policy.trim_last: the head reads none of the last block's patches
    assert summary["eval_kept_tokens"] == summary["token_schedule"] == list(schedule_from_steps(window, 64))
    assert summary["eval_kept_tokens"][-1] == summary["eval_kept_tokens"][-2] < 64  # it drops none at evaluation
    assert summary["val_accuracy"] == summary["val_accuracy_token_schedule"]
    assert 0.2 < summary["inference_flops_ratio"] == summary["token_schedule_inference_flops_ratio"] < 1.0


def test_run_eval_and_onnx_give_the_summary_accuracy(run, tmp_path):
    pytest.importorskip("onnxruntime")
    summary = json.loads((run / "summary.json").read_text())
    res = CliRunner().invoke(cli, ["eval", str(run), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["accuracy"] == summary["val_accuracy"] and got["kept_tokens"] == summary["eval_kept_tokens"]
    res = CliRunner().invoke(cli, ["eval", str(run), "--all-tokens", "--json"])
    assert json.loads(res.stdout)["accuracy"] == summary["val_accuracy_all_tokens"]

    onnx_path = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(onnx_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept_tokens"] == summary["eval_kept_tokens"]
    res = CliRunner().invoke(cli, ["eval", str(onnx_path), "--json"])
    assert abs(json.loads(res.stdout)["accuracy"] - summary["val_accuracy"]) < 1e-9

    every = tmp_path / "every.onnx"
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(every), "--all-tokens", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["kept_tokens"] is None
    res = CliRunner().invoke(cli, ["eval", str(every), "--json"])
    assert abs(json.loads(res.stdout)["accuracy"] - summary["val_accuracy_all_tokens"]) < 1e-9
    res = CliRunner().invoke(cli, ["eval", str(every), "--all-tokens"])
    assert res.exit_code == 2 and "applies to run directories" in res.output


def test_eval_tokens_all_keeps_every_token(tmp_path):
    summary = _train(tmp_path / "all", *TARGET, "--set", "policy.eval_tokens=all")
    assert summary["eval_kept_tokens"] is None and summary["inference_flops_ratio"] is None
    assert summary["token_schedule"] is None and summary["val_accuracy_token_schedule"] is None
    assert summary["val_accuracy"] == summary["val_accuracy_all_tokens"]


def test_auto_deploys_the_more_accurate_candidate(run, tmp_path, monkeypatch):
    """The default measures both at the end; the schedule wins ties. Here the every-token model is
    made the more accurate one, so it is deployed, and eval and export follow."""
    summary = _train(tmp_path / "auto", *TARGET)
    assert summary["eval_tokens"] == "auto" and summary["token_schedule"]
    on_schedule, every = summary["val_accuracy_token_schedule"], summary["val_accuracy_all_tokens"]
    assert summary["val_accuracy"] == max(on_schedule, every)
    assert (summary["eval_kept_tokens"] == summary["token_schedule"]) == (on_schedule >= every)

    from runtimes.torch_backend.runtime import TorchRuntime

    evaluate = TorchRuntime.evaluate

    def favour_every_token(self, batches, kept=None):
        metrics = evaluate(self, batches, kept)
        return {**metrics, "accuracy": metrics["accuracy"] + (0.5 if kept is None else 0.0)}

    monkeypatch.setattr(TorchRuntime, "evaluate", favour_every_token)
    out = tmp_path / "auto_every"
    summary = _train(out, *TARGET)
    monkeypatch.undo()
    assert summary["eval_kept_tokens"] is None and summary["inference_flops_ratio"] is None
    assert summary["token_schedule"] and summary["val_accuracy"] == summary["val_accuracy_all_tokens"]
    res = CliRunner().invoke(cli, ["eval", str(out), "--json"])
    assert json.loads(res.stdout)["kept_tokens"] is None
    assert json.loads(res.stdout)["accuracy"] == pytest.approx(summary["val_accuracy"] - 0.5)


def test_full_fine_tuning_has_no_schedule(tmp_path):
    summary = _train(tmp_path / "full", "--policy", "full")
    assert summary["eval_kept_tokens"] is None and summary["val_accuracy"] == summary["val_accuracy_all_tokens"]


def test_corrupt_schedule_in_a_summary_is_one_line(run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    summary = json.loads((broken / "summary.json").read_text())
    summary["eval_kept_tokens"] = [70, 3, 3, 3, 3, 3]
    (broken / "summary.json").write_text(json.dumps(summary))
    res = CliRunner().invoke(cli, ["eval", str(broken)])
    assert res.exit_code == 2 and "eval_kept_tokens in the summary is corrupt" in res.stderr
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["eval", str(broken), "--all-tokens"])
    assert res.exit_code == 0, res.output


def _result(kept):
    return StepResult(loss=1.0, deltas=(0.0,) * 3, tokens_in=(16, *kept[:-1]), kept_tokens=tuple(kept),
                      trained_blocks=(0, 1, 2), batch_size=4, step_time_s=0.1)


def test_the_window_survives_a_checkpoint():
    tally = _Tally(schedule_window=3)
    for kept in ([12, 8, 4], [13, 9, 5], [12, 8, 5], [11, 8, 4]):
        tally.add(_result(kept), None)
    assert tally.recent_kept_tokens == [[13, 9, 5], [12, 8, 5], [11, 8, 4]]
    restored = _Tally(**json.loads(json.dumps(asdict(tally))))  # as a checkpoint stores it
    restored.add(_result([12, 9, 6]), None)
    tally.add(_result([12, 9, 6]), None)
    assert restored.schedule(16) == tally.schedule(16) == (12, 8, 5)
    assert _Tally(schedule_window=2).schedule(16) is None


def test_plan_predicts_the_schedule_and_its_inference_flops(run):
    """Replaying the run's steps on the cost model gives the schedule and inference FLOPs it counted."""
    summary = json.loads((run / "summary.json").read_text())
    res = CliRunner().invoke(cli, ["plan", "--trace", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["policies"]["alast"]["eval_kept_tokens"] == summary["eval_kept_tokens"]
    assert out["policies"]["full"]["inference_flops_ratio"] is None
    tr = out["trace"]
    assert tr["predicted_inference_flops_ratio"] == pytest.approx(tr["counted_inference_flops_ratio"], rel=1e-3)


def test_plan_before_training_names_the_schedule():
    res = CliRunner().invoke(cli, ["plan", "--target-flops", "0.5", "--json"])  # no dense final phase by default
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["eval_tokens"] == "auto" and json.loads(res.stdout)["dense_final"] is None
    alast = json.loads(res.stdout)["policies"]["alast"]
    assert len(alast["eval_kept_tokens"]) == 6 and 0.3 < alast["inference_flops_ratio"] < 0.9
    res = CliRunner().invoke(cli, ["plan", "--target-flops", "0.5", "--set", "policy.eval_tokens=all",
                                   "--json"])
    alast = json.loads(res.stdout)["policies"]["alast"]
    assert alast["eval_kept_tokens"] is None and alast["inference_flops_ratio"] is None
    # a run that ends with an all-dense phase: every token, and the plan says so
    phase = ["--set", "policy.dense_final_frac=0.3"]
    res = CliRunner().invoke(cli, ["plan", "--target-flops", "0.5", *phase, "--set", "policy.dense_final_interleave=false",
                                   "--json"])
    out = json.loads(res.stdout)
    assert out["policies"]["alast"]["eval_kept_tokens"] is None
    assert out["dense_final"] == {"policy": "alast", "frac": 0.3, "top_blocks": 2, "num_blocks": 6,
                                  "interleave": 0}
    # by default the phase interleaves sparse steps: its last steps average to a schedule
    res = CliRunner().invoke(cli, ["plan", "--target-flops", "0.5", *phase, "--json"])
    out = json.loads(res.stdout)
    kept = out["policies"]["alast"]["eval_kept_tokens"]
    assert kept[:2] == [64, 64] and 1 < kept[-1] < 64 and out["dense_final"]["interleave"] >= 2


def test_a_fused_run_is_evaluated_and_exported_with_fusion(tmp_path):
    """policy.fuse_tokens: the schedule fuses at evaluation, in `alast eval` and in the ONNX graph,
    exactly as the run's own final evaluation did."""
    pytest.importorskip("onnxruntime")
    import onnx
    import torch

    from alast.export import load_run
    from runtimes.token_schedule import token_schedule

    run = tmp_path / "fused"
    summary = _train(run, *TARGET, "--set", "policy.eval_tokens=trained", "--set", "policy.fuse_tokens=true")
    res = CliRunner().invoke(cli, ["eval", str(run), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["accuracy"] == summary["val_accuracy"]
    onnx_path = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(onnx_path), "--json"])
    assert res.exit_code == 0, res.output
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["alast.fuse_tokens"] == "true"
    res = CliRunner().invoke(cli, ["eval", str(onnx_path), "--json"])
    assert abs(json.loads(res.stdout)["accuracy"] - summary["val_accuracy"]) < 1e-9

    loaded = load_run(run)
    assert loaded.fuse_tokens
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with token_schedule(loaded.model, loaded.kept_tokens, fuse=True):
            fused = loaded.model(x)
        with token_schedule(loaded.model, loaded.kept_tokens):
            plain = loaded.model(x)
    assert not torch.allclose(fused, plain)


def test_the_ort_backend_refuses_token_fusion(tmp_path):
    res = CliRunner().invoke(cli, [*TRAIN, "--backend", "ort", "--set", "policy.fuse_tokens=true",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not fuse dropped tokens" in res.output
