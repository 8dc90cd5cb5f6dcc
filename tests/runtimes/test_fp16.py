"""fp16 autocast with loss scaling (``backend.precision=fp16``), for GPUs without bf16 (T4, V100).

It is a CUDA setting and refused elsewhere in one line; CPU autocast runs fp16 too (slowly), so the
tests here allow it on the CPU to run the same code: the scaled backward, the skipped update of an
overflowed step, the scale in metrics.jsonl and the checkpoint, and the stop when every step
overflows.
"""
import itertools
import json

import pytest
import torch
from click.testing import CliRunner

from alast.training.checkpoint import load_checkpoint, save_checkpoint
from alast_cli.main import cli
from planners import Budget
from runtimes.torch_backend import precision, runtime
from runtimes.torch_backend.runtime import TorchRuntime
from tests.cli_errors import one_error_line
from tests.conftest import make_tiny_vit
from tests.runtimes.dtypes import MatmulDtypes

BUDGET = Budget((0.5,) * 4, (False, True, True, True))


@pytest.fixture
def fp16_cpu(monkeypatch):
    """fp16 allowed on the CPU (a CUDA setting; CPU autocast computes the same, slowly)."""
    monkeypatch.setattr(precision, "check_fp16", lambda device, setting="backend.precision": None)


def _runtime(prec: str, init_scale: float | None = None, **kw) -> TorchRuntime:
    torch.manual_seed(0)
    rt = TorchRuntime(make_tiny_vit(), lr=1e-2, weight_decay=0.05, grad_clip=1.0, device="cpu", precision=prec, **kw)
    if init_scale is not None:
        rt.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return rt


def _weights(rt: TorchRuntime) -> list[torch.Tensor]:
    return [p.detach().clone() for p in rt.model.parameters()]


def test_fp16_is_refused_off_cuda():
    with pytest.raises(ValueError, match="fp16 is for CUDA GPUs"):
        _runtime("fp16")
    res = CliRunner().invoke(cli, ["train", "--steps", "1", "--set", "backend.precision=fp16",
                                   "--set", "backend.device=cpu"])
    one_error_line(res, 2, "backend.precision=fp16 is for CUDA GPUs (with loss scaling), not the cpu")
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--calibrate", "--device", "cpu", "--precision",
                                   "fp16"])
    one_error_line(res, 2, "--precision=fp16 is for CUDA GPUs")


def test_bf16_is_refused_on_a_gpu_without_bf16_arithmetic(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"backend.precision=bf16 on Tesla T4: .* use backend.precision=fp16"):
        precision.check_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    precision.check_bf16(torch.device("cuda"))  # Ampere and later


@pytest.mark.parametrize("sync_free", ["off", "on"])
def test_an_fp16_step_scales_the_loss_multiplies_in_fp16_and_keeps_fp32_weights(batch, fp16_cpu, sync_free):
    x, y = batch
    fp32, fp16 = _runtime("fp32"), _runtime("fp16", init_scale=2.0 ** 4, sync_free=sync_free)
    start = _weights(fp16)
    with MatmulDtypes() as mode:
        b = fp16.launch_step(x, y, BUDGET, 1e-2, 0).resolve()
    a = fp32.train_step(x, y, BUDGET, 1e-2, 0)
    assert torch.float16 in mode.dtypes
    assert all(p.dtype == torch.float32 for p in fp16.model.parameters())
    assert b.loss_scale == 16.0 and not b.update_skipped and a.loss_scale is None
    assert b.kept_tokens == a.kept_tokens and b.train_flops == a.train_flops
    assert b.loss == pytest.approx(a.loss, rel=0.02)
    # the step was applied, on gradients unscaled back to fp32's, to fp16's rounding
    assert any(not torch.equal(p, s) for p, s in zip(fp16.model.parameters(), start))
    g16, g32 = (torch.cat([p.grad.flatten() for p in rt.model.parameters() if p.grad is not None])
                for rt in (fp16, fp32))
    assert g16.shape == g32.shape and ((g16 - g32).norm() / g32.norm()).item() < 0.01


def test_an_overflowed_step_is_not_applied_and_halves_the_scale(batch, fp16_cpu):
    x, y = batch
    rt = _runtime("fp16", init_scale=2.0 ** 40)  # the scaled gradients pass fp16's 65504
    start = _weights(rt)
    first = rt.train_step(x, y, BUDGET, 1e-2, 0)
    assert first.update_skipped and first.loss_scale == 2.0 ** 40
    assert all(torch.equal(p, s) for p, s in zip(rt.model.parameters(), start))
    assert rt.train_step(x, y, BUDGET, 1e-2, 1).loss_scale == 2.0 ** 39


def test_the_loss_scale_is_checkpointed_and_a_resumed_run_steps_as_the_uninterrupted_one(batch, fp16_cpu,
                                                                                       tmp_path):
    x, y = batch
    rt = _runtime("fp16", init_scale=2.0 ** 20)
    for step in range(3):  # overflows first, then backs off
        rt.train_step(x, y, BUDGET, 1e-2, step)
    path = save_checkpoint(tmp_path, 3, {"runtime": rt.state_dict()}, keep_last=1)
    scale = rt.scaler.get_scale()
    assert scale < 2.0 ** 20
    resumed = _runtime("fp16")
    resumed.load_state_dict(load_checkpoint(path)["runtime"])
    assert resumed.scaler.get_scale() == scale
    a, b = rt.train_step(x, y, BUDGET, 1e-2, 3), resumed.train_step(x, y, BUDGET, 1e-2, 3)
    assert (a.loss, a.loss_scale, a.update_skipped) == (b.loss, b.loss_scale, b.update_skipped)
    assert all(torch.equal(p, q) for p, q in zip(rt.model.parameters(), resumed.model.parameters()))


def test_an_fp16_run_logs_its_scale_and_counts_its_skipped_updates(tmp_path, fp16_cpu, monkeypatch):
    monkeypatch.setattr(runtime, "loss_scaler", lambda device, prec: torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--steps", "6", "--batch-size", "8", "--data", "random:16",
                                   "--set", "backend.precision=fp16", "--set", "backend.threads=1",
                                   "--out", str(run)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss_scale" in r]
    assert len(rows) == 6 and rows[0]["loss_scale"] == 2.0 ** 20
    skipped = [r["update_skipped"] for r in rows]
    assert skipped[0] and not skipped[-1]  # overflowed at 2**20, trained once the scale fell
    for r, nxt in itertools.pairwise(rows):
        assert nxt["loss_scale"] == r["loss_scale"] / (2 if r["update_skipped"] else 1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_updates"] == sum(skipped)


def test_a_run_whose_every_step_overflows_stops_in_one_line(tmp_path, fp16_cpu, monkeypatch):
    monkeypatch.setattr(runtime, "loss_scaler", lambda device, prec: torch.amp.GradScaler("cpu", init_scale=2.0 ** 90))
    res = CliRunner().invoke(cli, ["train", "--steps", "40", "--batch-size", "2", "--data", "random:16",
                                   "--set", "backend.precision=fp16", "--set", "backend.count_flops=off",
                                   "--set", "backend.threads=1", "--out", str(tmp_path / "run")])
    one_error_line(res, 1, "fp16 gradients overflowed on 24 steps in a row, to step 24")
    assert "backend.precision=bf16" in res.output and "no checkpoint was written" in res.output
