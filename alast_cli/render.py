"""Rich rendering for the CLI: progress during training, tables at the end."""
from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from alast.training.loop import Hooks

# Piped output (CI logs, `| tee`) gets a wide fixed width so tables are not squeezed to 80 columns.
# Progress, notes and warnings go to stderr; a command's results (tables, predictions, verdicts) to
# stdout, so that `alast plan > plan.txt` keeps them (with --json, stdout holds the JSON alone).
# Printed text is never read as rich markup or emoji codes: it holds the user's paths, specs and names
# (a folder `[bold]x` or `zero` would print as `x` or an emoji); styles go in style=.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140, markup=False, emoji=False)
results = Console(width=None if sys.stdout.isatty() else 140, markup=False, emoji=False)


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def knobs_text(knobs: dict[str, Any], policy: str = "") -> str:
    """A FLOPs target's planner settings as ``key=value`` pairs (floats to 3 significant digits).
    ``target_flops`` is the sparse steps' per-step target (the early phase spends less, the run's mean
    lands on its target), and under LoRA (``policy`` ``X+lora``) a fraction of the LoRA model's own
    step on every token, which computes no weight gradients for the frozen weights: the text says so."""
    def show(k: str, v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        if k == "target_flops":  # not the run's target: each sparse step's, which pays for the other steps
            text += " (per sparse step" + (", of a LoRA step on every token)" if policy.endswith("+lora") else ")")
        return text

    return ", ".join(f"{k}={show(k, v)}" for k, v in knobs.items())


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def _cache_memory(frozen: dict[str, Any]) -> str:
    """Where the frozen blocks' cache is kept: host memory beside the run, or GPU memory within its peak."""
    return "GPU memory, within the peak" if frozen.get("device") == "cuda" else "host memory"


def training_hooks(progress: Progress, quiet: bool = False) -> Hooks:
    state: dict[str, Any] = {}

    def on_start(start: int, total: int, info: dict[str, Any]) -> None:
        resuming = start > 0
        state["task"] = progress.add_task("train", total=total, completed=start, loss=float("nan"), kept=1.0,
                                          trained="-")
        state["tokens"] = info["patches"] * info["blocks"]
        skipped = f"; {info['skipped']} unreadable image file(s) skipped" if info.get("skipped") else ""
        state["scored"] = "tuning" if info.get("scored") == "tuning" else "val"
        scored = "held-out tuning" if state["scored"] == "tuning" else "val"
        progress.console.print(f"{info['train']} train / {info['val']} {scored} images, {info['classes']} classes, "
                               f"{info['blocks']} blocks x {info['patches']} patch tokens{skipped}", style="dim")
        if not resuming and info.get("weights"):
            progress.console.print(f"starting from {info['weights']}", style="dim")
        frozen = info.get("frozen_cache")
        if frozen:
            blocks = "block 0" if frozen["blocks"] == 1 else f"blocks 0-{frozen['blocks'] - 1}"
            progress.console.print(f"frozen {blocks} cached for up to {frozen['capacity_images']} images "
                                   f"({human_bytes(frozen['bytes'])} {_cache_memory(frozen)}); the plan reads "
                                   f"{frozen['planned_share']:.0%} of "
                                   "the steps' images from it", style="dim")

    def on_step(step: int, result, record: dict[str, Any]) -> None:
        kept = sum(result.tokens_in) / max(state["tokens"], 1)
        progress.update(state["task"], advance=1, loss=result.loss, kept=kept,
                        trained=f"{len(result.trained_blocks)}/{len(result.tokens_in)}")

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        progress.console.print(f"step {step}: {state.get('scored', 'val')} accuracy {metrics['accuracy']:.4f}, "
                               f"loss {metrics['loss']:.4f}")

    return Hooks(on_start=on_start, on_step=on_step, on_eval=on_eval)


class _Progress(Progress):
    """rich's Progress, less the blank line it prints on stopping into a file or pipe when it has shown
    nothing (no task yet: the run failed before its first step), which would split an error from
    the lines before it."""

    def stop(self) -> None:
        if self.tasks or self.disable:
            super().stop()
        else:
            self.live.stop()


def make_progress() -> Progress:
    return _Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("tokens {task.fields[kept]:.0%}"),
        TextColumn("trained {task.fields[trained]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )


def summary_table(summary: dict[str, Any], run_dir: Any) -> Table:
    t = Table(title=f"{summary['policy']} on {summary['model']} / {summary['data']} ({summary['backend']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    kept, sched = summary.get("eval_kept_tokens"), summary.get("token_schedule")
    deployed = f"token schedule {kept}" if kept else "every token"
    scored = "tuning accuracy (held out of training)" if summary.get("scored_on") == "tuning" else "validation accuracy"
    t.add_row(scored, f"{summary['val_accuracy']:.4f}" + (f"  ({deployed})" if sched else ""))
    if sched:
        other = (("every token", summary["val_accuracy_all_tokens"]) if kept else
                 (f"token schedule {sched}", summary["val_accuracy_token_schedule"]))
        t.add_row(f"  on {other[0]}", f"{other[1]:.4f}" + ("" if kept or summary["eval_tokens"] != "auto"
                                                           else "  (less accurate: not used)"))
    if kept and summary.get("inference_flops_ratio"):
        t.add_row("inference FLOPs vs every token", f"{summary['inference_flops_ratio']:.3f}x")
    tf, full = summary.get("train_flops"), summary.get("full_ft_train_flops")
    t.add_row("training FLOPs (counted)", human(tf, "FLOP"))
    t.add_row("full fine-tuning FLOPs (same steps)", human(full, "FLOP"))
    if tf and full:
        t.add_row("FLOPs vs full", f"{tf / full:.3f}x  ({full / tf:.2f}x fewer)")
    if summary.get("parameters"):
        n = summary["parameters"]
        t.add_row("parameters updated", f"{n['updated'] / 1e6:.2f} M of {n['total'] / 1e6:.2f} M "
                                        f"({n['updated'] / max(n['total'], 1):.0%})")
    waited = summary.get("data_wait_s")
    data = f", waiting for data {waited:.1f} s" if waited is not None else ""
    t.add_row("wall time", f"{summary['wall_time_s']:.1f} s (training steps {summary['train_time_s']:.1f} s{data})")
    t.add_row("median step time", f"{(summary['median_step_time_s'] or 0) * 1000:.1f} ms")
    per = " (per process)" if (summary.get("world_size") or 1) > 1 else ""
    t.add_row(f"peak memory{per}", human_bytes(summary.get("peak_memory_bytes")))
    t.add_row("run dir", str(run_dir))
    return t
