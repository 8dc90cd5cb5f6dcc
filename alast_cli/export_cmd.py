"""`alast export` (a run to a verified ONNX model) and `alast eval` (a run or an ONNX model)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .errors import run_guarded
from .options import PathOption, check_out_path


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj.get("debug", False)) if ctx.obj else False


def check_export_options(run_dir: Path, out: Path, atol: float | None) -> None:
    """Refuse, before the run loads, an ``--atol`` that no export can meet (the config's bound:
    above 0), a ``RUN_DIR`` that is not there and an ``--out`` that cannot be written."""
    if atol is not None and not 0 < atol < math.inf:  # NaN included; inf would check nothing
        raise ValueError(f"--atol must be a finite number above 0 (the largest |logit difference| vs PyTorch to "
                         f"accept), got {atol:g}; e.g. --atol 1e-4")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}; give the folder `alast train` wrote (its "
                                "--out, e.g. runs/<time>-<policy>)")
    check_out_path(out)


@click.command("export")
@click.argument("run_dir", type=PathOption())
@click.option("--out", type=PathOption(), required=True, help="the .onnx file to write")
@click.option("--atol", type=float,
              help="max |logit difference| vs PyTorch, above 0 (default: the run's export.atol)")
@click.option("--opset", type=int, help="ONNX opset (default: the run's export.opset)")
@click.option("--all-tokens", is_flag=True, help="keep every token, whatever the run deployed")
@click.option("--force", is_flag=True, help="overwrite --out if it exists (never one of the run's own files)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def export_command(ctx: click.Context, run_dir: Path, out: Path, atol: float | None, opset: int | None,
                   all_tokens: bool, force: bool, as_json: bool) -> None:
    """Export a finished run's deployed model (on its token schedule, or every token) to ONNX, verified
    against PyTorch."""

    def go() -> None:
        from alast.export import export_run

        check_export_options(run_dir, out, atol)
        report = export_run(run_dir, out, atol=atol, opset=opset, all_tokens=all_tokens, force=force)
        kept = list(report.kept_tokens) if report.kept_tokens else None
        if as_json:
            click.echo(json.dumps({"path": str(report.path), "max_abs_diff": report.max_abs_diff,
                                   "atol": report.atol, "opset": report.opset, "kept_tokens": kept}))
            return
        from .render import results

        results.print(f"token schedule: {kept} patch tokens after each block" if kept
                      else "every token in every block (no token schedule)")
        results.print(f"verified: max |logit diff| vs PyTorch {report.max_abs_diff:.2e} <= {report.atol:g} "
                      f"(onnxruntime, batch {report.batch}, opset {report.opset})")
        results.print(f"wrote {report.path}")

    run_guarded(go, _debug(ctx))


@click.command("eval")
@click.argument("target", type=PathOption())
@click.option("--data", "spec",
              help="digits | shapes | letters | imagefolder:PATH | torchvision:NAME (default: the run's)")
@click.option("--data-dir", type=PathOption(), help="root for torchvision datasets")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="images per batch (default: the run's train.eval_batch_size, else sized for memory)")
@click.option("--all-tokens", is_flag=True, help="a run directory: keep every token instead of its token schedule")
@click.option("--skip-bad-images", is_flag=True,
              help="skip unreadable images instead of failing (on by default where the run skipped them)")
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@click.pass_context
def eval_command(ctx: click.Context, target: Path, spec: str | None, data_dir: Path | None, batch_size: int | None,
                 all_tokens: bool, skip_bad_images: bool, as_json: bool) -> None:
    """Evaluate a run directory (PyTorch) or an exported .onnx model (onnxruntime)."""

    def go() -> None:
        from alast.export import evaluate_onnx, evaluate_run
        from runtimes.onnx_export import ExportError

        if not target.exists():
            raise ExportError(f"{target} not found: there is neither a run directory nor an .onnx file at that "
                              "path; give a run directory (`alast train --out`) or a model from `alast export`")
        if target.is_dir():
            metrics = evaluate_run(target, spec, data_dir, batch_size, all_tokens, skip_bad_images)
        elif all_tokens:
            raise click.UsageError("--all-tokens applies to run directories; an ONNX model has its schedule "
                                   "built in (export it again with --all-tokens)")
        else:
            metrics = evaluate_onnx(target, spec, data_dir, batch_size, skip_bad_images)
        if as_json:
            click.echo(json.dumps(metrics))
            return
        from .render import results

        if metrics.get("skipped_files"):
            click.echo(f"note: {metrics['skipped_files']} unreadable image file(s) skipped", err=True)
        results.print(f"{metrics['source']} {metrics['path']} on {metrics['data']}: accuracy "
                      f"{metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} ({metrics['samples']} images"
                      + (f", token schedule {metrics['kept_tokens']})" if metrics.get("kept_tokens") else ")"))

    run_guarded(go, _debug(ctx))
