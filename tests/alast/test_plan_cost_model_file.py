"""A `--cost-model` file made elsewhere: its time model, its provenance, the commands named to replace it."""
import json

import pytest
from click.testing import CliRunner

import alast.planning.plan as plan_module
from alast.planning.profile import profile
from alast_cli.main import cli
from planners.costmodel import TimeModel
from tests.cli_errors import one_error_line

PLAN = ["plan", "--model", "alast_demo_vit", "--policy", "tokens", "--steps", "3", "--json"]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(plan_module, "_warned", set())  # each test sees its warnings, once


def _cost_model(tmp_path, time=None, **provenance):
    cm = profile("alast_demo_vit").with_time(time)
    data = cm.to_dict()
    data["provenance"].update(provenance)
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(data))
    return path


def _warnings(res):
    return [line for line in res.stderr.splitlines() if line.startswith("warning:")]


def _plan(path, *args):
    res = CliRunner().invoke(cli, [*PLAN, "--cost-model", str(path), *args])
    assert res.exit_code == 0, res.output
    return res, json.loads(res.stdout.strip().splitlines()[-1])


def test_a_time_model_calibrated_at_another_batch_is_left_out_with_a_warning(tmp_path):
    """Step time is not linear in the batch size (fixed costs weigh more in small batches), so a time
    model calibrated at batch 8 predicts nothing at batch 32, and says so in one line."""
    tm = TimeModel("calibrated", {"step": 0.01, "fwd_flops": 1e-10}, device="cpu", batch_size=8, count_flops="every",
                   threads=1)
    path = _cost_model(tmp_path, tm)
    res, out = _plan(path, "--batch-size", "8", "--set", "backend.threads=1")
    assert _warnings(res) == [] and out["policies"]["full"]["time_s"] > 0
    res, out = _plan(path, "--batch-size", "32", "--set", "backend.threads=1")
    (line,) = _warnings(res)
    assert "batch 8" in line and "batch 32" in line and "small batches" in line
    assert "--calibrate" in line and "--batch-size 32 --out FILE" in line
    assert out["policies"]["full"]["time_s"] is None and out["policies"]["tokens"]["time_s"] is None
    res, out = _plan(path, "--batch-size", "8", "--set", "backend.threads=2")
    (line,) = _warnings(res)
    assert "threads 1" in line and "threads 2" in line and out["policies"]["full"]["time_s"] is None
    assert "--calibrate --batch-size 8 --threads 2 --out FILE" in line
    res, out = _plan(path, "--batch-size", "8", "--set", "backend.threads=1", "--set", "backend.precision=bf16")
    (line,) = [w for w in _warnings(res) if "no time predicted" in w]  # beside the note on bf16's memory
    assert "precision fp32" in line and "precision bf16" in line and out["policies"]["full"]["time_s"] is None
    assert "--calibrate --batch-size 8 --precision bf16 --out FILE" in line  # `alast profile` takes it
    res, out = _plan(path, "--batch-size", "32", "--throughput", "1e10")  # a given throughput is not questioned
    assert _warnings(res) == [] and out["policies"]["full"]["time_s"] > 0


def test_a_cost_model_from_other_library_versions_warns_and_names_the_command(tmp_path):
    path = _cost_model(tmp_path)
    res, _ = _plan(path)
    assert _warnings(res) == []
    path = _cost_model(tmp_path, torch="1.0.0", timm="0.1.0")
    res, _ = _plan(path)
    (line,) = _warnings(res)
    assert "torch 1.0.0, timm 0.1.0" in line and "alast profile alast_demo_vit --img-size 32 --out" in line
    data = json.loads(path.read_text())
    data["provenance"] = {}
    data["version"] = 2
    for b in data["blocks"]:  # as a version-2 file holds them: backward transients (g, c), no memory events
        events = b.pop("bwd_events")
        b.pop("fwd_events"), b["drop"].pop("fwd_events"), b["drop"].pop("bwd_events")
        b["transient_bytes"] = {s: [1e5, 1e3] for s in events}
    path.write_text(json.dumps(data))
    res, _ = _plan(path)
    (line,) = _warnings(res)
    assert "cost-model version 2" in line and "re-profile" in line


@pytest.mark.parametrize("args,change", [(["--model", "vit_tiny_patch16_224", "--img-size", "32"], {}),
                                         ([], {"img_size": 48})])
def test_a_foreign_cost_model_names_a_command_that_writes_a_file(tmp_path, args, change):
    path = _cost_model(tmp_path)
    data = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(data))
    res = CliRunner().invoke(cli, [*PLAN, *args, "--cost-model", str(path)])
    line = one_error_line(res, 2, "--img-size 32 --out FILE", "leave out --cost-model")
    assert "`alast profile" in line
