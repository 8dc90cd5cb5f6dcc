"""The planner's time of a run counts what the torch runtime does beside training: its first step,
steps run under the FLOP counter (a piece of the step not counted before), and the steps whose
CPU memory it measures. Before, a calibrated plan timed every step as a plain one and predicted
short runs 40-80% too fast."""
from __future__ import annotations

from dataclasses import replace

import pytest

from planners.costmodel import TimeModel
from planners.rules import MemoryProbes, flop_count_keys, memory_probe_step
from planners.simulate import simulate
from tests.planners.fixtures import synthetic_cost_model


def _time_model(**kw) -> TimeModel:
    base = {"device": "cpu", "batch_size": 4, "count_flops": "every", "first_step_s": 10.0, "counted_factor": 2.0,
            "probed_factor": 3.0}
    return TimeModel("calibrated", {"step": 1.0}, **{**base, **kw})  # a plain step: 1 s


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, [12, 3, 3, 1, 1]),  # step 0 first and counted; 1 and 2 measured
    ({"device": "cuda"}, [12, 1, 1, 1, 1]),  # memory is measured on the CPU only
    ({"count_flops": "off"}, [11, 3, 3, 1, 1]),
    ({"first_step_s": 0.0, "counted_factor": 1.0, "probed_factor": 1.0}, [1, 1, 1, 1, 1]),  # a throughput model
])
def test_the_steps_beside_training_are_timed(kw, expected):
    cm = replace(synthetic_cost_model(num_blocks=4, num_patches=16), time=_time_model(**kw))
    pred = simulate(cm, "full", {}, steps=5, batch_size=4)
    assert pred.time_s == pytest.approx(sum(expected))


def test_only_steps_with_a_new_piece_are_counted():
    """A static policy repeats its first step's shape: only that one is counted. The tokens policy
    with a ramp of keep ratios is not static, but its blocks' pieces still repeat."""
    cm = replace(synthetic_cost_model(num_blocks=4, num_patches=16), time=_time_model(probed_factor=1.0))
    assert simulate(cm, "freeze", {"k_trained": 2}, steps=4, batch_size=4).time_s == pytest.approx(12 + 1 + 1 + 1)
    early = simulate(cm, "alast", {"k_trained": 2, "early_frac": 0.5, "freeze_mode": "last"}, steps=4, batch_size=4)
    assert early.time_s == pytest.approx(12 + 1 + 2 + 1)  # step 2 trains one block fewer: new pieces


def test_the_runtime_and_the_planner_share_the_rules():
    from runtimes.torch_backend.flops import StepFlopCache
    from runtimes.torch_backend.memory import default_memory_probe

    assert StepFlopCache.keys is flop_count_keys and default_memory_probe is memory_probe_step
    probes = MemoryProbes()
    assert [probes(s, (16, 16), 2) for s in range(4)] == [False, True, True, False]
    assert probes(4, (16, 18), 2) and not probes(5, (16, 18), 2)  # heavier than every measured step, once
    assert probes(6, (16, 16), 3)  # more trained blocks


def test_a_step_both_counted_and_measured_adds_both_extra_times():
    tm = _time_model()
    assert tm.step_time_s({"step": 1}, counted=True, probed=True) == pytest.approx(1 + (2 - 1) + (3 - 1))
    assert tm.step_time_s({"step": 1}, first=True) == pytest.approx(1 + 10)
