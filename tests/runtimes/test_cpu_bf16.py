"""bf16 autocast on the CPU (``backend.precision=bf16``): where the CPU has bf16 matrix instructions
the step's matrix products run in bf16; where it has none the setting is refused in one line."""
import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from alast_cli.main import cli
from planners import Budget
from runtimes.torch_backend import precision as torch_runtime
from runtimes.torch_backend.runtime import TorchRuntime
from tests.conftest import make_tiny_vit
from tests.runtimes.dtypes import MatmulDtypes


@pytest.fixture
def bf16_cpu(monkeypatch):
    """bf16 allowed on this CPU whatever it has (autocast works everywhere, fast only with the instructions)."""
    monkeypatch.setattr(torch_runtime, "cpu_has_native_bf16", lambda: True)


def _runtime(precision: str) -> TorchRuntime:
    return TorchRuntime(make_tiny_vit(), lr=1e-2, weight_decay=0.05, grad_clip=None, device="cpu", precision=precision)


def test_a_bf16_step_multiplies_in_bf16_and_keeps_fp32_weights(batch, bf16_cpu):
    x, y = batch
    budget = Budget((0.5,) * 4, (False, True, True, True))
    fp32, bf16 = _runtime("fp32"), _runtime("bf16")
    seen = {}
    for name, rt in (("fp32", fp32), ("bf16", bf16)):
        with MatmulDtypes() as mode:
            seen[name] = rt.train_step(x, y, budget, 1e-2, 0)
        seen[name + " dtypes"] = mode.dtypes
    assert seen["fp32 dtypes"] == {torch.float32}
    assert torch.bfloat16 in seen["bf16 dtypes"]
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in bf16.model.parameters())
    a, b = seen["fp32"], seen["bf16"]
    # the same shapes, so the same counted FLOPs and kept tokens; the loss differs by bf16's rounding only
    assert b.kept_tokens == a.kept_tokens and b.train_flops == a.train_flops
    assert b.loss != a.loss and b.loss == pytest.approx(a.loss, rel=0.05)


def test_bf16_is_refused_on_a_cpu_without_bf16_matrix_instructions(monkeypatch):
    monkeypatch.setattr(torch_runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="no bf16 matrix instructions"):
        _runtime("bf16")
    res = CliRunner().invoke(cli, ["train", "--steps", "1", "--set", "backend.precision=bf16",
                                   "--set", "backend.device=cpu"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]
    assert "no bf16 matrix instructions" in last and "backend.precision=fp32" in last


def test_the_probe_reads_torchs_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not torch_runtime.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert torch_runtime.cpu_has_native_bf16()


def test_a_bf16_cpu_run_trains_exports_and_evaluates(tmp_path, bf16_cpu):
    """End to end on the CLI: the run trains under bf16, its export (fp32 weights) verifies against
    PyTorch, and the ONNX file scores what the run scores in fp32."""
    run, onnx_file = tmp_path / "run", tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["train", "--steps", "3", "--batch-size", "16", "--target-flops", "0.5",
                                   "--set", "backend.precision=bf16", "--set", "backend.threads=1",
                                   "--set", "data.val_fraction=0.05", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert "precision: bf16" in (run / "config.yaml").read_text()
    exp = CliRunner().invoke(cli, ["export", str(run), "--out", str(onnx_file)])
    assert exp.exit_code == 0, exp.output
    ev = CliRunner().invoke(cli, ["eval", str(onnx_file), "--data", "digits", "--json"])
    assert ev.exit_code == 0, ev.output


class _AttentionDtypes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.startswith("_scaled_dot_product"):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_differentiated_attention_runs_in_fp32_under_cpu_autocast_and_the_rest_in_bf16():
    """torch's CPU flash attention is slower in bf16 than in fp32 with a backward, faster without one."""
    from runtimes.torch_backend.precision import autocast

    original = torch.nn.functional.scaled_dot_product_attention
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 9, 8)  # fewer queries than keys, as a dropping block has
    seen = {}
    for grad in (True, False):
        qg, kg = q.clone().requires_grad_(grad), k.clone().requires_grad_(grad)
        with autocast(torch.device("cpu"), "bf16"), _AttentionDtypes() as mode:
            out = torch.nn.functional.scaled_dot_product_attention(qg.bfloat16(), kg.bfloat16(), kg.bfloat16())
            if grad:
                out.float().sum().backward()
        seen[grad] = (mode.dtypes, out.dtype)
        assert torch.nn.functional.scaled_dot_product_attention is original  # put back on exit
    assert seen[True] == ([torch.float32, torch.float32], torch.bfloat16)  # forward and backward in fp32
    assert seen[False] == ([torch.bfloat16], torch.bfloat16)
    assert q.grad is None and torch.isfinite(out.float()).all()
    with autocast(torch.device("cpu"), "fp32"):
        assert torch.nn.functional.scaled_dot_product_attention is original and not torch.is_autocast_enabled("cpu")


def test_a_calibration_times_the_runs_precision(bf16_cpu):
    """`alast plan --calibrate` times bf16 steps for a bf16 run, and its time model says so."""
    from alast.planning.calibrate import calibrate_time
    from alast.planning.profile import profile

    cm = profile("alast_demo_vit")
    tm = calibrate_time(cm, "alast_demo_vit", batch_size=2, count_flops="off", reps=1, precision="bf16")
    assert tm.precision == "bf16" and "bf16" in tm.note
    assert calibrate_time(cm, "alast_demo_vit", batch_size=2, count_flops="off", reps=1).precision == "fp32"


def test_alast_plan_calibrate_times_steps_in_the_runs_precision(monkeypatch):
    """`alast plan --calibrate` hands the run's precision to the calibration (with and without LoRA)."""
    import dataclasses

    import alast.planning.plan as plan_module
    from alast.config import load_config
    from alast.planning.profile import profile
    from planners.costmodel import TimeModel

    seen = []

    def fake_calibrate(cm, name, **kw):
        seen.append(kw["precision"])
        return TimeModel("calibrated", {"step": 0.1}, precision=kw["precision"])

    monkeypatch.setattr(plan_module, "calibrate_time", fake_calibrate)
    cm = profile("alast_demo_vit")
    for precision, lora in (("bf16", None), ("fp32", None), ("bf16", {"rank": 2})):
        cfg = load_config(None, [f"backend.precision={precision}"])
        pcm = cm if lora is None else dataclasses.replace(cm, lora=lora)
        _, timed = plan_module._time_models(cfg, cm, pcm, calibrate=True, throughput=None, batch=2)
        assert timed.time.precision == precision
    assert seen == ["bf16", "fp32", "bf16", "bf16"]  # with LoRA the plain and the adapted model are both timed


def test_every_cpu_autocast_installs_the_same_attention_function():
    """Compiled blocks guard on the attention function they traced: a new one per step would recompile
    them every step. Nested autocasts do not wrap it twice."""
    from runtimes.torch_backend.precision import autocast

    cpu = torch.device("cpu")
    original = torch.nn.functional.scaled_dot_product_attention
    seen = []
    for _ in range(2):
        with autocast(cpu, "bf16"):
            seen.append(torch.nn.functional.scaled_dot_product_attention)
            with autocast(cpu, "bf16"):
                seen.append(torch.nn.functional.scaled_dot_product_attention)
            seen.append(torch.nn.functional.scaled_dot_product_attention)
    assert seen[0] is not original and all(f is seen[0] for f in seen)
    assert torch.nn.functional.scaled_dot_product_attention is original
