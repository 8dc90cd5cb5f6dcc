"""Run artefacts that are not checkpoints: metrics.jsonl and the budget heatmap."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON line per step and flushes it, so a killed run keeps what it logged."""

    def __init__(self, run_dir: Path, truncate_after_step: int | None = None) -> None:
        """A fresh file, or (resuming) the existing one cut to the steps before ``truncate_after_step``."""
        self.path = Path(run_dir) / METRICS
        if truncate_after_step is None:
            self.path.write_text("")
        elif self.path.exists():  # whole or not at all: a kill here must not lose the steps before
            from alast.training.checkpoint import atomic_write_text

            kept = [l for l in read_metrics(self.path) if l.get("step", -1) < truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(l) + "\n" for l in kept))
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Step records of a metrics file; a torn last line (killed writer) is ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def budget_heatmap(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Blocks x steps image of the per-block budgets, trained blocks marked; None if no steps."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = np.array([r["budgets"] for r in records]).T
    kept = np.array([r["kept_tokens"] for r in records]).T
    trained = np.zeros_like(budgets)
    for j, r in enumerate(records):
        trained[r["trained_blocks"], j] = 1
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for ax, data, label, cmap in (
        (axes[0], budgets, "budget b_l", "viridis"),
        (axes[1], kept, "patch tokens kept", "magma"),
        (axes[2], trained, "trained (1) / frozen (0)", "Greys"),
    ):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, data.shape[0] - 0.5, -0.5))
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, label=label)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or "ALaST per-block budgets")
    # fixed margins: tight_layout would draw the figure once more to measure it (a third of the time)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.95, bottom=0.07, hspace=0.12)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    from alast.training.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), image.getvalue())
    return Path(path)
