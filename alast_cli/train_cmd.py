"""`alast train`: fine-tune with a policy and backend, write a run directory."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from .errors import run_guarded
from .options import config_options, resolve_config


def default_run_dir(policy: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{policy.replace('+', '-')}"


def run_train(config: Path | None, overrides: tuple[str, ...], out: Path | None, resume: bool, force: bool,
              as_json: bool, skip_bad_images: bool, named: dict[str, Any]) -> dict[str, Any]:
    from runtimes import loop

    from .render import console, make_progress, summary_table, training_hooks

    if resume and out is None:
        raise click.UsageError("--resume needs --out RUN_DIR (the run to continue)")
    if resume:
        from runtimes.resume import resume_config

        cfg = resume_config(Path(out), config, overrides, named)
    else:
        cfg = resolve_config(config, overrides, **named)
    if skip_bad_images:
        cfg.data.skip_bad_images = True
    if force:
        cfg.output.force = True
    run_dir = Path(out) if out is not None else (cfg.output.dir or default_run_dir(cfg.policy.name))
    overrides_for_planner, plan_info = None, None
    if cfg.policy.target_flops is not None:
        from runtimes.planning import solve_target

        overrides_for_planner, plan_info = solve_target(cfg)
        console.print(f"[dim]target {cfg.policy.target_flops:.2f}x full FLOPs -> {plan_info['knobs']}[/dim]")
    with make_progress() as progress:
        summary = loop.train(cfg, run_dir, resume=resume, hooks=training_hooks(progress),
                             planner_overrides=overrides_for_planner, plan_info=plan_info)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        console.print(summary_table(summary, run_dir))
    return summary


@click.command("train")
@config_options
@click.option("--out", type=click.Path(path_type=Path), help="run directory (default runs/<time>-<policy>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--force", is_flag=True, help="write into an existing non-empty run directory")
@click.option("--skip-bad-images", is_flag=True, help="skip unreadable images instead of failing")
@click.option("--nproc", type=int, default=1, show_default=True, help="data-parallel processes (torchrun)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def train_command(ctx: click.Context, config, overrides, out, resume, force, skip_bad_images, nproc, as_json,
                  **named) -> None:
    """Fine-tune a ViT with a policy (alast, full, freeze, tokens, random, +lora)."""
    debug = ctx.obj.get("debug", False) if ctx.obj else False
    if nproc and nproc > 1:
        from runtimes.distributed import launch_torchrun

        raise SystemExit(launch_torchrun(nproc, ctx))
    run_guarded(lambda: run_train(config, overrides, out, resume, force, as_json, skip_bad_images, named), debug)
