import json

import pytest
from click.testing import CliRunner

from alast_cli.main import cli
from tests.conftest import SMALL_VAL

FAST = ["--steps", "3", "--batch-size", "16", "--set", "backend.count_flops=off", *SMALL_VAL]


@pytest.fixture
def runner():
    return CliRunner()


def test_train_writes_a_complete_run_dir(runner, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--steps", "4", "--batch-size", "16", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("policy", "backend", "steps", "val_accuracy", "train_flops", "full_ft_train_flops",
                "peak_memory_bytes", "wall_time_s", "world_size"):
        assert key in summary
    assert summary["policy"] == "alast" and summary["steps"] == 4 and summary["world_size"] == 1
    assert 0 < summary["train_flops"] < summary["full_ft_train_flops"]
    n = summary["parameters"]  # alast trains the top blocks, the embeddings stay frozen
    assert 0 < n["updated"] <= n["trainable"] < n["total"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    rec = json.loads(lines[0])
    for key in ("loss", "lr", "budgets", "kept_tokens", "trained_blocks", "step_time_s"):
        assert key in rec
    for name in ("config.yaml", "summary.json", "budgets.png", "final_model.safetensors"):
        assert (out / name).exists(), name
    assert list((out / "checkpoints").iterdir())


def test_overrides_reach_the_run(runner, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policy:\n  name: freeze\n  k_trained: 2\ntrain:\n  steps: 50\n")
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", str(cfg), *FAST, "--set", "train.lr=0.0005", "--out", str(out)])
    assert res.exit_code == 0, res.output
    resolved = (out / "config.yaml").read_text()
    assert "lr: 0.0005" in resolved and "steps: 3" in resolved and "name: freeze" in resolved
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["trained_blocks"] == [4, 5]


@pytest.mark.parametrize("args,fragment", [
    (["--model", "vit_nonexistent_model"], "unknown model 'vit_nonexistent_model'"),
    (["--policy", "magic"], "unknown policy 'magic'"),
    (["--backend", "jax"], "invalid value for 'backend.name'"),
    (["--data", "imagefolder:/no/such/dir"], "image folder not found"),
    (["--data", "mnist"], "unknown data spec"),
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--steps", "-2"], "invalid value for 'train.steps'"),
])
def test_bad_input_exits_2_with_one_line(runner, tmp_path, args, fragment):
    res = runner.invoke(cli, ["train", *FAST, "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and fragment in err[-1]
    assert "Traceback" not in res.output


def test_existing_run_dir_is_never_overwritten(runner, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = runner.invoke(cli, ["train", *FAST, "--out", str(out)])
    assert res.exit_code == 2 and "exists and holds files but no alast run" in res.stderr and "--resume" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_debug_shows_traceback(runner, tmp_path):
    res = runner.invoke(cli, ["--debug", "train", *FAST, "--policy", "magic", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_a_saved_cost_model_plans_the_target_without_profiling(runner, tmp_path, monkeypatch):
    """`alast train --cost-model FILE` and `alast bench --cost-model FILE` plan --target-flops from
    the file `alast profile` wrote; a file of another model, or one without a target, is refused."""
    import alast.planning.plan as plan_module

    cm = tmp_path / "cm.json"
    res = runner.invoke(cli, ["profile", "alast_demo_vit", "--out", str(cm)])
    assert res.exit_code == 0, res.output

    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled although a cost model was given")

    monkeypatch.setattr(plan_module, "profile_with_source", no_profiling)
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--steps", "6", "--batch-size", "8", "--target-flops", "0.5",
                              "--cost-model", str(cm), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert abs(summary["flops_ratio_vs_full"] / 0.5 - 1) < 0.05
    res = runner.invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,alast", "--steps", "2", "--batch-size", "8",
                              "--target-flops", "0.5", "--no-matched", "--cost-model", str(cm),
                              "--out", str(tmp_path / "bench"), "--json"])
    assert res.exit_code == 0, res.output
    for args, fragment in [(["--cost-model", str(cm)], "add --target-flops"),
                           (["--target-flops", "0.5", "--cost-model", str(tmp_path / "none.json")], "not found"),
                           (["--model", "alast_vit12", "--target-flops", "0.5", "--cost-model", str(cm)],
                            "is for 'alast_demo_vit', not 'alast_vit12'")]:
        res = runner.invoke(cli, ["train", *FAST, *args, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2, res.output
        assert fragment in res.output and "Traceback" not in res.output
        assert not (tmp_path / "bad").exists()


def test_a_timm_model_without_class_token_trains_and_drops_tokens(runner, tmp_path):
    """A timm ViT with global average pooling and a register token, no class token, trains with
    dropping (its cost model: tests/alast/test_profile.py; its ONNX graph:
    tests/runtimes/test_token_schedule.py)."""
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", "--model", "vit_wee_patch16_reg1_gap_256", "--set", "model.img_size=48",
                              "--steps", "2", "--batch-size", "4", "--set", "backend.count_flops=off",
                              *SMALL_VAL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(min(r["kept_tokens"]) for r in recs) < 9  # it dropped tokens
    assert all(len(r["budgets"]) == 14 for r in recs)


def test_a_targets_settings_print_as_key_value_pairs():
    from alast_cli.render import knobs_text

    knobs = {"k_trained": 4, "b_max": 1.0, "trim_last": True, "target_flops": 0.5180777947524645}
    assert knobs_text(knobs) == "k_trained=4, b_max=1, trim_last=true, target_flops=0.518 (per sparse step)"
    # under LoRA the per-step target is relative to the LoRA model's own step, and says so
    assert knobs_text(knobs, "alast+lora").endswith("target_flops=0.518 (per sparse step, of a LoRA step on every token)")


def test_a_miss_the_plan_predicted_is_not_blamed_on_the_cost_model(capsys, tmp_path):
    from alast_cli.train_cmd import _warn_target_miss

    summary = {"flops_ratio_vs_full": 0.4800, "plan": {"predicted_ratio": 0.4801}}
    _warn_target_miss(summary, 0.5, tmp_path, None)
    err = capsys.readouterr().err
    assert "-4.0% off --target-flops 0.5, as its plan predicted (0.480x)" in err and "cost model" not in err
    _warn_target_miss({**summary, "plan": {"predicted_ratio": 0.5}}, 0.5, tmp_path, None)
    assert "does not price its steps as they ran" in capsys.readouterr().err


def test_a_run_that_misses_its_target_says_so(runner, tmp_path):
    """A cost model that prices one block at 3x its real cost plans steps that spend too much: the
    run ends with one warning naming the miss and the file to re-profile. The true one: no warning."""
    cm = tmp_path / "cm.json"
    assert runner.invoke(cli, ["profile", "alast_demo_vit", "--out", str(cm)]).exit_code == 0
    doctored = json.loads(cm.read_text())
    block = doctored["blocks"][2]
    block["fwd_flops"][2] *= 3
    block["fwd_macs"][2] *= 3
    for costs in block["bwd_flops"].values():
        costs[2] *= 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doctored))
    args = ["train", *SMALL_VAL, "--steps", "8", "--batch-size", "16", "--target-flops", "0.5", "--set",
            "backend.threads=1"]
    res = runner.invoke(cli, [*args, "--cost-model", str(bad), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "off --target-flops 0.5" in warnings[0] and f"re-profile {bad}" in warnings[0]
    res = runner.invoke(cli, [*args, "--cost-model", str(cm), "--out", str(tmp_path / "good")])
    assert res.exit_code == 0 and "warning:" not in res.stderr


def test_results_go_to_stdout_and_notes_to_stderr(runner, tmp_path):
    """`alast plan > plan.txt` kept nothing: every line went to stderr."""
    res = runner.invoke(cli, ["plan", "--steps", "3", "--target-flops", "0.5"])
    assert res.exit_code == 0, res.output
    assert "train FLOPs" in res.stdout and "target 0.5x full FLOPs ->" in res.stdout
    assert "train FLOPs" not in res.stderr
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--steps", "2", "--batch-size", "8", "--set", "backend.threads=1", "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    assert "validation accuracy" in res.stdout and "validation accuracy" not in res.stderr
    assert "train / " in res.stderr  # the data line is a note
