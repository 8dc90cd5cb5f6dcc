"""TensorBoard event files for a run (``output.tensorboard: true``; ``pip install 'alast[tensorboard]'``).

Written by rank 0 into ``RUN_DIR/tensorboard`` next to ``metrics.jsonl``, with the same step numbers:
``train/loss``, ``train/lr``, ``train/step_time_s``, ``flops/counted`` (cumulative) and
``flops/ratio_vs_full`` (cumulative counted FLOPs over full fine-tuning's for the same steps),
``budget/block_NN``, ``tokens_kept/block_NN`` (patch tokens leaving block NN), ``trained/block_NN``
(1 trained, 0 frozen) and ``trained/count``, ``val/accuracy`` and ``val/loss``, and at the end the
budget heatmap as the image ``budgets``. A resumed run opens the log with ``purge_step`` at the step
it resumes from, so TensorBoard drops what the interrupted run logged after its checkpoint and
no step appears twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

TB_DIR = "tensorboard"


def check_available() -> None:
    """ValueError (bad input, exit 2) unless the tensorboard package is importable."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError("output.tensorboard needs the tensorboard package: pip install 'alast[tensorboard]' "
                         "(or set output.tensorboard=false)") from None


class TensorBoardLog:
    """Mirrors each metrics record, each evaluation and the final heatmap into event files."""

    def __init__(self, run_dir: Path, start_step: int, full_step_flops: float | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=start_step or None)
        self.full_step_flops = full_step_flops
        self.counted = 0.0
        self.steps_counted = 0

    def resume_counts(self, counted_flops: float, steps: int) -> None:
        """Carry the cumulative FLOPs of the steps before a resume (from the checkpointed tally)."""
        self.counted, self.steps_counted = float(counted_flops), int(steps)

    def step(self, record: dict[str, Any]) -> None:
        w, s = self.writer, int(record["step"])
        w.add_scalar("train/loss", record["loss"], s)
        w.add_scalar("train/lr", record["lr"], s)
        w.add_scalar("train/step_time_s", record["step_time_s"], s)
        if record.get("train_flops") is not None:
            self.counted += float(record["train_flops"])
            self.steps_counted += 1
            w.add_scalar("flops/counted", self.counted, s)
            if self.full_step_flops:
                w.add_scalar("flops/ratio_vs_full", self.counted / (self.full_step_flops * self.steps_counted), s)
        for i, b in enumerate(record["budgets"]):
            w.add_scalar(f"budget/block_{i:02d}", b, s)
        for i, n in enumerate(record["kept_tokens"]):
            w.add_scalar(f"tokens_kept/block_{i:02d}", n, s)
        trained = set(record["trained_blocks"])
        for i in range(len(record["budgets"])):
            w.add_scalar(f"trained/block_{i:02d}", 1.0 if i in trained else 0.0, s)
        w.add_scalar("trained/count", len(trained), s)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.add_scalar("val/accuracy", metrics["accuracy"], step)
        self.writer.add_scalar("val/loss", metrics["loss"], step)

    def heatmap(self, png: Path | None, step: int) -> None:
        if png is None or not Path(png).exists():
            return
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(png).convert("RGB"))
        self.writer.add_image("budgets", img, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
