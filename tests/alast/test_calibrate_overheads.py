"""`alast profile --calibrate` times what a run's steps do beside training (a FLOP-counted step, a
memory-measured one, the first), so plans of short runs are not 40-80% too fast."""
import json
import random

import pytest
from click.testing import CliRunner

from alast_cli.main import cli
from tests.cli_errors import one_error_line


def test_a_calibrated_time_model_times_counted_measured_and_first_steps(tmp_path):
    out = tmp_path / "cm.json"
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--calibrate", "--batch-size", "2", "--threads", "1",
                                   "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    time = json.loads(out.read_text())["time"]
    assert time["threads"] == 1  # as the runs it plans: --set backend.threads=1
    assert time["counted_factor"] >= 1.0 and time["probed_factor"] >= 1.0 and time["first_step_s"] >= 0.0
    assert "a counted step" in time["note"] and "a memory-measured step" in time["note"]


@pytest.mark.parametrize("option,what", [("--threads", "the CPU threads"), ("--batch-size", "the batch"),
                                         ("--precision", "the precision")])
def test_a_calibration_option_without_calibrate_is_refused(option, what):
    """Without --calibrate nothing reads them: ignoring them would let a user believe they took effect."""
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", option, "bf16" if option == "--precision" else "4"])
    one_error_line(res, 2, f"{option} sets {what} --calibrate times steps with; add --calibrate or leave it out")


def test_calibration_counts_every_first_round_step(monkeypatch):
    """The counted-step factor is timed on the first round, every step of which runs under the FLOP
    counter, although the runtime could solve most of their shapes from counted ones (and does in
    the later rounds, none of which is counted)."""
    from alast.planning.calibrate import _calibration_budgets, calibrate_time
    from alast.planning.profile import profile
    from planners import Budget
    from runtimes.torch_backend import runtime

    entered = []
    real = runtime.counter

    def counting():
        entered.append(1)
        return real()

    monkeypatch.setattr(runtime, "counter", counting)
    cm = profile("alast_demo_vit")
    rng = random.Random(0)
    extra = {f"moving{i}": Budget(tuple(rng.uniform(0.5, 1.0) for _ in range(cm.num_blocks)), (True,) * cm.num_blocks)
             for i in range(4)}
    tm = calibrate_time(cm, "alast_demo_vit", batch_size=2, reps=1, extra=extra)
    assert len(entered) == len(_calibration_budgets(cm.num_blocks)) + len(extra)
    assert tm.counted_factor >= 1.0


def test_calibrating_in_bf16_writes_a_bf16_time_model(tmp_path, monkeypatch):
    """`alast profile --calibrate --precision bf16` times bf16 steps, so a bf16 run's plan can use
    the file (it leaves an fp32 time model out)."""
    from runtimes.torch_backend import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # functional on any CPU
    out = tmp_path / "cm.json"
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--calibrate", "--batch-size", "2", "--threads", "1",
                                   "--device", "cpu", "--precision", "bf16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    time = json.loads(out.read_text())["time"]
    assert time["precision"] == "bf16" and "(bf16," in time["note"]
    res = CliRunner().invoke(cli, ["plan", "--model", "alast_demo_vit", "--policy", "tokens", "--steps", "3",
                                   "--batch-size", "2", "--cost-model", str(out), "--set", "backend.threads=1",
                                   "--set", "backend.precision=bf16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["policies"]["tokens"]["time_s"] > 0


def test_bf16_calibration_is_refused_on_a_cpu_without_bf16_matrix_instructions(tmp_path, monkeypatch):
    from runtimes.torch_backend import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--calibrate", "--device", "cpu", "--precision",
                                   "bf16", "--out", str(tmp_path / "cm.json")])
    one_error_line(res, 2, "--precision=bf16 on this CPU: it has no bf16 matrix instructions")
    assert not (tmp_path / "cm.json").exists()
