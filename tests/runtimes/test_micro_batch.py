"""Gradient accumulation (``train.micro_batch_size``): a step in several passes is the same step,
with a pass's activation memory; the planner prices it so; bad sizes are refused in one line."""
import json

import pytest
import torch
from click.testing import CliRunner

from alast.config import build_config
from alast.training.build import create_runtime
from alast_cli.main import cli
from planners import Budget
from runtimes.protocol import pass_sizes
from tests.cli_errors import one_error_line
from tests.conftest import make_tiny_beit, make_tiny_eva, make_tiny_vit
from tests.runtimes.test_ort import needs_ort

BACKENDS = ["torch", pytest.param("ort", marks=needs_ort)]
# dropping tokens in every block, two blocks frozen, then every block trained on every token
BUDGETS = [Budget((0.75, 0.5, 0.75, 0.5), (False, True, False, True)), Budget((1.0,) * 4, (True,) * 4),
           Budget((0.5,) * 4, (True, True, False, False))]


def make(backend, micro, select="sample", model=make_tiny_vit, **policy):
    cfg = build_config({"backend": {"name": backend, "device": "cpu"},
                        "policy": {"freeze_embeddings": False, "token_select": select, **policy},
                        "train": {"lr": 1e-3, "weight_decay": 0.05, "grad_clip": 1.0, "batch_size": 10,
                                  "micro_batch_size": micro}})
    return create_runtime(cfg, model())


def test_pass_sizes():
    assert pass_sizes(10, None) == [10] and pass_sizes(10, 10) == [10] and pass_sizes(10, 16) == [10]
    assert pass_sizes(10, 4) == [4, 4, 2] and pass_sizes(8, 4) == [4, 4] and pass_sizes(3, 1) == [1, 1, 1]
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        pass_sizes(10, 0)


@pytest.mark.parametrize("select", ["sample", "random", "top"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_in_passes_is_the_step_in_one(backend, select):
    """Passes of 4, 4 and 2 images give the one-pass step's loss, deltas, FLOPs and weights; the
    passes draw their tokens as one pass would (the draws are made for the whole batch first)."""
    _same_steps(make(backend, None, select), make(backend, 4, select))


MODELS = {
    "rotary": {"model": lambda: make_tiny_eva("dinov3", depth=4)},
    "relative": {"model": lambda: make_tiny_beit("beitv2", depth=4)},
    "pooled": {"model": lambda: make_tiny_vit(global_pool="avg")},
    "fused": {"fuse_tokens": True},
}


@pytest.mark.parametrize("kind", MODELS)
def test_passes_on_every_kind_of_block_are_the_step_in_one(kind):
    """The same with rotary position embeddings (Eva), relative position biases (BEiT), a model read
    through its mean patch token, and the dropped tokens fused into one (torch)."""
    _same_steps(make("torch", None, **MODELS[kind]), make("torch", 4, **MODELS[kind]))


def _same_steps(whole, passes):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(10, 3, 32, 32, generator=g), torch.randint(0, 5, (10,), generator=g)) for _ in BUDGETS]
    for step, (budget, (x, y)) in enumerate(zip(BUDGETS, batches)):
        a = whole.train_step(x, y, budget, 1e-3, step)
        b = passes.train_step(x, y, budget, 1e-3, step)
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.batch_size == a.batch_size == 10
        assert b.deltas == pytest.approx(a.deltas, rel=1e-4, abs=1e-7)
        assert (b.tokens_in, b.kept_tokens, b.trained_blocks) == (a.tokens_in, a.kept_tokens, a.trained_blocks)
        assert b.train_flops == pytest.approx(a.train_flops, rel=1e-9) and a.train_flops > 0
    for (name, p), q in zip(whole.model.named_parameters(), passes.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert passes.full_ft_step_flops(10) == pytest.approx(whole.full_ft_step_flops(10), rel=1e-9)


@pytest.mark.gpu
def test_on_a_gpu_passes_give_the_step_at_a_lower_peak():
    """CUDA (steps read one step late): passes of 16 of a batch of 64 give the one-pass losses, with a
    lower peak of the device's memory."""
    def run(micro):
        cfg = build_config({"backend": {"name": "torch", "device": "cuda"},
                            "train": {"batch_size": 64, "micro_batch_size": micro}})
        rt = create_runtime(cfg, make_tiny_vit())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(3)
        losses = []
        for step, budget in enumerate(BUDGETS):
            x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 5, (64,), generator=g)
            losses.append(rt.train_step(x, y, budget, 1e-3, step).loss)
        return losses, torch.cuda.max_memory_allocated()

    (whole, whole_peak), (passes, passes_peak) = run(None), run(16)
    assert passes == pytest.approx(whole, rel=1e-4)
    assert passes_peak < whole_peak


def test_a_non_finite_pass_stops_the_step_before_the_update(monkeypatch):
    """The loss is checked pass by pass: a NaN in the second pass raises, no weight changes."""
    from runtimes.protocol import NonFiniteLoss

    rt = make("torch", 4)
    before = [p.detach().clone() for p in rt.model.parameters()]
    x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 5, (10,))
    x[5] = float("nan")  # the second pass's
    with pytest.raises(NonFiniteLoss):
        rt.train_step(x, y, BUDGETS[1], 1e-3, 0)
    assert all(torch.equal(p, q) for p, q in zip(rt.model.parameters(), before))


def _run(tmp_path, name, *extra):
    run = tmp_path / name
    res = CliRunner().invoke(cli, ["train", "--steps", "3", "--batch-size", "16", "--target-flops", "0.5", "--set",
                                   "backend.threads=1", "--set", "data.val_fraction=0.05", *extra, "--out",
                                   str(run), "--json"])
    assert res.exit_code == 0, res.output
    return run, json.loads(res.stdout.strip().splitlines()[-1])


def test_a_run_in_passes_measures_the_memory_its_plan_predicts(tmp_path):
    """The demo at batch 16 in passes of 5: the same counted FLOPs as one pass, a lower measured
    peak, and the plan and the replay of the run price that peak."""
    _, whole = _run(tmp_path, "whole")
    run, passes = _run(tmp_path, "passes", "--micro-batch-size", "5")
    assert (whole["micro_batch_size"], passes["micro_batch_size"]) == (None, 5)
    assert passes["train_flops"] == pytest.approx(whole["train_flops"], rel=1e-9)
    assert passes["peak_memory_bytes"] < 0.8 * whole["peak_memory_bytes"]
    res = CliRunner().invoke(cli, ["plan", "--batch-size", "16", "--micro-batch-size", "5", "--steps", "3",
                                   "--target-flops", "0.5", "--throughput", "1e10", "--json"])
    assert res.exit_code == 0, res.output
    assert "step time is priced as one pass of the batch of 16; passes of 5 add" in res.stderr
    planned = json.loads(res.stdout)
    assert planned["micro_batch_size"] == 5
    assert planned["policies"]["alast"]["peak_memory_bytes"] == pytest.approx(passes["peak_memory_bytes"], rel=0.05)
    res = CliRunner().invoke(cli, ["plan", "--trace", str(run), "--json"])
    assert res.exit_code == 0, res.output
    trace = json.loads(res.stdout)["trace"]
    assert trace["predicted_peak_memory_sampled_steps_bytes"] == pytest.approx(trace["measured_peak_memory_bytes"],
                                                                                rel=0.05)
    assert trace["train_flops_rel_error"] == 0.0


def test_a_run_stopped_for_memory_resumes_in_passes(tmp_path, monkeypatch):
    """A resume may set the micro-batch size (what the out-of-memory line advises): the resumed run
    logs the losses the uninterrupted run in one pass logs, to float rounding, token draws included."""
    from tests.alast.test_resume import interrupt_after_step_1

    args = ["train", "--steps", "4", "--batch-size", "16", "--target-flops", "0.5", "--set", "backend.threads=1",
            "--set", "data.val_fraction=0.05", "--set", "output.checkpoint_every=1"]
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    interrupt_after_step_1(monkeypatch)
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run")]).exit_code == 130
    monkeypatch.undo()
    res = CliRunner().invoke(cli, [*args, "--micro-batch-size", "5", "--out", str(tmp_path / "run"), "--resume"])
    assert res.exit_code == 0, res.output
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "run")]
    assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("args,fragment", [
    (["--batch-size", "8", "--micro-batch-size", "16"], "train.micro_batch_size=16 is above train.batch_size=8"),
    (["--micro-batch-size", "0"], "micro_batch_size"),
])
def test_a_pass_larger_than_the_step_or_empty_is_refused(tmp_path, args, fragment):
    res = CliRunner().invoke(cli, ["train", *args, "--steps", "1", "--out", str(tmp_path / "run")])
    one_error_line(res, 2, fragment)
    assert not (tmp_path / "run").exists()
