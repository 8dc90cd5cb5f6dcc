"""The sync-free step (backend.sync_free): results read one step late, the planner one step behind.

On CPU nothing is asynchronous, so these tests check the structure that makes the CUDA path
sync-free: step i is read back only after step i+1 was launched, every step is still logged with
its own values, and checkpoints, resume, the NaN stop and data parallel ranks are unaffected.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from alast.config import load_config
from alast.training import checkpoint as ckpt
from alast.training import loop
from alast.training.report import read_metrics
from runtimes.protocol import NonFiniteLoss

BASE = ["train.steps=8", "train.batch_size=8", "backend.count_flops=off", "backend.threads=1",
        "output.checkpoint_every=3", "policy.alpha=0.5",
        "data.val_fraction=0.05"]


def cfg(*extra: str):
    return load_config(None, [*BASE, *extra])


def records(run):
    return read_metrics(run / "metrics.jsonl")


class RecordingPlanner:
    """Wraps the real planner and records the order of plan and observe calls."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events
        self.name, self.num_blocks = inner.name, inner.num_blocks

    def plan(self, step, progress):
        self.events.append(("plan", step))
        return self.inner.plan(step, progress)

    def observe(self, obs):
        self.events.append(("observe", obs.step))
        self.inner.observe(obs)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_observation_of_step_i_reaches_the_planner_after_step_i_plus_1_is_planned(tmp_path, monkeypatch, mode):
    events = []
    build = loop.build_planner
    monkeypatch.setattr(loop, "build_planner", lambda *a, **k: RecordingPlanner(build(*a, **k), events))
    loop.train(cfg(f"backend.sync_free={mode}", "train.steps=5", "output.checkpoint_every=0"), tmp_path / "r")
    if mode == "off":
        expected = [e for s in range(5) for e in (("plan", s), ("observe", s))]
    else:  # observe(i) comes after plan(i + 1); the last step is logged but never observed
        expected = [("plan", 0)] + [e for s in range(1, 5) for e in (("plan", s), ("observe", s - 1))]
    assert events == expected
    assert [r["step"] for r in records(tmp_path / "r")] == list(range(5))


def test_static_policy_logs_identical_values_with_and_without_the_lag(tmp_path):
    """For a policy that ignores observations the lag changes nothing: same losses, deltas, tokens."""
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = tmp_path / mode
        loop.train(cfg(f"backend.sync_free={mode}", "policy.name=tokens", "policy.keep_ratio=0.7"), runs[mode])
    keys = ("step", "loss", "deltas", "kept_tokens", "trained_blocks", "lr")
    off, on = ([{k: r[k] for k in keys} for r in records(runs[m])] for m in ("off", "on"))
    assert off == on and len(on) == 8


def test_lagged_run_interrupted_off_a_checkpoint_boundary_resumes_exactly(tmp_path):
    ref = tmp_path / "ref"
    loop.train(cfg("backend.sync_free=on"), ref)
    run = tmp_path / "run"

    def stop_soon(step, result, record):
        if step == 3:  # logged while step 4 runs; the loop stops after step 4
            os.kill(os.getpid(), signal.SIGINT)

    from alast.training.rundir import Interrupted

    with pytest.raises(Interrupted) as info:
        loop.train(cfg("backend.sync_free=on"), run, hooks=loop.Hooks(on_step=stop_soon))
    assert info.value.step not in (3, 6)  # not a checkpoint boundary: the flush there must not leak
    loop.train(cfg("backend.sync_free=on"), run, resume=True)
    keys = ("step", "loss", "budgets", "kept_tokens", "trained_blocks")
    assert [{k: r[k] for k in keys} for r in records(run)] == [{k: r[k] for k in keys} for r in records(ref)]


def test_lagged_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from runtimes.torch_backend.runtime import TorchRuntime

    launch = TorchRuntime.launch_step

    def poisoned(self, images, labels, budget, lr, step, **kw):
        return launch(self, images * float("nan") if step == 4 else images, labels, budget, lr, step, **kw)

    monkeypatch.setattr(TorchRuntime, "launch_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"at step 5 \(metrics.jsonl step 4\).*step_00000003"):
        loop.train(cfg("backend.sync_free=on"), run)
    assert [r["step"] for r in records(run)] == [0, 1, 2, 3]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000003.safetensors"]
    state = ckpt.load_checkpoint(run / "checkpoints" / ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["runtime"]["model"].values() if v.is_floating_point())


def _lagged_ranks(comm):
    """plan -> launch -> resolve previous -> observe on one rank; returns what must agree."""
    from planners import Observation, create_planner
    from runtimes.distributed import weights_digest
    from runtimes.torch_backend.runtime import TorchRuntime
    from tests.conftest import make_tiny_vit

    runtime = TorchRuntime(make_tiny_vit(seed=comm.rank), lr=1e-2, weight_decay=0.05, grad_clip=1.0,
                           device="cpu", count_flops="off", comm=comm, sync_free="on",
                           memory_probe_steps=lambda s: False)
    planner = create_planner("alast", runtime.num_blocks, alpha=0.5, seed=7)
    g = torch.Generator().manual_seed(123 + comm.rank)  # each rank its own data
    pending, seen = None, []
    for step in range(5):
        budget = planner.plan(step, step / 5)
        launched = runtime.launch_step(torch.randn(4, 3, 32, 32, generator=g),
                                       torch.randint(0, 5, (4,), generator=g), budget, 1e-2, step)
        if pending is not None:
            res = pending.resolve()
            planner.observe(Observation(pending.step, pending.step / 5, res.deltas, res.loss))
            seen.append((res.loss, res.deltas, res.kept_tokens, res.trained_blocks))
        pending = launched
    seen.append(pending.resolve().loss)
    return {"digest": weights_digest(list(runtime.model.parameters())), "seen": seen}


def test_lagged_ranks_stay_identical_under_data_parallel():
    from runtimes.distributed import run_local

    a, b = run_local(2, _lagged_ranks)
    assert a["digest"] == b["digest"]
    assert a["seen"] == b["seen"]  # losses and deltas all-gathered on the device, budgets identical
