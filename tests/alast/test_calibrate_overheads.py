"""`alast profile --calibrate` times what a run's steps do beside training (a FLOP-counted step, a
memory-measured one, the first), so plans of short runs are not 40-80% too fast."""
import json

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


@pytest.mark.parametrize("option,what", [("--threads", "the CPU threads"), ("--batch-size", "the batch")])
def test_a_calibration_option_without_calibrate_is_refused(option, what):
    """Without --calibrate nothing reads them: ignoring them would let a user believe they took effect."""
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", option, "4"])
    one_error_line(res, 2, f"{option} sets {what} --calibrate times steps with; add --calibrate or leave it out")
