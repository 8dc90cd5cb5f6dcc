"""The planner against real short runs (counted FLOPs, sampled memory), and the plan/profile CLI."""
import json
import re

import pytest
from click.testing import CliRunner

from alast.config import load_config
from alast.planning.plan import plan, replay_run, solve_target
from alast.training.loop import train
from alast_cli.main import cli
from tests.conftest import SMALL_VAL

BASE = ["model.name=alast_demo_vit", "data.spec=random:64", "train.steps=3", "train.batch_size=8"]
RUNS = {
    "full": ["policy.name=full"],
    "freeze": ["policy.name=freeze", "policy.k_trained=2"],
    "tokens": ["policy.name=tokens", "policy.keep_ratio=0.7"],
    "alast": ["policy.name=alast"],
    "target": ["policy.name=alast", "policy.target_flops=0.5"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, sets in RUNS.items():
        cfg = load_config(None, BASE + sets)
        overrides, info = solve_target(cfg) if cfg.policy.target_flops else (None, None)
        summary = train(cfg, root / name, planner_overrides=overrides, plan_info=info)
        out[name] = (cfg, root / name, summary)
    return out


@pytest.mark.parametrize("name", ["full", "freeze", "tokens"])
def test_plan_matches_counted_flops_of_deterministic_policies(runs, name):
    cfg, _, summary = runs[name]
    predicted = plan(cfg)["policies"][cfg.policy.name]
    assert predicted["method"] == "exact"
    assert predicted["train_flops"] == pytest.approx(summary["train_flops"], rel=0.01)
    full = plan(cfg)["policies"]["full"]
    assert full["train_flops"] == pytest.approx(summary["full_ft_train_flops"], rel=0.01)


def test_alast_replayed_from_its_trace(runs):
    _, run_dir, summary = runs["alast"]
    result = replay_run(run_dir)
    trace = result["trace"]
    assert trace["predicted_train_flops"] == pytest.approx(summary["train_flops"], rel=0.05)
    assert abs(trace["train_flops_rel_error"]) < 0.05
    assert result["policies"]["alast"]["method"] == "trace"
    # memory: the runtime samples steps 1 and 2 on the CPU; compare the same steps
    assert trace["predicted_peak_memory_sampled_steps_bytes"] == pytest.approx(summary["peak_memory_bytes"], rel=1e-3)


def test_alast_expected_range_brackets_the_run(runs):
    cfg, _, summary = runs["alast"]
    p = plan(cfg)["policies"]["alast"]
    lo, hi = p["train_flops_range"]
    assert lo <= summary["train_flops"] * 1.01 and summary["train_flops"] <= hi * 1.01


def test_target_run_lands_on_target(runs):
    _, _, summary = runs["target"]
    assert summary["plan"]["knobs"]["k_trained"] >= 1
    assert summary["flops_ratio_vs_full"] == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("name", ["full", "tokens"])
def test_predicted_memory_within_a_tenth_of_a_percent(runs, name):
    _, run_dir, summary = runs[name]
    trace = replay_run(run_dir)["trace"]
    assert trace["predicted_peak_memory_sampled_steps_bytes"] == pytest.approx(summary["peak_memory_bytes"], rel=1e-3)


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture
def runner():
    return CliRunner()


def _last_json(res):
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plan_json_contract(runner, tmp_path):
    plot = tmp_path / "plan.png"
    res = runner.invoke(cli, ["plan", "--model", "alast_demo_vit", "--policy", "alast", "--steps", "10",
                              "--batch-size", "8", "--json", "--plot", str(plot), "--throughput", "1e10"])
    assert res.exit_code == 0, res.output
    out = _last_json(res)
    assert set(out["policies"]) == {"alast", "full"}
    for p in out["policies"].values():
        for key in ("train_flops", "peak_memory_bytes", "time_s"):
            assert p[key] > 0
            assert p["ratio_to_full"][key] > 0
    assert out["policies"]["full"]["ratio_to_full"]["train_flops"] == 1.0
    assert out["policies"]["alast"]["ratio_to_full"]["train_flops"] < 1.0
    assert "throughput" in out["time_method"]
    assert plot.stat().st_size > 0


def test_plan_target_flops_sets_knobs(runner):
    res = runner.invoke(cli, ["plan", "--policy", "alast", "--target-flops", "0.4", "--steps", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = _last_json(res)
    assert set(out["target"]["knobs"]) == {"k_trained", "b_init", "b_min", "b_max", "min_tokens", "target_flops",
                                           "trim_last"}
    assert out["policies"]["alast"]["ratio_to_full"]["train_flops"] == pytest.approx(0.4, rel=0.05)


def test_unreachable_target_names_remedies_that_work(runner):
    # two steps at batch 2, every block's kept tokens a multiple of 32 of the 64: too coarse for 0.35x
    base = ["plan", "--policy", "alast", "--steps", "2", "--batch-size", "2", "--json",
            "--set", "backend.token_multiple=32"]
    res = runner.invoke(cli, [*base, "--target-flops", "0.35"])
    assert res.exit_code == 2 and "too few tokens or steps to divide finer" in res.output
    suggested = re.search(r"ask for --target-flops (\d\.\d+)", res.output).group(1)
    assert "a smaller backend.token_multiple (now 32)" in res.output
    for fix in (["--target-flops", suggested], ["--target-flops", "0.35", "--set", "backend.token_multiple=1"]):
        res = runner.invoke(cli, [*base, *fix])
        assert res.exit_code == 0, res.output
        ratio = _last_json(res)["policies"]["alast"]["ratio_to_full"]["train_flops"]
        assert ratio == pytest.approx(float(fix[1]), rel=0.05)


def test_profile_cli_writes_versioned_json(runner, tmp_path):
    out = tmp_path / "cost.json"
    res = runner.invoke(cli, ["profile", "alast_demo_vit", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = _last_json(res)
    assert data["model"] == "alast_demo_vit" and data["version"] >= 1 and len(data["blocks"]) == 6
    assert json.loads(out.read_text()) == data
    res = runner.invoke(cli, ["plan", "--cost-model", str(out), "--policy", "tokens", "--steps", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert "file" in _last_json(res)["cost_model"]["source"]


def test_plan_trace_cli(runner, runs):
    _, run_dir, _ = runs["freeze"]
    res = runner.invoke(cli, ["plan", "--trace", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(_last_json(res)["trace"]["train_flops_rel_error"]) < 0.01


def test_plan_trace_says_what_the_run_deployed(runner, runs):
    _, run_dir, summary = runs["alast"]
    res = runner.invoke(cli, ["plan", "--trace", str(run_dir)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "deploys the more accurate (policy.eval_tokens=auto)" in text
    kept = summary["eval_kept_tokens"]
    assert f"this run deployed {f'its token schedule {kept}' if kept else 'every token'}" in text


def _bad_cost_model(tmp_path, **change):
    from alast.planning.profile import profile

    data = profile("alast_demo_vit").to_dict()
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("args,message", [
    (["profile", "no_such_vit_model"], "unknown model"),
    (["plan", "--model", "no_such_vit_model"], "unknown model"),
    (["plan", "--target-flops", "1.5"], "target_flops"),
    (["plan", "--target-flops", "0"], "target_flops"),
    (["plan", "--policy", "alast", "--target-flops", "0.02"], "out of reach"),
    (["plan", "--policy", "freeze", "--target-flops", "0.3"], "cannot reach"),
    (["plan", "--policy", "no_such_policy"], "unknown policy"),
])
def test_bad_input_exits_2_with_one_line(runner, args, message):
    res = runner.invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr


@pytest.mark.parametrize("change,message", [({"model": "vit_tiny_patch16_224"}, "is for 'vit_tiny_patch16_224'"),
                                            ({"version": 99}, "version 99")])
def test_foreign_cost_model_exits_2(runner, tmp_path, change, message):
    path = _bad_cost_model(tmp_path, **change)
    res = runner.invoke(cli, ["plan", "--cost-model", str(path), "--steps", "2"])
    assert res.exit_code == 2 and message in res.stderr, res.output


def test_trace_dir_without_metrics_exits_2(runner, tmp_path):
    (tmp_path / "empty").mkdir()
    res = runner.invoke(cli, ["plan", "--trace", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no metrics.jsonl" in res.stderr, res.output
    res = runner.invoke(cli, ["plan", "--trace", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not found" in res.stderr, res.output


def test_target_with_dense_final_phase_is_met_by_a_real_run(tmp_path):
    """The FLOPs target accounts for the full-token final phase: the counted run lands on it (every
    step of the phase dense: ``policy.dense_final_interleave=false``)."""
    import json

    from click.testing import CliRunner

    from alast_cli.main import cli

    out = tmp_path / "dense"
    res = CliRunner().invoke(cli, ["train", *SMALL_VAL, "--steps", "10", "--batch-size", "8", "--target-flops", "0.5",
                                   "--set", "policy.dense_final_frac=0.2", "--set", "policy.dense_final_interleave=false",
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["flops_ratio_vs_full"] / 0.5 - 1) < 0.05
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # every token, but the last block's patch tokens, which the head never reads (policy.trim_last)
    assert all(r["kept_tokens"][:-1] == r["tokens_in"][:-1] and r["kept_tokens"][-1] == 1 for r in records[8:])
    assert any(r["kept_tokens"] != r["tokens_in"] for r in records[:8])
    # the phase trains the top 2 of 6 blocks; the other steps the top 4, the first 30% (policy.early_frac,
    # on by default under a target) the top 5; the embeddings stay frozen
    assert all(r["trained_blocks"] == [4, 5] and r["embeddings_trained"] is False for r in records[8:])
    assert all(r["trained_blocks"] == [2, 3, 4, 5] and r["embeddings_trained"] is False for r in records[3:8])
    assert all(r["trained_blocks"] == [1, 2, 3, 4, 5] and r["embeddings_trained"] is False for r in records[:3])
    # it ends on every token, so the run deploys every token
    assert summary["eval_kept_tokens"] is None and summary["token_schedule"] is None
    # the token-heavier dense phase is measured too, so the reported peak covers it
    assert records[8]["memory_measured"] and not records[0]["memory_measured"]
    # the plan replays the phase exactly as the run counted it
    res = CliRunner().invoke(cli, ["plan", "--trace", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout)["trace"]["train_flops_rel_error"]) < 1e-3


def test_token_multiple_is_modelled_by_plan_and_target(runner, tmp_path):
    """Counts rounded to multiples of 8: the plan replays what the run counts; a target the coarse
    counts cannot meet (multiples of 32 of 64 tokens) is refused in one line; the ort backend keeps exact counts."""
    run = tmp_path / "r"
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--steps", "6", "--batch-size", "16", "--set", "backend.token_multiple=8",
                              "--set", "backend.threads=1", "--out", str(run)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(n < 64 for r in records for n in r["kept_tokens"][:-1])
    assert all(n % 8 == 0 for r in records for n in r["kept_tokens"][:-1])
    assert all(r["kept_tokens"][-1] == 1 for r in records)  # policy.trim_last: min_tokens
    res = runner.invoke(cli, ["plan", "--trace", str(run), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(_last_json(res)["trace"]["train_flops_rel_error"]) < 1e-6
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--steps", "2", "--target-flops", "0.35", "--set", "backend.token_multiple=32",
                              "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "too few tokens or steps to divide finer" in res.output
    assert "smaller backend.token_multiple (now 32)" in res.output and "ask for --target-flops 0." in res.output
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--steps", "2", "--backend", "ort", "--set", "backend.token_multiple=8",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "token_multiple" in res.output


def test_target_with_an_early_phase_is_met_by_a_real_run(tmp_path):
    """``policy.early_frac``: the first steps train the block below the top four too, and it drops tokens
    like them; the counted run still lands on the target and the plan replays it."""
    import json

    from click.testing import CliRunner

    from alast_cli.main import cli

    out = tmp_path / "early"
    res = CliRunner().invoke(cli, ["train", *SMALL_VAL, "--steps", "10", "--batch-size", "8", "--target-flops", "0.5",
                                   "--set", "policy.early_frac=0.4", "--set", "policy.dense_final_frac=0.2",
                                   "--set", "policy.dense_final_interleave=false", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["flops_ratio_vs_full"] / 0.5 - 1) < 0.05
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["trained_blocks"] == [1, 2, 3, 4, 5] for r in records[:4])
    assert all(r["kept_tokens"][0] == 64 and r["kept_tokens"][1] < 64 for r in records[:4])
    assert all(r["trained_blocks"] == [2, 3, 4, 5] and r["kept_tokens"][:2] == [64, 64] for r in records[4:8])
    assert all(r["trained_blocks"] == [4, 5] for r in records[8:])
    res = CliRunner().invoke(cli, ["plan", "--trace", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout)["trace"]["train_flops_rel_error"]) < 1e-3
    res = CliRunner().invoke(cli, ["plan", "--steps", "10", "--target-flops", "0.5"])
    assert res.exit_code == 0, res.output
    assert "early phase: the first 30% of steps train the top 5 of 6 blocks" in res.output
    res = CliRunner().invoke(cli, ["plan", "--steps", "10"])  # without a target it is off unless set
    assert res.exit_code == 0 and "early phase" not in res.output, res.output


def test_target_with_an_interleaved_dense_phase_is_met_by_a_real_run(runner, tmp_path):
    """``policy.dense_final_interleave``: the dense final phase's odd steps train the top four blocks on
    dropped tokens, its even steps the top two on every token; the counted run lands on the target and
    the plan replays it and says so."""
    out = tmp_path / "interleaved"
    args = [*SMALL_VAL, "--steps", "10", "--batch-size", "8", "--target-flops", "0.5", "--set",
            "policy.dense_final_frac=0.3", "--set", "policy.dense_final_interleave=true"]
    res = runner.invoke(cli, ["train", *args, "--set", "backend.threads=1", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["flops_ratio_vs_full"] / 0.5 - 1) < 0.05
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records[7:]:  # the last 30%: steps 7, 8, 9
        if r["step"] % 2:
            assert r["trained_blocks"] == [2, 3, 4, 5] and r["kept_tokens"][2] < 64, r
        else:
            assert r["trained_blocks"] == [4, 5] and r["kept_tokens"][:-1] == [64] * 5, r
    res = runner.invoke(cli, ["plan", "--trace", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(_last_json(res)["trace"]["train_flops_rel_error"]) < 1e-3
    res = runner.invoke(cli, ["plan", *args])
    assert res.exit_code == 0 and "every other step of the last 30% of steps" in res.output, res.output
    res = runner.invoke(cli, ["plan", *args[:-1], "policy.dense_final_interleave=3"])
    assert res.exit_code == 0 and "2 steps in 3 of the last 30% of steps" in res.output, res.output
    assert "the others are sparse steps at a dense step's cost" in res.output, res.output


def test_a_target_run_does_not_depend_on_whether_its_model_was_profiled(tmp_path):
    """Profiling builds models from the seeded generators, a cached cost model does not: the run
    after either must be the same run (same seed, same losses)."""
    import torch

    cfg = load_config(None, BASE + RUNS["target"])
    solved = solve_target(cfg)

    def cached(steps):
        return solved

    def profiled(steps):
        torch.randn(1000), __import__("random").random(), __import__("numpy").random.rand(10)
        return solved

    losses = []
    for name, solve in (("cached", cached), ("profiled", profiled)):
        train(cfg, tmp_path / name, solve=solve)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines if '"loss"' in line])
    assert losses[0] and losses[0] == losses[1]


def test_a_target_above_alasts_ceiling_says_so_and_the_suggested_target_works(runner):
    base = ["plan", "--policy", "alast", "--steps", "300", "--json"]
    res = runner.invoke(cli, [*base, "--target-flops", "1.0"])
    assert res.exit_code == 2 and "is above what policy 'alast' spends with every block trained" in res.output
    assert "--policy full" in res.output and "too few tokens" not in res.output
    suggested = re.search(r"ask for --target-flops (\d\.\d+) or less", res.output).group(1)
    res = runner.invoke(cli, [*base, "--target-flops", suggested])
    assert res.exit_code == 0, res.output


def test_trace_reports_the_early_phase_the_run_trained(runner, tmp_path):
    """The target chose k_trained=5 for alast+lora, so its early steps trained all 6 blocks; the trace
    said the top 5 (the default k_trained 4, plus one), finished or not."""
    out = tmp_path / "run"
    res = runner.invoke(cli, ["train", *SMALL_VAL, "--policy", "alast+lora", "--target-flops", "0.5", "--steps", "3",
                              "--batch-size", "4", "--set", "backend.threads=1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["plan"]["knobs"]["k_trained"] == 5
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(first["trained_blocks"]) == 6
    for unfinished in (False, True):
        if unfinished:
            (out / "summary.json").unlink()
        res = runner.invoke(cli, ["plan", "--trace", str(out)])
        assert res.exit_code == 0, res.output
        assert "early phase: the first 30% of steps train the top 6 of 6 blocks" in res.output, res.output


@pytest.mark.parametrize("policy", ["lora", "freeze+lora"])
def test_plan_refuses_lora_on_the_ort_backend_as_train_does(runner, policy):
    """`alast train` refuses it; `alast plan` printed a plan for it (exit 0)."""
    res = runner.invoke(cli, ["plan", "--backend", "ort", "--policy", policy, "--steps", "3"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [(f"error: invalid value for 'backend': the ort backend does not support "
                                                f"LoRA (policy {policy!r}); use --backend torch")]


def test_an_epochs_run_with_a_target_uses_the_plans_knobs(tmp_path):
    """With --epochs the run solved its target without the step count (`steps=None`) while `alast
    plan` had it, so the plan described knobs the run did not use (target_flops 0.532 against 0.541)."""
    import json

    from click.testing import CliRunner

    from alast_cli.main import cli

    args = [*SMALL_VAL, "--epochs", "0.1", "--batch-size", "11", "--target-flops", "0.5", "--set",
            "policy.dense_final_frac=0.3", "--set", "backend.threads=1"]
    res = CliRunner().invoke(cli, ["plan", *args, "--json"])
    assert res.exit_code == 0, res.output
    planned = json.loads(res.stdout.strip().splitlines()[-1])["target"]
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", *args, "--out", str(out), "--set", 'backend.count_flops="off"'])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["plan"]["knobs"] == planned["knobs"]
