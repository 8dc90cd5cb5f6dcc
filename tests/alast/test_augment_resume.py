"""Augmented batches are a pure function of (seed, step, sample): resume and data.num_workers cannot change them.

A DataLoader built after a resume restored the RNG drew its base seed from torch's global generator,
and augmentations drew from the global generators (no workers) or from each worker's own, which
depend on the samples it served before and are not checkpointed: augmented resumes diverged.
"""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alast.data import StepBatchSampler, build_data, train_batches
from alast.training.build import model_data_config
from alast_cli.main import cli
from tests.conftest import SMALL_VAL

CFG = model_data_config("alast_demo_vit")
SEED, BATCH, STEPS = 3, 8, 6


@pytest.fixture(scope="module")
def augmented():
    return build_data("digits", CFG, seed=SEED, augment=True).train


def batches_from(ds, start: int, workers: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    sampler = StepBatchSampler(len(ds), BATCH, SEED, start, STEPS)
    return dict(zip(range(start, STEPS), train_batches(ds, sampler, num_workers=workers, augment=True)))


def assert_same(a, b) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert torch.equal(a[step][0], b[step][0]) and torch.equal(a[step][1], b[step][1]), f"step {step}"


def test_augmented_batches_do_not_depend_on_the_start_step_or_the_workers(augmented):
    torch.manual_seed(0)
    whole = batches_from(augmented, 0)
    torch.manual_seed(1)  # a resume restores some other global state before the loader starts
    resumed = batches_from(augmented, 3)
    assert_same({s: whole[s] for s in resumed}, resumed)
    torch.manual_seed(2)
    assert_same({s: whole[s] for s in range(2, STEPS)}, batches_from(augmented, 2, workers=2))

    # the augmentation is live: one image read at other steps is cropped/flipped differently
    from alast.data.datasets import StepSeededAugment

    read = StepSeededAugment(augmented, SEED)
    i = StepBatchSampler(len(augmented), BATCH, SEED, 0, STEPS).indices(0)[0]
    assert torch.equal(read[(i, 0)][0], whole[0][0][0])
    assert not all(torch.equal(read[(i, 0)][0], read[(i, s)][0]) for s in range(1, 4))


def test_main_process_augmentation_leaves_the_global_generators_alone(augmented):
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    batches_from(augmented, 1)
    after = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert after[0] == before[0]
    assert all(np.array_equal(a, b) for a, b in zip(after[1], before[1]))
    assert torch.equal(after[2], before[2])


def test_loaders_never_draw_from_the_global_torch_generator():
    """Training draws from torch's generator (drop path, LoRA dropout), which a resume restores before
    the loader starts and whose draws must not depend on train.eval_every, a key a resume may change."""
    from alast.data import eval_batches

    plain = build_data("digits", CFG, seed=SEED)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    list(train_batches(plain.train, StepBatchSampler(len(plain.train), BATCH, SEED, 2, 4)))
    next(iter(eval_batches(plain.val, BATCH)))
    assert torch.equal(torch.get_rng_state(), before)


def _train(*args: str):
    return CliRunner().invoke(cli, ["train", *SMALL_VAL, "--steps", str(STEPS), "--batch-size", str(BATCH), "--seed", str(SEED),
                                    "--set", "data.augment=true", "--set", "data.num_workers=0",
                                    "--set", "backend.threads=1", "--set", 'backend.count_flops="off"', *args])


def test_an_interrupted_augmented_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from alast.training import report
    from alast.training.report import read_metrics

    res = _train("--out", str(tmp_path / "whole"))
    assert res.exit_code == 0, res.output

    write = report.MetricsWriter.write

    def write_then_interrupt(self, record):  # Ctrl-C once step 2 is logged: the loop stops after 3 steps
        write(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(report.MetricsWriter, "write", write_then_interrupt)
    res = _train("--out", str(tmp_path / "cut"))
    assert res.exit_code == 130 and "interrupted at step 3" in res.stderr, res.output
    monkeypatch.undo()
    res = _train("--out", str(tmp_path / "cut"), "--resume")
    assert res.exit_code == 0, res.output

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert losses("cut") == losses("whole")
    whole, cut = (load_file(tmp_path / run / "final_model.safetensors") for run in ("whole", "cut"))
    assert sorted(whole) == sorted(cut)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
