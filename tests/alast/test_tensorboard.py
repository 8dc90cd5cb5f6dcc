"""TensorBoard event files mirror metrics.jsonl; a resumed run appends without repeating steps."""
from __future__ import annotations

from pathlib import Path

import pytest

from alast.config import build_config
from alast.training.loop import Hooks, train
from alast.training.report import read_metrics
from alast.training.tensorboard import TB_DIR

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS = 6


def _cfg(run: Path, **output):
    return build_config({
        "train": {"steps": STEPS, "batch_size": 16, "eval_every": 3},
        "backend": {"threads": 1},
        "data": {"val_fraction": 0.05},  # as SMALL_VAL: 90 validation images
        "output": {"tensorboard": True, "checkpoint_every": 3, "dir": str(run), **output},
    })


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / TB_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalar(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_event_files_hold_every_step_metric_and_the_heatmap(tmp_path):
    run = tmp_path / "run"
    summary = train(_cfg(run), run)
    acc = _events(run)
    records = read_metrics(run / "metrics.jsonl")
    loss = _scalar(acc, "train/loss")
    assert [s for s, _ in loss] == [r["step"] for r in records]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [s for s, _ in _scalar(acc, "train/lr")] == list(range(STEPS))
    ratio = _scalar(acc, "flops/ratio_vs_full")
    assert ratio[-1][1] == pytest.approx(summary["flops_ratio_vs_full"], rel=1e-6)
    blocks = len(records[0]["budgets"])
    tags = acc.Tags()["scalars"]
    for i in range(blocks):
        assert f"budget/block_{i:02d}" in tags and f"tokens_kept/block_{i:02d}" in tags
    kept = _scalar(acc, f"tokens_kept/block_{blocks - 1:02d}")
    assert [v for _, v in kept] == [r["kept_tokens"][-1] for r in records]
    trained = _scalar(acc, "trained/count")
    assert [v for _, v in trained] == [len(r["trained_blocks"]) for r in records]
    assert [s for s, _ in _scalar(acc, "val/accuracy")] == [3, STEPS]
    assert _scalar(acc, "val/accuracy")[-1][1] == pytest.approx(summary["val_accuracy"])
    assert acc.Tags()["images"] == ["budgets"]


class _Crash(Exception):
    pass


def test_resume_appends_without_duplicating_steps(tmp_path):
    run = tmp_path / "run"

    def crash_after_step_4(step, result, record):
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):  # steps 0-4 logged, checkpoint after step 3 (3 steps done)
        train(_cfg(run), run, hooks=Hooks(on_step=crash_after_step_4))
    train(_cfg(run), run, resume=True)
    loss = _scalar(_events(run), "train/loss")
    assert [s for s, _ in loss] == list(range(STEPS))
    records = read_metrics(run / "metrics.jsonl")
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    counted = _scalar(_events(run), "flops/counted")
    assert counted[-1][1] == pytest.approx(sum(r["train_flops"] for r in records), rel=1e-6)


def test_missing_tensorboard_is_a_one_line_bad_input(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"pip install 'alast\[tensorboard\]'"):
        train(_cfg(run), run)
    assert not run.exists()
