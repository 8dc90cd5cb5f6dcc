"""`alast bench`: the paper's comparison in one command, at the same steps, at equal counted FLOPs
(``--matched``: full fine-tuning matched to each alast run, LoRA to each alast+lora run) and as
accuracy-versus-FLOPs curves over several targets (``--targets``)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_INTERRUPTED, run_guarded
from .options import PathOption, check_out_path, config_options, resolve_config

TUNE_FRACTION = 0.2  # --tune-fraction's default
# --set keys each run sets for itself: bench would ignore them, so it refuses them, naming its own option
RUN_SET_KEYS = {"policy.name": "--policies", "policy.target_flops": "--target-flops or --targets",
                "output.dir": "--out", "output.force": "a new --out (a bench never replaces runs)"}


def _numbers(text: str, option: str, example: str) -> list[float]:
    """The comma-separated numbers of ``text``, refused in one line naming ``option`` where one is not a
    number (``example``: what to give) or two print alike (run folders and records name them by ``:g``)."""
    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{option}: {part!r} is not a number; {example}") from None
        if f"{v:g}" in {f"{x:g}" for x in values}:
            raise ValueError(f"{option} lists {v:g} twice")
        values.append(v)
    return values


def parse_targets(text: str) -> tuple[float, ...]:
    """``"0.3,0.5"`` -> (0.3, 0.5); each a fraction of full fine-tuning's FLOPs in (0, 1], no repeats."""
    targets = _numbers(text, "--targets", "give fractions of full fine-tuning, e.g. --targets 0.3,0.5,0.7")
    for t in targets:
        if not 0 < t <= 1:
            raise ValueError(f"--targets: {t:g} is not in (0, 1]; each target is a fraction of full fine-tuning FLOPs")
    return tuple(targets)


def parse_lrs(text: str) -> tuple[float, ...]:
    """``"1e-3,5e-4"`` -> (0.001, 0.0005); two or more different rates above 0."""
    lrs = _numbers(text, "--lrs", "give learning rates, e.g. --lrs 1e-3,5e-4")
    for lr in lrs:
        if not 0 < lr < float("inf"):
            raise ValueError(f"--lrs: {lr:g} is not a learning rate above 0")
    if len(lrs) < 2:
        raise ValueError("--lrs needs two or more learning rates to choose from, e.g. --lrs 1e-3,5e-4 (for one "
                         "rate, set it with --lr)")
    return tuple(lrs)


def check_bench_options(named: dict[str, Any], overrides: tuple[str, ...]) -> None:
    """Refuse what ``alast train`` takes but bench would ignore: ``--policy`` and ``--set`` of a key
    each run sets for itself."""
    if named.get("policy") is not None:
        raise ValueError(f"bench runs each policy of --policies, so --policy {named['policy']} would be "
                         f"ignored; list it in --policies instead (e.g. --policies full,{named['policy']})")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RUN_SET_KEYS:
            raise ValueError(f"bench sets {key} for each run, so --set {item} would be ignored; "
                             f"use {RUN_SET_KEYS[key]}")


def config_target(cfg, target: float | None, targets: str | None) -> float | None:
    """The FLOPs target of every run: ``--target-flops``, else the config file's ``policy.target_flops``
    (a config written for ``alast train``), unless ``--targets`` draws curves instead."""
    if target is not None or cfg.policy.target_flops is None:
        return target
    if targets is not None:
        raise ValueError(f"the config sets policy.target_flops: {cfg.policy.target_flops:g}, and --targets draws "
                         "curves over several; remove it from the config, or use --target-flops instead of --targets")
    return cfg.policy.target_flops


def check_out(out: Path, resume: bool) -> None:
    """Refuse an --out that is a file, a non-empty one without --resume (saying so when it holds a
    bench), or one that cannot be created or written; what --resume needs, run_bench checks
    (:func:`alast.bench.check_resume`)."""
    from alast.bench import MANIFEST

    if out.exists() and not out.is_dir():
        raise ValueError(f"bench output {out} is a file; choose a folder for --out")
    if not resume and out.exists() and any(out.iterdir()):
        again = ("it holds a bench: add --resume (with the same arguments) to finish it, or choose another --out"
                 if (out / MANIFEST).is_file() else "choose another --out")
        raise ValueError(f"bench output {out} exists and is not empty; {again}")
    check_out_path(out, folder=True)


def _bench(config, overrides, named, policies: str, seeds: int, out: Path | None, as_json: bool,
           targets: str | None, matched: bool | None, cost_model: Path | None = None, resume: bool = False,
           named_policies: bool = True, lrs: str | None = None, tune_fraction: float | None = None) -> None:
    import time

    from alast.bench import BenchPlan, run_bench
    from alast.bench_runs import MATCHED_ROWS
    from alast.training.rundir import Interrupted

    from .render import console, make_progress, training_hooks

    check_bench_options(named, overrides)
    if resume and out is None:
        raise ValueError("--resume needs --out DIR (the bench to finish)")
    target = named.pop("target_flops", None)
    cfg = resolve_config(config, overrides, single_run=False, **named)
    if cfg.backend.frozen_cache == "on":
        raise ValueError("backend.frozen_cache=on would stop the bench at its first run the frozen blocks' cache cannot "
                         "apply to (full fine-tuning trains every block); leave it at auto, which caches in each run "
                         "where it applies, or set it off")
    if cfg.data.tune_fraction is not None:
        raise ValueError(f"data.tune_fraction={cfg.data.tune_fraction:g} would score every run of the bench on "
                         "images held out of training, not on the validation split; unset it (to choose learning "
                         "rates on held-out training images, use --lrs and --tune-fraction)")
    target = config_target(cfg, target, targets)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    left_out = {}  # of the default list, what the backend cannot run at all
    if not named_policies and cfg.backend.name == "ort":
        left_out = {p: "the ort backend does not support LoRA" for p in names if p == "lora" or p.endswith("+lora")}
        names = [p for p in names if p not in left_out]
    if seeds < 1:
        raise ValueError(f"--seeds must be 1 or more, got {seeds}")
    named_out = out is not None
    out = out or Path("bench") / time.strftime("%Y%m%d-%H%M%S")
    check_out(out, resume)
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"--target-flops must lie in (0, 1], got {target}")
    curve_targets = parse_targets(targets) if targets is not None else None
    rates = parse_lrs(lrs) if lrs is not None else None
    if rates is not None and (named.get("lr") is not None
                              or any(item.partition("=")[0].strip() == "train.lr" for item in overrides)):
        raise ValueError("--lrs chooses each row's learning rate, so --lr (train.lr) would be ignored; give the "
                         "rates to choose from in --lrs, or drop --lrs for one rate")
    if rates is None and tune_fraction is not None:
        raise ValueError("--tune-fraction holds training images out to choose --lrs on; add --lrs, or leave it out")
    if cost_model is not None:
        if target is None and curve_targets is None:
            raise ValueError("--cost-model is read to plan FLOPs targets only; add --target-flops or --targets, "
                             "or leave it out")
        from alast.planning.plan import load_cost_model_for

        load_cost_model_for(cfg, cost_model)
    if matched is None:  # default: on under one FLOPs target, where the compute-matched rows answer it
        matched = target is not None and any(p in MATCHED_ROWS for p in names)
    # the default list: a baseline that cannot reach the target is left out, not the bench refused
    optional = frozenset() if named_policies else frozenset(names) - {"full", "alast"}
    plan = BenchPlan(cfg, names, list(range(cfg.train.seed, cfg.train.seed + seeds)), out, target,
                     matched=matched, targets=curve_targets,
                     cost_model=None if cost_model is None else str(cost_model.absolute()), resume=resume,
                     optional=optional, left_out=left_out, lrs=rates,
                     tune_fraction=TUNE_FRACTION if tune_fraction is None else tune_fraction)
    from alast.planning.plan import solve_target

    progress = make_progress()

    def on_run(i: int, n: int, policy: str, seed: int):
        console.rule(f"[{i + 1}/{n}] {policy}, seed {seed}")
        return training_hooks(progress)

    def on_reused(i: int, n: int, policy: str, seed: int) -> None:
        console.print(f"[{i + 1}/{n}] {policy}, seed {seed}: finished before, read back")

    again = "; finish the bench with the same arguments and --resume" + ("" if named_out else f" --out {out}")
    try:
        with progress:
            result = run_bench(plan, on_run=on_run, on_reused=on_reused,
                               solve_target=functools.partial(solve_target, cost_model_path=cost_model),
                               on_left_out=lambda policy, why: click.echo(
                                   f"note: {policy} left out of the default policies: {why}", err=True))
    except Interrupted as exc:
        click.echo(f"interrupted at step {exc.step}; checkpoint saved to {exc.path}{again}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo(f"interrupted{again}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result))
    elif curve_targets is not None:
        _render_curves(result, out)
    else:
        _render_table(result, out)


TERMINAL_COLUMNS = {  # results key -> short header
    "steps": "steps", "val_accuracy": "acc %", "val_accuracy_std": "± std", "train_flops_ratio": "FLOPs",
    "inference_flops_ratio": "infer", "peak_memory_bytes": "MiB", "peak_memory_bytes_ratio": "mem",
    "speedup_vs_full": "speed", "train_time_s_ratio": "train",
}


def _render_table(table: dict[str, Any], out: Path) -> None:
    from rich import box
    from rich.table import Table

    from alast.bench_runs import COLUMNS, _fmt

    from .render import results

    # the terminal gets the columns that fit 80 characters; results.md has them all
    columns = [c for c in COLUMNS[1:] if c[1] in TERMINAL_COLUMNS]
    t = Table(title=f"alast bench -> {out}", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
              caption="ratios to full: FLOPs, infer(ence), mem, speed (step), train (time in steps)")
    t.add_column("policy", no_wrap=True, min_width=max(len(p) for p in table["policies"]))
    for _, key, _ in columns:
        t.add_column(TERMINAL_COLUMNS[key], justify="right")
    for policy, e in table["policies"].items():
        t.add_row(policy, *[_fmt(e.get(key), kind) for _, key, kind in columns])
    results.print(t)
    for key in ("same_steps", "matched", "lora_matched"):
        if table.get(key):
            results.print(table[key]["line"])
    for policy, why in table.get("left_out", {}).items():
        results.print(f"left out of the default policies, {policy}: {why}")
    _render_lrs(table.get("learning_rates"))
    results.print(f"results: {out / 'results.json'}, {out / 'results.md'} (every column), plots: {out}/*.png")


def _render_curves(result: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    from .render import results

    t = Table(title=f"alast bench --targets -> {out}  (FLOPs/full: {result['x']})")
    for name in ("target", "policy", "seeds", "steps", "FLOPs/full", "acc %", "± std"):
        t.add_column(name, justify="left" if name == "policy" else "right")
    for p in result["points"]:
        flag = " *" if p.get("off_target") is not None else ""
        t.add_row("-" if p["target"] is None else f"{p['target']:g}", p["policy"], str(len(p["seeds"])),
                  f"{p['steps']:g}", f"{p['flops_ratio']:.3f}{flag}" if p["flops_ratio"] is not None else "n/a",
                  f"{100 * p['val_accuracy']:.2f}", f"{100 * (p['val_accuracy_std'] or 0):.2f}")
    results.print(t)
    if any(p.get("off_target") is not None for p in result["points"]):
        results.print("* more than 3% off its target: not at the target's cost")
    for s in {(r["policy"], r["target"]): r for r in result["skipped"]}.values():
        results.print(f"skipped {s['policy']} at {s['target']:g}: {s['skipped']}")
    for v in result["verdicts"]:
        results.print(v["line"])
    _render_lrs(result.get("learning_rates"))
    results.print(f"results: {out / 'curves.json'}, {out / 'results.md'}, plot: {out / 'accuracy_vs_flops.png'}")


@click.command("bench")
@config_options
@click.option("--policies", default="full,alast,freeze,random,tokens,lora,alast+lora", show_default=True,
              help="comma-separated policies; must include full (of the default list, a policy the backend "
                   "cannot run or that cannot reach --target-flops is left out and named; one named here stops "
                   "the bench)")
@click.option("--seeds", type=int, default=1, show_default=True, help="seeds per policy")
@click.option("--targets", help="FLOPs targets for accuracy-versus-FLOPs curves, e.g. 0.3,0.5,0.7 (instead of "
              "--target-flops): each policy at each target, full fine-tuning by steps (round(steps x target))")
@click.option("--matched/--no-matched", default=None,
              help="after each alast run, full fine-tuning for the steps that cost the same counted FLOPs "
                   "(row full@matched), and after each alast+lora run, LoRA on every block and token for the "
                   "steps that cost the same (row lora@matched); default: on with --target-flops, off otherwise")
@click.option("--out", type=PathOption(), help="output directory (default bench/<time>)")
@click.option("--resume", is_flag=True, help="finish the interrupted bench in --out (same arguments): finished "
              "runs are read back, an interrupted one continues from its checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print results.json to stdout")
@click.option("--cost-model", type=PathOption(),
              help="cost model JSON from `alast profile` to plan the FLOPs targets with (default: profile now)")
@click.option("--lrs", help="learning rates each row chooses from, e.g. 1e-3,5e-4: one run per rate (first seed) "
              "trains on the training images less --tune-fraction of them and is scored on those; the row's runs "
              "then use its most accurate rate (the validation images play no part in the choice)")
@click.option("--tune-fraction", type=float, default=TUNE_FRACTION, show_default=True,
              help="with --lrs: the share of the training images held out to choose the rates on")
@click.pass_context
def bench_command(ctx: click.Context, config, overrides, policies, seeds, targets, matched, out, resume, as_json,
                  cost_model, lrs, tune_fraction, **named) -> None:
    """Train several policies on the same data, seeds and steps; write a table and plots.

    With --targets, run each policy at each FLOPs target and write curves.json and
    accuracy_vs_flops.png (accuracy against counted FLOPs, full fine-tuning by steps as reference)."""
    debug = ctx.obj.get("debug", False) if ctx.obj else False
    named_policies = ctx.get_parameter_source("policies") is not click.core.ParameterSource.DEFAULT
    if ctx.get_parameter_source("tune_fraction") is click.core.ParameterSource.DEFAULT:
        tune_fraction = None
    run_guarded(lambda: _bench(config, overrides, named, policies, seeds, out, as_json, targets, matched,
                               cost_model, resume, named_policies, lrs, tune_fraction), debug)


def _render_lrs(learning_rates: dict[str, Any] | None) -> None:
    """The rows' chosen learning rates (``--lrs``), one line each."""
    from alast.bench_runs import lr_lines

    from .render import results

    if learning_rates is None:
        return
    results.print(f"learning rates chosen on {100 * learning_rates['tune_fraction']:g}% of the training images held "
                  f"out (seed {learning_rates['seed']}):")
    for line in lr_lines(learning_rates["rows"]):
        results.print(f"  {line}", markup=False)
