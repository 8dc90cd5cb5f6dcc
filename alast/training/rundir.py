"""What a run directory holds, by name, and the checks before a run writes into one.

A run directory: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per step),
``checkpoints/`` (see :mod:`alast.training.checkpoint`), ``summary.json``, ``final_model.safetensors``,
``budgets.png``, optionally ``tensorboard/`` and, for the ort backend, ``ort_artifacts/``.
"""
from __future__ import annotations

from pathlib import Path

from alast.training import checkpoint as ckpt

SUMMARY = "summary.json"
CONFIG = "config.yaml"
FINAL_WEIGHTS = "final_model.safetensors"
HEATMAP = "budgets.png"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, missing, or incompatible)."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM during training; a checkpoint was written first."""

    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {path}")
        self.step, self.path = step, path


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse a run dir that cannot be used as asked; touches nothing."""
    if resume:
        if not (run_dir / CONFIG).exists():
            raise RunDirError(f"cannot resume {run_dir}: no {CONFIG} there; start a new run instead")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} is a file; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise RunDirError(f"run dir {run_dir} exists and is not empty; pass --resume to continue it, "
                          "--force to write into it, or choose another --out")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    check_run_dir(run_dir, resume, force)
    if resume:
        for stale in (run_dir / ckpt.CKPT_DIR).glob(".*.tmp"):  # from a write killed half-way
            stale.unlink(missing_ok=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)


