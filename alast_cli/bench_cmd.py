"""`alast bench`: the paper's comparison in one command."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import run_guarded
from .options import config_options, resolve_config


def _bench(config, overrides, named, policies: str, seeds: int, out: Path | None, as_json: bool) -> None:
    import time

    from rich.table import Table

    from alast.bench import COLUMNS, BenchPlan, _fmt, run_bench

    from .render import console, make_progress, training_hooks

    target = named.pop("target_flops", None)
    cfg = resolve_config(config, overrides, **named)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if seeds < 1:
        raise click.BadParameter("--seeds must be >= 1")
    out = out or Path("bench") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"bench output {out} exists and is not empty; choose another --out")
    solve = None
    if target is not None:
        if not 0 < target <= 1:
            raise ValueError(f"--target-flops must lie in (0, 1], got {target}")
        from alast.planning.plan import solve_target as solve
    plan = BenchPlan(cfg, names, list(range(cfg.train.seed, cfg.train.seed + seeds)), out, target)
    progress = make_progress()

    def on_run(i: int, n: int, policy: str, seed: int):
        console.rule(f"[{i + 1}/{n}] {policy}, seed {seed}")
        return training_hooks(progress)

    with progress:
        table = run_bench(plan, on_run=on_run, solve_target=solve)
    if as_json:
        click.echo(json.dumps(table))
        return
    t = Table(title=f"alast bench -> {out}")
    for name, _, _ in COLUMNS:
        t.add_column(name, justify="left" if name == "policy" else "right")
    for policy, e in table["policies"].items():
        t.add_row(policy, *[_fmt(e.get(key), kind) for _, key, kind in COLUMNS[1:]])
    console.print(t)
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, plots: {out}/*.png")


@click.command("bench")
@config_options
@click.option("--policies", default="full,alast,freeze,random,tokens,lora,alast+lora", show_default=True,
              help="comma-separated policies; must include full")
@click.option("--seeds", type=int, default=1, show_default=True, help="seeds per policy")
@click.option("--out", type=click.Path(path_type=Path), help="output directory (default bench/<time>)")
@click.option("--json", "as_json", is_flag=True, help="print results.json to stdout")
@click.pass_context
def bench_command(ctx: click.Context, config, overrides, policies, seeds, out, as_json, **named) -> None:
    """Train several policies on the same data, seeds and steps; write a table and plots."""
    debug = ctx.obj.get("debug", False) if ctx.obj else False
    run_guarded(lambda: _bench(config, overrides, named, policies, seeds, out, as_json), debug)
