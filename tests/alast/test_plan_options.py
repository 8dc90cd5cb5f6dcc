"""`alast plan`'s options: a calibrated FLOPs target, the --plot file, the peak memory it labels."""
import json

import pytest
from click.testing import CliRunner

from alast_cli.main import cli
from tests.cli_errors import one_error_line

TINY = ["--model", "alast_demo_vit", "--steps", "5", "--batch-size", "2", "--set", "backend.threads=1"]


def _json(res):
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_calibrated_plan_with_a_target_predicts_what_the_uncalibrated_one_does():
    """--calibrate times the policy's own first step, which under --target-flops needs the cost
    model to project on; the calibration adds a time and changes no FLOPs or memory figure."""
    args = ["plan", *TINY, "--policy", "alast", "--target-flops", "0.5", "--json"]
    timed, plain = _json(CliRunner().invoke(cli, [*args, "--calibrate"])), _json(CliRunner().invoke(cli, args))
    assert timed["time_method"].startswith("calibrated") and timed["policies"]["alast"]["time_s"] > 0
    assert timed["target"]["predicted_ratio"] == pytest.approx(plain["target"]["predicted_ratio"], rel=1e-9)
    for name in ("alast", "full"):
        for key in ("train_flops", "peak_memory_bytes"):
            assert timed["policies"][name][key] == pytest.approx(plain["policies"][name][key], rel=1e-9), (name, key)
    assert timed["policies"]["alast"]["ratio_to_full"]["train_flops"] == pytest.approx(0.5, rel=0.05)


def test_plot_never_overwrites_silently_and_names_the_file_it_writes(tmp_path, monkeypatch):
    """An existing --plot needs --force, a directory is refused (both before planning); a name
    without a suffix gets .png, and the output names the file written."""
    import alast.planning.plan as plan_module

    real = plan_module.plan
    monkeypatch.setattr(plan_module, "plan", lambda *a, **k: pytest.fail("planned before refusing --plot"))
    mine = tmp_path / "plan.png"
    mine.write_bytes(b"keep me")
    base = ["plan", *TINY, "--throughput", "1e10", "--plot"]
    one_error_line(CliRunner().invoke(cli, [*base, str(mine)]), 2, f"--plot {mine} exists; pass --force")
    one_error_line(CliRunner().invoke(cli, [*base, str(tmp_path / "plan")]), 2, "exists; pass --force")
    one_error_line(CliRunner().invoke(cli, [*base, str(tmp_path)]), 2, f"--plot {tmp_path} is a directory")
    assert mine.read_bytes() == b"keep me" and not (tmp_path.parent / f"{tmp_path.name}.png").exists()

    monkeypatch.setattr(plan_module, "plan", real)
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "fig")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fig.png").stat().st_size > 0 and f"plot written to {tmp_path / 'fig.png'}" in res.output
    res = CliRunner().invoke(cli, [*base, str(mine), "--force"])
    assert res.exit_code == 0, res.output
    assert mine.read_bytes()[:4] == b"\x89PNG"


def test_a_replayed_run_says_over_which_steps_its_peak_memory_is(tmp_path):
    """The table's peak is over all steps; the run measured CPU memory on sampled steps: the output
    labels both and prints the prediction for the steps the run measured beside its figure."""
    from alast.config import load_config
    from alast.training.loop import train

    cfg = load_config(None, ["model.name=alast_demo_vit", "data.spec=random:16", "train.steps=2",
                             "train.batch_size=4", "backend.threads=1"])
    summary = train(cfg, tmp_path / "run")
    res = CliRunner().invoke(cli, ["plan", "--trace", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "(all steps)" in res.output
    line = next(line for line in res.output.splitlines() if line.startswith("peak memory over"))
    assert "the steps the run measured" in line and "the table's: over all steps" in line
    measured = summary["peak_memory_bytes"] / 2**20
    assert f"measured {measured:.1f} MiB" in line


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--set", "policy.fuse_tokens=true"], "the ort backend does not fuse dropped tokens"),
    (["--set", "backend.token_multiple=8"], "the ort backend keeps exact token counts"),
    (["--calibrate"], "--calibrate times the torch runtime's steps, not the ort backend's"),
])
def test_plan_refuses_for_the_ort_backend_what_its_run_would(extra, fragment):
    """`alast plan --backend ort` predicted runs that `alast train` refuses, and timed the torch runtime."""
    pytest.importorskip("onnxruntime.training")
    res = CliRunner().invoke(cli, ["plan", *TINY, "--backend", "ort", *extra])
    one_error_line(res, 2, fragment)


def test_the_ort_backend_is_planned_as_the_torch_runtime_runs():
    """Both runtimes compute a dropping block for its kept tokens only, so a target asks them for
    the same knobs (the ort backend was planned with whole blocks, then the selection)."""
    pytest.importorskip("onnxruntime.training")
    args = ["plan", *TINY, "--policy", "alast", "--target-flops", "0.5", "--json"]
    torch_plan = _json(CliRunner().invoke(cli, args))["target"]
    ort_plan = _json(CliRunner().invoke(cli, [*args, "--backend", "ort"]))["target"]
    assert ort_plan["knobs"] == torch_plan["knobs"]
    assert ort_plan["predicted_ratio"] == torch_plan["predicted_ratio"]


def test_a_bf16_plan_says_its_memory_is_priced_in_fp32(monkeypatch):
    """The cost model measures fp32 activations on the CPU: a plan for bf16 autocast says its peak
    memory is that of fp32, once; an fp32 plan says nothing of it."""
    import alast.planning.plan as plan_module

    monkeypatch.setattr(plan_module, "_warned", set())
    args = ["plan", *TINY, "--set", "backend.device=cuda", "--json"]
    bf16 = CliRunner().invoke(cli, [*args, "--set", "backend.precision=bf16"])
    fp32 = CliRunner().invoke(cli, args)
    assert bf16.exit_code == 0 and fp32.exit_code == 0, bf16.output + fp32.output
    lines = [ln for ln in bf16.stderr.splitlines() if "fp32 activations" in ln]
    assert len(lines) == 1 and "bf16 autocast" in lines[0] and "not modelled" in lines[0]
    assert "fp32 activations" not in fp32.stderr
    assert _json(bf16)["policies"]["full"]["peak_memory_bytes"] == _json(fp32)["policies"]["full"]["peak_memory_bytes"]
