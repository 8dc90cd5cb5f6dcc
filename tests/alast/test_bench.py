import json
import os
import signal

import pytest
from click.testing import CliRunner

import alast.bench as bench_module
from alast.bench import BenchPlan, aggregate
from alast.bench_runs import LORA_MATCHED, MATCHED, RunSpec, matched_steps
from alast.config import load_config
from alast_cli.main import cli
from tests.conftest import SMALL_VAL


def test_bench_writes_results_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,alast,tokens", "--steps", "4", "--batch-size",
                                   "8", "--set", "backend.threads=1", "--target-flops", "0.5", "--out", str(out),
                                   "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    full, alast, tokens = (table["policies"][p] for p in ("full", "alast", "tokens"))
    assert full["train_flops_ratio"] == 1.0
    assert abs(alast["train_flops_ratio"] / 0.5 - 1) < 0.05 and abs(tokens["train_flops_ratio"] / 0.5 - 1) < 0.05
    assert alast["plan"]["knobs"]["k_trained"] >= 1 and "keep_ratio" in tokens["plan"]["knobs"]
    for name in ("results.json", "results.md", "accuracy_vs_flops.png", "step_time.png", "budgets_alast.png"):
        assert (out / name).exists(), name
    assert "| alast |" in (out / "results.md").read_text()
    same = table["same_steps"]
    assert abs(same["diff"] - (alast["val_accuracy"] - full["val_accuracy"])) < 1e-12
    assert same["line"].startswith("Same steps: alast") and same["line"] in (out / "results.md").read_text()
    assert f"at {alast['train_flops_ratio']:.3f}x full's counted FLOPs" in same["line"]
    _check_matched(out, table)


def _check_matched(out, table):
    """--target-flops turns on full@matched: full fine-tuning for the alast run's counted FLOPs, run right after it."""
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in raw]
    assert labels[labels.index("alast") + 1] == MATCHED and labels.count(MATCHED) == 1
    alast_run, matched_run = raw[labels.index("alast")], raw[labels.index(MATCHED)]
    assert matched_run["policy"] == "full" and matched_run["seed"] == alast_run["seed"]
    assert matched_run["steps"] == matched_steps(alast_run) == 2  # round(4 x ~0.5)
    row, alast = table["policies"][MATCHED], table["policies"]["alast"]
    assert row["steps"] == 2 and abs(row["train_flops_ratio"] - 0.5) < 1e-9  # the achieved ratio: 2 of 4 steps
    assert abs(row["train_flops_ratio"] - alast["train_flops_ratio"]) <= 0.5 / 4
    m = table["matched"]
    assert abs(m["diff"] - (alast["val_accuracy"] - row["val_accuracy"])) < 1e-12
    assert m["line"] in (out / "results.md").read_text()
    assert (out / "runs" / "full-matched-t0.5-seed0" / "summary.json").exists()


def test_bench_rotates_policy_order_across_seeds():
    plan = BenchPlan(load_config(), ["full", "alast", "freeze"], [0, 1, 2], out=None)
    firsts = [plan.runs[i * 3].policy for i in range(3)]
    assert firsts == ["full", "alast", "freeze"]
    assert sorted((r.policy, r.seed) for r in plan.runs) == sorted((p, s) for p in ("full", "alast", "freeze")
                                                                   for s in (0, 1, 2))


def test_bench_refuses_without_full(tmp_path):
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "alast", "--steps", "2", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "needs 'full'" in res.stderr


def test_aggregate_means_and_ratios():
    rs = [{"policy": "full", "seed": s, "val_accuracy": a, "train_flops": 10.0, "peak_memory_bytes": 100,
           "wall_time_s": 2.0, "median_step_time_s": 1.0, "train_time_s": 1.5, "full_ft_train_flops": 10.0}
          for s, a in ((0, 0.9), (1, 0.8))]
    rs += [{"policy": "alast", "seed": 0, "val_accuracy": 0.85, "train_flops": 4.0, "peak_memory_bytes": 50,
            "wall_time_s": 1.0, "median_step_time_s": 0.5, "train_time_s": 0.7, "full_ft_train_flops": 10.0}]
    t = aggregate(rs, ["full", "alast"])
    assert abs(t["policies"]["full"]["val_accuracy"] - 0.85) < 1e-12
    a = t["policies"]["alast"]
    assert a["train_flops_ratio"] == 0.4 and a["peak_memory_bytes_ratio"] == 0.5 and a["speedup_vs_full"] == 2.0
    assert abs(a["speedup_share_of_flop_bound"] - 0.8) < 1e-12


def test_time_ratios_do_not_depend_on_run_order():
    """The first run of a process pays its one-time start-up in wall time; the ratios to full (time
    in training steps, not wall time) come out the same whichever policy ran first."""
    def runs(first: str):
        rs = [{"policy": p, "seed": 0, "val_accuracy": 0.5, "train_flops": f, "peak_memory_bytes": 100,
               "wall_time_s": 2.0 * t + (5.0 if p == first else 0.0), "median_step_time_s": t / 4,
               "train_time_s": t, "full_ft_train_flops": 10.0} for p, f, t in (("full", 10.0, 2.0), ("freeze", 8.0, 1.6))]
        return rs if first == "full" else rs[::-1]

    a, b = (aggregate(runs(first), ["full", "freeze"])["policies"]["freeze"] for first in ("full", "freeze"))
    ratios = {k: v for k, v in a.items() if k.endswith("_ratio")}
    assert ratios == {k: v for k, v in b.items() if k.endswith("_ratio")}
    assert abs(ratios["train_time_s_ratio"] - 0.8) < 1e-12 and "wall_time_s_ratio" not in ratios


def test_matched_verdict_shows_both_ratios_and_flags_a_cost_off_alasts():
    rs = [{"policy": "full", "label": lbl, "seed": 0, "val_accuracy": a, "train_flops": f, "full_ft_train_flops": 10.0}
          for lbl, a, f in (("full", 0.8, 10.0), (MATCHED, 0.6, 4.0))]
    rs.append({"policy": "alast", "seed": 0, "val_accuracy": 0.7, "train_flops": 5.0, "full_ft_train_flops": 10.0})
    line = aggregate(rs, ["full", "alast", MATCHED])["matched"]["line"]
    assert line.startswith("Compute-matched: alast 70.00% at 0.500x vs full@matched 60.00% at 0.400x (+10.00 pts; "
                           "full@matched 20.0% under alast's FLOPs: not the same cost)"), line
    rs[1]["train_flops"] = 5.1
    line = aggregate(rs, ["full", "alast", MATCHED])["matched"]["line"]
    assert "at 0.500x vs full@matched 60.00% at 0.510x (+10.00 pts)" in line and "not the same cost" not in line


def test_bench_target_flops_sets_freeze_like_targets_does(tmp_path):
    """--target-flops solves freeze's knobs as --targets and `alast plan --policy freeze` do."""
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,freeze", "--steps", "2", "--batch-size", "8",
                                   "--set", "backend.threads=1", "--target-flops", "0.8", "--out", str(tmp_path / "b"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    freeze = json.loads(res.stdout.strip().splitlines()[-1])["policies"]["freeze"]
    assert abs(freeze["train_flops_ratio"] / 0.8 - 1) < 0.03 and freeze["plan"]["knobs"]["k_trained"] >= 1


def test_a_config_files_target_is_the_benchs_target(tmp_path):
    """A config written for `alast train` with policy.target_flops sets bench's target, as
    --target-flops does; it was replaced by no target for every run without a word."""
    config = tmp_path / "cfg.yaml"
    config.write_text("policy:\n  name: alast\n  target_flops: 0.8\n")
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, str(config), "--policies", "full,freeze", "--steps", "2",
                                   "--batch-size", "8", "--set", "backend.threads=1", "--out", str(tmp_path / "b"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    freeze = json.loads(res.stdout.strip().splitlines()[-1])["policies"]["freeze"]
    assert abs(freeze["train_flops_ratio"] / 0.8 - 1) < 0.03
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, str(config), "--policies", "full,freeze", "--steps", "2", "--targets",
                                   "0.5,0.7", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "the config sets policy.target_flops: 0.8, and --targets" in res.stderr, res.output
    assert not (tmp_path / "c").exists()


def test_a_target_random_cannot_reach_stops_the_bench_before_any_run(tmp_path):
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,random", "--steps", "2", "--batch-size", "8",
                                   "--set", "backend.threads=1", "--target-flops", "0.5", "--out", str(out)])
    assert res.exit_code == 2 and "policy 'random' cannot reach" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (out / "runs").exists()


DEFAULT = ["full", "alast", "freeze", "random", "tokens", "lora", "alast+lora"]


@pytest.mark.parametrize("args, optional, policies", [
    # the default list: full and alast always run
    ([], {"freeze", "random", "tokens", "lora", "alast+lora"}, DEFAULT),
    # named: a target out of random's reach stops the bench
    (["--policies", "full,alast,random"], set(), ["full", "alast", "random"]),
    # the default list on the ort backend: its LoRA policies are left out from the start
    (["--backend", "ort"], {"freeze", "random", "tokens"}, DEFAULT[:5]),
])
def test_only_the_default_policies_may_be_left_out(tmp_path, monkeypatch, args, optional, policies):
    seen = []

    def fake_run_bench(plan, **kwargs):
        seen.append((plan.optional, plan.policies, plan.left_out))
        raise ValueError("stop here")

    monkeypatch.setattr(bench_module, "run_bench", fake_run_bench)
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, *args, "--steps", "2", "--target-flops", "0.5",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "stop here" in res.stderr, res.output
    lora = {p: "the ort backend does not support LoRA" for p in DEFAULT[5:]} if "ort" in args else {}
    assert seen == [(optional, policies, lora)]


def test_the_lora_policies_named_on_the_ort_backend_stop_the_bench(tmp_path):
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--backend", "ort", "--policies", "full,lora", "--steps", "2",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "the ort backend does not support LoRA (policy 'lora')" in res.stderr, res.output


def test_a_default_policy_that_cannot_reach_the_target_is_left_out_and_named(tmp_path):
    """`alast bench --target-flops 0.5` with the default policies: freeze and random cannot reach
    0.5x on the demo (their only knob is K, and the trained patch embedding costs every block its
    input gradient); the bench used to stop before its first run."""
    from alast.planning.plan import solve_target

    base = load_config(None, ["train.steps=2", "train.batch_size=8", "backend.threads=1"])
    plan = BenchPlan(base, ["full", "random"], [0], tmp_path / "b", target_flops=0.5, optional=frozenset({"random"}))
    told = []
    table = bench_module.run_bench(plan, solve_target=solve_target, on_left_out=lambda p, why: told.append((p, why)))
    assert [p for p, _ in told] == ["random"] and "policy 'random' cannot reach 0.5x" in told[0][1]
    assert list(table["policies"]) == ["full"] and table["left_out"] == dict(told)
    assert json.loads((tmp_path / "b" / "results.json").read_text())["left_out"] == dict(told)
    assert "Left out of the default policies, `random`: policy 'random' cannot reach" in (
        tmp_path / "b" / "results.md").read_text()
    assert [json.loads(line)["policy"] for line in (tmp_path / "b" / "raw.jsonl").read_text().splitlines()] == ["full"]


@pytest.mark.parametrize("args, message", [
    (["--policy", "tokens"], "--policy tokens would be ignored; list it in --policies"),
    (["--set", "policy.name=tokens"], "--set policy.name=tokens would be ignored; use --policies"),
    (["--set", "policy.target_flops=0.5"], "use --target-flops or --targets"),
    (["--set", "output.dir=x"], "use --out"),
    (["--set", "output.force=true"], "a bench never replaces runs"),
])
def test_bench_refuses_train_options_it_would_ignore(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,alast", "--steps", "2", *args,
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "b").exists()


def test_bench_out_that_is_a_file_exits_2(tmp_path):
    (tmp_path / "afile").write_text("mine\n")
    res = CliRunner().invoke(cli, ["bench", "--policies", "full", "--steps", "2", "--out", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is a file; choose a folder for --out" in res.stderr, res.output
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_a_target_out_of_a_policys_reach_fails_the_bench_before_any_run(tmp_path):
    """Full fine-tuning runs first (seed 0's order); the alast target it cannot reach must stop the
    bench before that run trains, not after it."""
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,alast", "--steps", "2", "--batch-size", "2",
                                   "--set", "backend.threads=1", "--set", "backend.token_multiple=32",
                                   "--target-flops", "0.35", "--out", str(out)])
    assert res.exit_code == 2 and "too few tokens or steps to divide finer" in res.stderr
    assert not (out / "runs").exists() and not (out / "raw.jsonl").exists()


# without full@matched: a resume that reads a matched run back is tested with lora@matched below
RESUME_ARGS = ["bench", *SMALL_VAL, "--policies", "full,alast,tokens", "--target-flops", "0.5", "--no-matched", "--steps", "3",
               "--batch-size", "8", "--set", "backend.threads=1"]
SAME_RESULTS = ("val_accuracy", "val_accuracy_std", "val_accuracy_token_schedule", "val_accuracy_all_tokens",
                "train_flops", "train_flops_ratio", "full_ft_train_flops", "steps", "inference_flops_ratio")


def interrupt_run_after_step_1(monkeypatch, run_name):
    """SIGINT this process once step 1 of the run in ``runs/<run_name>`` is logged, as Ctrl-C would."""
    from alast.training import report

    write = report.MetricsWriter.write

    def write_then_interrupt(self, record):
        write(self, record)
        if record["step"] == 1 and self.path.parent.name == run_name:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(report.MetricsWriter, "write", write_then_interrupt)


def test_an_interrupted_bench_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch):
    """Ctrl-C in the last run (tokens; full and alast finished before it) says to resume the
    bench; --resume trains only the rest of that run, from its checkpoint, and writes the results
    an uninterrupted bench writes. Other arguments, or a run whose config was changed, are refused."""
    ref, out = tmp_path / "ref", tmp_path / "bench"
    res = CliRunner().invoke(cli, [*RESUME_ARGS, "--out", str(ref), "--json"])
    assert res.exit_code == 0, res.output
    reference = json.loads(res.stdout.strip().splitlines()[-1])

    interrupt_run_after_step_1(monkeypatch, "tokens-t0.5-seed0")
    res = CliRunner().invoke(cli, [*RESUME_ARGS, "--out", str(out)])
    monkeypatch.undo()
    assert res.exit_code == 130, res.output
    assert "interrupted at step 2" in res.stderr and "finish the bench with the same arguments and --resume" in res.stderr
    assert not (out / "runs" / "tokens-t0.5-seed0" / "summary.json").exists()
    res = CliRunner().invoke(cli, [*RESUME_ARGS, "--out", str(out)])
    assert res.exit_code == 2 and "add --resume" in res.stderr

    for args, fragment in [(["--steps", "4"], "train.steps (3 -> 4)"), (["--policies", "full,alast"],
                           "--policies (full,alast,tokens -> full,alast)"), (["--seeds", "2"], "--seeds/--seed (0 -> 0,1)"),
                           (["--target-flops", "0.4"], "--target-flops (0.5 -> 0.4)"), (["--matched"], "--matched")]:
        res = CliRunner().invoke(cli, [*RESUME_ARGS, *args, "--out", str(out), "--resume"])
        assert res.exit_code == 2 and "cannot resume bench" in res.stderr and fragment in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1
    saved = (out / "runs" / "full-seed0" / "config.yaml").read_text()
    (out / "runs" / "full-seed0" / "config.yaml").write_text(saved.replace("lr: 0.001", "lr: 0.002"))
    res = CliRunner().invoke(cli, [*RESUME_ARGS, "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "full-seed0 was trained with another config: train.lr" in res.stderr, res.output
    (out / "runs" / "full-seed0" / "config.yaml").write_text(saved)

    trained = []
    train = bench_module.train
    monkeypatch.setattr(bench_module, "train", lambda cfg, run_dir, **kw: trained.append((run_dir.name, kw["resume"]))
                        or train(cfg, run_dir, **kw))
    res = CliRunner().invoke(cli, [*RESUME_ARGS, "--out", str(out), "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert trained == [("tokens-t0.5-seed0", True)]  # the finished runs were read back, not rerun
    table = json.loads(res.stdout.strip().splitlines()[-1])
    assert table["policies"].keys() == reference["policies"].keys() == {"full", "alast", "tokens"}
    for row, entry in reference["policies"].items():
        assert {k: table["policies"][row][k] for k in SAME_RESULTS} == {k: entry[k] for k in SAME_RESULTS}, row
    assert table["same_steps"]["line"] == reference["same_steps"]["line"]
    assert table["matched"] is None and reference["matched"] is None
    summary = json.loads((out / "runs" / "tokens-t0.5-seed0" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2
    raw = [json.loads(line)["label"] for line in (out / "raw.jsonl").read_text().splitlines()]
    assert raw == [json.loads(line)["label"] for line in (ref / "raw.jsonl").read_text().splitlines()]


def test_resume_refuses_an_out_that_is_not_a_bench(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("policy: {name: full}\n")
    for out, fragment in [(tmp_path / "run", "not the output of an alast bench"), (tmp_path / "none", "no such folder")]:
        res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,alast", "--steps", "2", "--out", str(out),
                                       "--resume"])
        assert res.exit_code == 2 and fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,alast", "--steps", "2", "--resume"])
    assert res.exit_code == 2 and "--resume needs --out" in res.stderr


@pytest.mark.parametrize("policy", ["lora", "alast+lora", "freeze+lora", "random+lora", "tokens+lora", "full+lora"])
def test_every_lora_policy_keeps_the_users_lora_settings(tmp_path, policy):
    """Only `lora` and `alast+lora` kept them; the other `X+lora` runs fell back to the defaults
    (rank 8, alpha 16, [qkv]) without a word, and the table compared different adapters."""
    from alast.bench import policy_config

    base = load_config(None, ["policy.lora.rank=2", "policy.lora.alpha=3", "policy.lora.targets=[qkv,fc1]"])
    cfg = policy_config(base, policy, 0, tmp_path / "r", None)
    assert cfg.policy.lora == base.policy.lora and cfg.policy.lora.targets == ["qkv", "fc1"]
    assert policy_config(base, "freeze", 0, tmp_path / "r", None).policy.lora is None


@pytest.mark.parametrize("args, message", [
    (["--policies", "full,alast,lora", "--set", "policy.lora.targets=[nope]"], "policy.lora.targets: no layer 'nope'"),
    (["--policies", "full,freeze+lora", "--set", "policy.lora.targets=[attn]"], "'attn' is a module of type Attention"),
    (["--policies", "full,alast,lora", "--backend", "ort"], "the ort backend does not support LoRA (policy 'lora')"),
    (["--policies", "full,tokens", "--set", "policy.keep_ratio=[0.5,0.5]"], "policy.keep_ratio has 2 entries"),
    (["--policies", "full,alast", "--set", "policy.spare_first=9"], "spare_first must lie in [0, 5]"),
])
def test_a_setting_that_refuses_a_later_run_stops_the_bench_before_any_run(tmp_path, args, message):
    """full runs first (seed 0's order); the run a setting refuses came after it had trained, and a
    --resume could neither finish the bench nor take other arguments."""
    if "ort" in args:
        pytest.importorskip("onnxruntime.training")
    trained = []
    out = tmp_path / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_module, "train", lambda cfg, run_dir, **kw: trained.append(run_dir.name))
        res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, *args, "--steps", "2", "--batch-size", "4", "--set",
                                       "backend.threads=1", "--out", str(out)])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert trained == [] and not (out / "runs").exists()


def test_progress_counts_only_the_runs_that_train_and_skips_advise_benchs_options(tmp_path, monkeypatch):
    """alast cannot reach 0.95x (its embeddings stay frozen), so it and full@steps at 0.95 are
    skipped: the headers count the 3 runs that train ([1/3] .. [3/3], not [1/5], [3/5], [5/5]),
    and the reason does not advise --policy, which bench refuses."""
    import alast.bench_curves
    from alast.planning.plan import solve_target

    monkeypatch.setattr(bench_module, "train", lambda cfg, run_dir, **kw: {"policy": cfg.policy.name})
    monkeypatch.setattr(alast.bench_curves, "write_curve_outputs", lambda *a: {})
    base = load_config(None, ["train.steps=2", "train.batch_size=4", "backend.threads=1"])
    plan = BenchPlan(base, ["full", "alast"], [0], tmp_path / "b", targets=(0.5, 0.95))
    headers = []
    bench_module.run_bench(plan, on_run=lambda i, n, name, seed: headers.append((i + 1, n, name)) or None,
                           solve_target=solve_target)
    assert headers == [(1, 3, "full@steps at 0.5x"), (2, 3, "alast at 0.5x"), (3, 3, "full@steps at 1x")]
    raw = [json.loads(line) for line in (tmp_path / "b" / "raw.jsonl").read_text().splitlines()]
    why = next(r["skipped"] for r in raw if r.get("skipped") and r["policy"] == "alast")
    assert "ask for --targets 0." in why and "--policy" not in why and "--target-flops" not in why, why


def test_lora_matched_steps_are_the_alast_lora_runs_counted_flops_over_one_lora_step():
    """A LoRA step on every token costs less than full fine-tuning's: lora@matched takes
    round(train_flops / every_token_step_flops) steps, rounded half up, exactly on the counted figures."""
    run = {"policy": "alast+lora", "steps": 150, "train_flops": 4.13e12, "full_ft_train_flops": 10.0e12,
           "every_token_step_flops": 0.05e12}
    assert matched_steps(run, LORA_MATCHED) == 83  # 4.13 / 0.05 = 82.6; full@matched would take 62
    assert matched_steps(run) == 62
    assert matched_steps({**run, "train_flops": 2.5, "every_token_step_flops": 1.0}, LORA_MATCHED) == 3  # half up
    assert matched_steps({**run, "train_flops": 1.0}, LORA_MATCHED) == 1  # never zero steps
    # 2.4999999999999998..: the float quotient rounds to 2.5 (3 steps); the counted figures give 2
    assert matched_steps({**run, "train_flops": 7500000000000002.0, "every_token_step_flops": 3000000000000001.0},
                         LORA_MATCHED) == 2
    for missing in ({"every_token_step_flops": None}, {"train_flops": None}):
        with pytest.raises(ValueError, match="counted FLOPs.*every_token_step_flops"):
            matched_steps({**run, **missing}, LORA_MATCHED)
    assert RunSpec("lora", 1, 0.5, LORA_MATCHED, 7).dir_name() == "lora-matched-t0.5-seed1"
    assert RunSpec("lora", 1, None, LORA_MATCHED, 7).dir_name() == "lora-matched-seed1"


def test_lora_matched_follows_each_alast_lora_run_and_is_counted_in_the_progress(tmp_path, monkeypatch):
    """--matched with alast+lora adds lora@matched right after it (lora needs not be in --policies):
    LoRA with the same adapters for the steps of the alast+lora run's counted FLOPs; the progress
    counts it, the table has the row (ratios to full) and the verdict sits beside alast's."""
    from pathlib import Path

    from alast_cli import bench_cmd
    from alast_cli.render import results as console

    base = load_config(None, ["train.steps=10", "train.batch_size=4", "backend.threads=1", "policy.lora.rank=2"])
    per_step = {"full": 10.0, "alast": 5.0, "alast+lora": 3.5, "lora": 7.0}  # a LoRA step on every token: 7
    accuracy = {"full": 0.9, "alast": 0.85, "alast+lora": 0.8, "lora": 0.75}
    trained = []

    def fake_train(cfg, run_dir, **kw):
        name, steps = cfg.policy.name, cfg.train.steps
        trained.append((run_dir.name, name, steps, cfg.policy.lora))
        lora = cfg.policy.lora is not None
        return {"policy": name, "steps": steps, "val_accuracy": accuracy[name] - 0.01 * (steps < 10),
                "train_flops": per_step[name] * steps, "full_ft_train_flops": 10.0 * steps,
                "every_token_step_flops": 7.0 if lora else 10.0}

    monkeypatch.setattr(bench_module, "train", fake_train)
    plan = BenchPlan(base, ["full", "alast+lora", "alast"], [0], tmp_path / "b", matched=True)
    headers = []
    table = bench_module.run_bench(plan, on_run=lambda i, n, name, seed: headers.append((i + 1, n, name)) or None)
    assert headers == [(1, 5, "full"), (2, 5, "alast+lora"), (3, 5, LORA_MATCHED), (4, 5, "alast"), (5, 5, MATCHED)]
    assert [t[:3] for t in trained] == [("full-seed0", "full", 10), ("alast-lora-seed0", "alast+lora", 10),
                                        ("lora-matched-seed0", "lora", 5),  # 35 / 7
                                        ("alast-seed0", "alast", 10), ("full-matched-seed0", "full", 5)]
    assert trained[2][3] == base.policy.lora and trained[2][3].rank == 2  # the alast+lora run's adapters
    assert list(table["policies"]) == ["full", "alast+lora", "alast", MATCHED, LORA_MATCHED]
    row = table["policies"][LORA_MATCHED]
    assert row["steps"] == 5 and row["train_flops_ratio"] == 0.35  # to the full row: 35 / 100
    line = table["lora_matched"]["line"]
    assert line == ("Compute-matched: alast+lora 80.00% at 0.350x vs lora@matched 74.00% at 0.350x (+6.00 pts): "
                    "alast+lora is above (one seed on a side: no spread to judge by)."), line
    assert table["matched"]["line"].startswith("Compute-matched: alast 85.00% at 0.500x vs full@matched 89.00% at ")
    md = (tmp_path / "b" / "results.md").read_text()
    assert line in md and table["matched"]["line"] in md and "| lora@matched | 5 |" in md
    assert json.loads((tmp_path / "b" / "results.json").read_text())["lora_matched"]["line"] == line
    with console.capture() as cap:
        bench_cmd._render_table(table, Path("bench/x"))
    text = " ".join(cap.get().split())
    assert line in text and table["matched"]["line"] in text


def test_matched_without_alast_or_alast_lora_is_refused(tmp_path):
    res = CliRunner().invoke(cli, ["bench", *SMALL_VAL, "--policies", "full,lora,tokens", "--matched", "--steps", "2",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "add alast to --policies, or alast+lora" in res.stderr
    assert not (tmp_path / "b").exists()


LORA_ARGS = ["bench", *SMALL_VAL, "--policies", "full,lora,alast+lora", "--target-flops", "0.5", "--steps", "4",
             "--batch-size", "8", "--set", "backend.threads=1", "--set", "policy.lora.rank=2"]


def test_a_target_bench_with_alast_lora_matches_lora_to_its_counted_flops(tmp_path, monkeypatch):
    """--target-flops with alast+lora turns --matched on: lora@matched, right after alast+lora, costs
    the alast+lora run's counted FLOPs within 3% (else the verdict says it is not the same cost),
    every step of it what the summary counts a LoRA step on every token; a resume reads it back."""
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, [*LORA_ARGS, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    assert json.loads((out / "bench.json").read_text())["matched"] is True
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in raw]
    assert labels[labels.index("alast+lora") + 1] == LORA_MATCHED and MATCHED not in labels
    full, lora, al, lm = (raw[labels.index(k)] for k in ("full", "lora", "alast+lora", LORA_MATCHED))
    assert lm["policy"] == "lora" and lm["seed"] == al["seed"] and lm["run_dir"].endswith("lora-matched-t0.5-seed0")
    step = al["every_token_step_flops"]
    assert 0 < step < full["full_ft_train_flops"] / full["steps"]  # no weight gradients for the frozen base
    assert full["every_token_step_flops"] == full["full_ft_train_flops"] / full["steps"]  # no LoRA: full's step
    assert lora["every_token_step_flops"] == lm["every_token_step_flops"] == step
    assert lora["train_flops"] == lora["steps"] * step and lm["train_flops"] == lm["steps"] * step
    assert lm["steps"] == matched_steps(al, LORA_MATCHED) and abs(lm["steps"] - al["train_flops"] / step) <= 0.5
    off = lm["train_flops"] / al["train_flops"] - 1
    line = table["lora_matched"]["line"]
    assert line.startswith("Compute-matched: alast+lora ") and " vs lora@matched " in line
    assert ("not the same cost" in line) == (abs(off) > 0.03), (off, line)
    row = table["policies"][LORA_MATCHED]
    assert row["steps"] == lm["steps"] and row["train_flops_ratio"] == lm["train_flops"] / full["train_flops"]
    assert table["matched"] is None and line in (out / "results.md").read_text()
    shares = {k: table["policies"][k]["parameters_updated_share"] for k in ("full", "lora", "alast+lora")}
    assert shares["full"] == 1.0 and 0 < shares["alast+lora"] <= shares["lora"] < 0.2  # adapters and the head
    assert "| params updated % |" in (out / "results.md").read_text()

    trained = []
    monkeypatch.setattr(bench_module, "train", lambda cfg, run_dir, **kw: trained.append(run_dir.name))
    res = CliRunner().invoke(cli, [*LORA_ARGS, "--out", str(out), "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert trained == [] and "lora@matched at 0.5x, seed 0: finished before, read back" in res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["lora_matched"]["line"] == line


def test_an_interrupted_bench_in_its_default_folder_names_it_to_resume(tmp_path, monkeypatch):
    """Without --out the bench's folder is bench/<time>; "the same arguments and --resume" was refused
    for want of --out."""
    monkeypatch.chdir(tmp_path)
    interrupt_run_after_step_1(monkeypatch, "full-seed0")
    res = CliRunner().invoke(cli, RESUME_ARGS)
    assert res.exit_code == 130, res.output
    (out,) = (tmp_path / "bench").iterdir()
    assert res.stderr.strip().splitlines()[-1].endswith(
        f"finish the bench with the same arguments and --resume --out {out.relative_to(tmp_path)}")


def test_lrs_choose_each_rows_rate_on_held_out_training_images_before_the_runs(tmp_path, monkeypatch):
    """--lrs: the tuning runs come first (first seed, data.tune_fraction set, under tune/), then every
    run at its row's chosen rate, full@matched at full's; results.json, results.md and the terminal
    name each row's rates and their held-out accuracies."""
    from pathlib import Path

    from alast_cli import bench_cmd
    from alast_cli.render import results as console

    base = load_config(None, ["train.steps=10", "train.batch_size=4", "backend.threads=1"])
    best = {"full": 5e-4, "alast": 1e-3}  # on the held-out images
    calls = []

    def fake_train(cfg, run_dir, **kw):
        name, lr, tune = cfg.policy.name, cfg.train.lr, cfg.data.tune_fraction
        calls.append((run_dir.parent.name, run_dir.name, lr, tune))
        steps = cfg.train.steps
        return {"policy": name, "steps": steps, "val_accuracy": 0.8 + 0.1 * (lr == best[name]) - 0.05 * (tune is None),
                "train_flops": (5.0 if name == "alast" else 10.0) * steps, "full_ft_train_flops": 10.0 * steps}

    monkeypatch.setattr(bench_module, "train", fake_train)
    plan = BenchPlan(base, ["full", "alast"], [0, 1], tmp_path / "b", matched=True, lrs=(1e-3, 5e-4),
                     tune_fraction=0.3)
    headers = []
    table = bench_module.run_bench(plan, on_run=lambda i, n, name, seed: headers.append((i + 1, n, name)) or None)
    assert [h[:2] for h in headers] == [(i, 10) for i in range(1, 11)]
    assert headers[0][2] == "full, lr 0.001 (tuning run)" and headers[4][2] == "full, lr 0.0005"
    assert calls[:4] == [("tune", "full-seed0-lr0.001", 1e-3, 0.3), ("tune", "full-seed0-lr0.0005", 5e-4, 0.3),
                         ("tune", "alast-seed0-lr0.001", 1e-3, 0.3), ("tune", "alast-seed0-lr0.0005", 5e-4, 0.3)]
    assert calls[4:] == [("runs", "full-seed0", 5e-4, None), ("runs", "alast-seed0", 1e-3, None),
                         ("runs", "full-matched-seed0", 5e-4, None), ("runs", "alast-seed1", 1e-3, None),
                         ("runs", "full-matched-seed1", 5e-4, None), ("runs", "full-seed1", 5e-4, None)]
    assert [table["policies"][row]["lr"] for row in ("full", "alast", MATCHED)] == [5e-4, 1e-3, 5e-4]
    rates = table["learning_rates"]
    assert rates["tune_fraction"] == 0.3 and rates["seed"] == 0
    assert [(r["row"], r["chosen"], r["accuracy"]) for r in rates["rows"]] == [
        ("full", 5e-4, {"0.001": 0.8, "0.0005": 0.9}), ("alast", 1e-3, {"0.001": 0.9, "0.0005": 0.8})]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["learning_rates"] == rates
    assert len((tmp_path / "b" / "tuning.jsonl").read_text().splitlines()) == 4
    assert len((tmp_path / "b" / "raw.jsonl").read_text().splitlines()) == 6
    md = (tmp_path / "b" / "results.md").read_text()
    assert "less 30% of them" in md and "- full: 0.0005 (0.001: 80.00%, 0.0005: 90.00%)" in md
    with console.capture() as cap:
        bench_cmd._render_table(table, Path("bench/x"))
    assert "alast: 0.001 (0.001: 90.00%, 0.0005: 80.00%)" in cap.get()
    epochs = BenchPlan(load_config(None, ["train.epochs=1", "train.batch_size=32"]), ["full"], [0], tmp_path / "e",
                       lrs=(1e-3, 5e-4))
    assert epochs.base_steps == 1438 // 32  # the tuning runs train the rows' steps, not an epoch of fewer images


LRS_ARGS = ["bench", *SMALL_VAL, "--policies", "full,alast", "--target-flops", "0.5", "--no-matched", "--steps", "2",
            "--batch-size", "8", "--set", "backend.threads=1", "--lrs", "1e-3,5e-4"]


def test_lrs_tuning_runs_score_held_out_training_images_and_resume(tmp_path):
    """A real bench with --lrs: the tuning runs train on the training split less --tune-fraction of it
    and score those images; --resume reads every run back; other rates are refused on resume."""
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, [*LRS_ARGS, "--tune-fraction", "0.05", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout.strip().splitlines()[-1])
    tuned = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()]
    runs = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    assert [t["scored_on"] for t in tuned] == ["tuning"] * 4 and [r["scored_on"] for r in runs] == ["validation"] * 2
    held = {t["val_samples"] for t in tuned}  # 5% of each class of the training split (digits less SMALL_VAL's 5%)
    assert len(held) == 1 and abs(held.pop() - 0.05 * (1797 - 90)) <= 5 and {r["val_samples"] for r in runs} == {90}
    chosen = {r["row"]: r["chosen"] for r in table["learning_rates"]["rows"]}
    assert {r["label"]: r["lr"] for r in runs} == chosen and set(chosen) == {"full", "alast"}
    for t in tuned:
        assert t["val_accuracy"] == table["learning_rates"]["rows"][t["label"] == "alast"]["accuracy"][f"{t['lr']:g}"]

    res = CliRunner().invoke(cli, [*LRS_ARGS, "--tune-fraction", "0.05", "--out", str(out), "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert "read back" in res.stderr + res.output and "step 2/2" not in res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["learning_rates"] == table["learning_rates"]
    for args, fragment in [(["--tune-fraction", "0.05", "--lrs", "1e-3,2e-4"], "--lrs (0.001,0.0005 -> 0.001,0.0002)"),
                           ([], "--tune-fraction (0.05 -> 0.2)")]:
        res = CliRunner().invoke(cli, [*LRS_ARGS, *args, "--out", str(out), "--resume"])
        assert res.exit_code == 2 and fragment in res.stderr, res.output


@pytest.mark.parametrize("args, message", [
    (["--lrs", "1e-3"], "two or more learning rates"), (["--lrs", "1e-3,fast"], "'fast' is not a number"),
    (["--lrs", "1e-3,0.001"], "lists 0.001 twice"), (["--lrs", "0,1e-3"], "0 is not a learning rate above 0"),
    (["--tune-fraction", "0.3"], "add --lrs"), (["--set", "data.tune_fraction=0.1"], "data.tune_fraction=0.1 would"),
    (["--set", "backend.frozen_cache=on"], "backend.frozen_cache=on would stop the bench"),
    (["--lrs", "1e-3,5e-4", "--lr", "3e-4"], "--lr (train.lr) would be"),
    (["--lrs", "1e-3,5e-4", "--set", "train.lr=3e-4"], "--lr (train.lr) would be ignored"), (["--lrs", "1e-3,5e-4", "--tune-fraction", "1"], "in (0, 1)"),
    (["--data", "random:40", "--batch-size", "34", "--lrs", "1e-3,5e-4", "--tune-fraction", "0.3"],
     "leaves the tuning runs 22 training images, fewer than a batch of 34")])
def test_bad_lrs_options_are_refused_in_one_line(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["bench", "--policies", "full,alast", "--out", str(tmp_path / "b"), *args])
    errors = [line for line in res.stderr.splitlines() if not line.startswith("note: ")]
    assert res.exit_code == 2 and len(errors) == 1 and message in errors[0], res.output
