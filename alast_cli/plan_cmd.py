"""`alast profile` (per-block cost model) and `alast plan` (predicted FLOPs, memory and time)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .errors import run_guarded
from .options import PathOption, check_out_path, config_options, resolve_config

CALIBRATE_BATCH = 8  # profile --calibrate's batch unless --batch-size names one


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj.get("debug", False)) if ctx.obj else False


def _fmt_range(r: Any, fn) -> str:
    return f"[{fn(r[0])} .. {fn(r[1])}]" if r else ""


def _profile_table(cm) -> Any:
    from rich.table import Table

    from planners.costmodel import poly

    from .render import human, human_bytes

    n = cm.num_tokens
    t = Table(title=f"{cm.model} @ {cm.img_size}px: {n} tokens ({cm.num_prefix_tokens} prefix), per image, "
                    f"attention {cm.attention}")
    for col in ("part", "fwd MACs", "fwd FLOPs", "bwd FLOPs trained", "bwd FLOPs frozen", "params",
                "AdamW state", "saved/token"):
        t.add_column(col, justify="left" if col == "part" else "right")
    e = cm.embed
    t.add_row("patch embed", human(e.fwd_macs[0]), human(e.fwd_flops[0]), human(e.bwd_flops["weights_only"][0]), "0",
              f"{e.params:,}", human_bytes(2 * e.trainable_bytes), "-")
    for b in cm.blocks:
        act = b.saved_bytes("weights_and_input", n) / n
        t.add_row(f"block {b.index}", human(poly(b.fwd_macs, n)), human(b.forward_flops(n)),
                  human(b.backward_flops("weights_and_input", n)), human(b.backward_flops("input_only", n)),
                  f"{b.params:,}", human_bytes(2 * b.trainable_bytes), human_bytes(int(act)))
    h = cm.head
    t.add_row("head", human(poly(h.fwd_macs, n)), human(poly(h.fwd_flops, n)),
              human(poly(h.bwd_flops["weights_and_input"], n)), "-", f"{h.params:,}", human_bytes(2 * h.trainable_bytes),
              "-")
    return t


def run_profile(model: str, img_size: int | None, out: Path | None, as_json: bool, num_classes: int | None,
                calibrate: bool, batch_size: int | None, device: str, force: bool = False,
                threads: int | None = None, precision: str | None = None) -> None:
    from alast.planning.calibrate import calibrate_time
    from alast.planning.profile import profile
    from planners.simulate import full_step_flops

    from .render import human, results

    for option, value in (("--num-classes", num_classes), ("--batch-size", batch_size), ("--threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be 1 or more, got {value}")
    for option, value, what in (("--threads", threads, "the CPU threads"), ("--batch-size", batch_size, "the batch"),
                                ("--precision", precision, "the precision")):
        if value is not None and not calibrate:
            raise ValueError(f"{option} sets {what} --calibrate times steps with; add --calibrate or leave it out")
    if out is not None:
        from alast.training.rundir import check_out_file

        check_out_file(out, force, "profile", "cost.json")
        check_out_path(out)
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if calibrate and device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--calibrate times training steps on the --device, but no CUDA device is visible here; "
                         "calibrate on the GPU machine, or pass --device cpu")
    if precision is not None:
        from runtimes.torch_backend.precision import check_precision

        check_precision(torch.device(device), precision, "--precision")  # before the profile: it takes a while
    cm = profile(model, img_size=img_size, num_classes=num_classes, device=device)
    if calibrate:
        if threads is not None:  # as a run's backend.threads: a time model holds at its thread count only
            torch.set_num_threads(threads)
        cm = cm.with_time(calibrate_time(cm, model, batch_size=batch_size or CALIBRATE_BATCH, device=device,
                                         precision=precision or "fp32"))
    if out is not None:
        cm.save(out)
    if as_json:
        click.echo(json.dumps(cm.to_dict()))
        return
    results.print(_profile_table(cm))
    results.print(f"full fine-tuning step: {human(full_step_flops(cm), 'FLOP')} per image; fit error "
                  f"{cm.fit_max_rel_error:.1e}; units: macs = multiply-adds (fvcore), flops = 2 per multiply-add")
    if cm.time is not None:
        results.print(f"time model: {cm.time.note}")
    if out is not None:
        results.print(f"cost model written to {out}")


@click.command("profile")
@click.argument("model")
@click.option("--img-size", type=int, help="input size (default: the model's own)")
@click.option("--out", type=PathOption(), help="write the JSON cost model here")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the cost model as JSON")
@click.option("--num-classes", type=int, help="classifier classes (default: the model's own; the demo: 10)")
@click.option("--calibrate", is_flag=True, help="also time real training steps on this machine")
@click.option("--batch-size", type=int, help=f"batch size for --calibrate (default: {CALIBRATE_BATCH})")
@click.option("--threads", type=int, help="CPU threads for --calibrate, as the runs' backend.threads "
              "(default: torch's)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="device the model will train on (memory model, --calibrate)")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="precision for --calibrate, as the runs' backend.precision (default: fp32)")
@click.pass_context
def profile_command(ctx: click.Context, model, img_size, out, force, as_json, num_classes, calibrate, batch_size,
                    threads, device, precision) -> None:
    """Profile MODEL per block (fvcore + torch's FLOP counter) into a JSON cost model."""
    run_guarded(lambda: run_profile(model, img_size, out, as_json, num_classes, calibrate, batch_size, device,
                                    force, threads, precision), _debug(ctx))


def _deployment(result: dict[str, Any]) -> str:
    """How the run deploys its token schedule, per ``policy.eval_tokens``; with ``--trace`` of a finished
    run, what it deployed."""
    how = result.get("eval_tokens")
    said = ("the run measures it and every token on the validation data and deploys the more accurate "
            "(policy.eval_tokens=auto)" if how == "auto" else f"the run evaluates and exports on it "
            f"(policy.eval_tokens={how})")
    trace = result.get("trace") or {}
    if "deployed_kept_tokens" in trace:
        kept = trace["deployed_kept_tokens"]
        said += f"; this run deployed {f'its token schedule {list(kept)}' if kept else 'every token'}"
    return said


def _plan_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    from .render import human, human_bytes

    micro = result.get("micro_batch_size")
    passes = f" in passes of {micro}" if micro is not None and micro < result["batch_size"] else ""
    steps = f"{result['steps']} step{'' if result['steps'] == 1 else 's'}"
    t = Table(title=f"{result['model']}: {steps} at batch {result['batch_size']}{passes} "
                    f"({result['device']})")
    for col in ("policy", "train FLOPs", "vs full", "peak memory\n(all steps)", "vs full", "time", "vs full", "method"):
        t.add_column(col, justify="left" if col in ("policy", "method") else "right")
    ratio = lambda r: f"{r:.3f}x" if r is not None else "n/a"  # noqa: E731
    secs = lambda s: f"{s:.1f} s" if s is not None else "n/a"  # noqa: E731
    for name, p in result["policies"].items():
        r = p["ratio_to_full"]
        rng = p["train_flops_range"]
        t.add_row(name, human(p["train_flops"], "FLOP") + (f"\n{_fmt_range(rng, human)}" if rng else ""),
                  ratio(r["train_flops"]), human_bytes(int(p["peak_memory_bytes"])), ratio(r["peak_memory_bytes"]),
                  secs(p["time_s"]), ratio(r["time_s"]), p["method"])
    return t


def check_plot(plot: Path, force: bool) -> None:
    """Refuse a ``--plot`` that is a directory, one of a run's files, an existing file without
    ``--force``, a format matplotlib cannot write, or in a folder that cannot be written, judged on
    the file the plot goes to (``plan.plot_file``), before planning."""
    from matplotlib.backend_bases import FigureCanvasBase

    from alast.planning.plan import plot_file
    from alast.training.rundir import check_out_file

    target = plot if Path(plot).is_dir() else plot_file(plot)
    check_out_file(target, force, "plan", "plan.png", option="--plot")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if target.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {plot}: cannot write a {target.suffix} figure; end the name in one of "
                         f"{', '.join('.' + f for f in formats)} (.png when it has no suffix)")
    check_out_path(target, "--plot")


def check_plan_options(config, overrides, named, trace: Path | None, calibrate: bool,
                       throughput: float | None) -> None:
    """Refuse options that would be ignored: config input beside ``--trace`` (the replay reads the
    run's own config.yaml), and ``--calibrate`` beside ``--throughput`` (either sets the time model); and a
    ``--throughput`` that is not a finite rate above 0, before anything is profiled."""
    if calibrate and throughput is not None:
        raise ValueError("--throughput and --calibrate both set the time model (from a FLOP rate, or from "
                         "timing real steps); drop one of them")
    if throughput is not None:  # refused before the model is profiled (seconds), not after
        from planners.costmodel import TimeModel

        TimeModel.from_throughput(throughput)
    if trace is None:
        return
    given = [f"CONFIG ({config})"] if config is not None else []
    given += ["--set"] if overrides else []
    given += ["--no-pretrained" if key == "pretrained" and value is False else f"--{key.replace('_', '-')}"
              for key, value in named.items() if value is not None]
    if given:
        raise ValueError(f"--trace replays RUN's own config; drop {', '.join(given)}")


def run_plan(config, overrides, named, as_json: bool, plot: Path | None, trace: Path | None, calibrate: bool,
             throughput: float | None, cost_model: Path | None, force: bool = False) -> dict[str, Any]:
    from alast.planning.plan import plan, plot_plan, replay_run

    from .render import human, human_bytes, knobs_text, results

    check_plan_options(config, overrides, named, trace, calibrate, throughput)
    if plot is not None:
        check_plot(plot, force)
    if trace is not None:
        result = replay_run(trace, cost_model_path=cost_model, calibrate=calibrate, throughput=throughput)
    else:
        from .render import console

        cfg = resolve_config(config, overrides, **named)
        # every step is simulated (three times for alast), which takes minutes for a million steps
        with console.status("planning: simulating every step of the run ..."):
            result = plan(cfg, cost_model_path=cost_model, calibrate=calibrate, throughput=throughput)
    if plot is not None:
        plot = plot_plan(result, plot)
    if as_json:
        click.echo(json.dumps(result))
        return result
    results.print(_plan_table(result))
    results.print(f"time: {result['time_method']}; cost model: {result['cost_model']['source']}", style="dim")
    if result.get("target"):
        tg = result["target"]
        results.print(f"target {tg['target']:g}x full FLOPs -> {knobs_text(tg['knobs'], tg.get('policy', ''))} (predicted {tg['predicted_ratio']:.3f}x, "
                      f"envelope {tg['ratio_range'][0]:.3f}x .. {tg['ratio_range'][1]:.3f}x)")
    if result.get("frozen_cache"):
        c = result["frozen_cache"]
        blocks = "block 0" if c["blocks"] == 1 else f"blocks 0-{c['blocks'] - 1}"
        if c.get("left_off"):
            results.print(f"{c['policy']}: on a GPU the frozen blocks' cache stays off (backend.frozen_cache=auto); "
                          f"with backend.frozen_cache=on {c['planned_share']:.0%} of the steps' images would start "
                          f"above the embeddings and {blocks}, for {human_bytes(c['bytes'])} of GPU memory")
        else:
            results.print(f"{c['policy']}: the embeddings and {blocks} are cached (backend.frozen_cache): "
                          f"{c['planned_share']:.0%} of the steps' images start above them"
                          + (f"; it takes {human_bytes(c['bytes'])} of GPU memory, in the peak"
                             if c.get("device") == "cuda" else ""))
    if result.get("early_phase"):
        e = result["early_phase"]
        results.print(f"{e['policy']}: early phase: the first {e['frac']:.0%} of steps train the top {e['trained']} of "
                      f"{e['num_blocks']} blocks, one more than the others")
    if result.get("dense_final"):
        d = result["dense_final"]
        trains = (f"train the top {d['top_blocks']} of {d['num_blocks']} blocks with the embeddings frozen"
                  if d["top_blocks"] else "train the blocks drawn as in the other steps")
        period = int(d.get("interleave") or 0)
        every = {0: "", 2: "every other step of "}.get(period, f"{period - 1} steps in {period} of ")
        between = {0: "", 2: "; the steps between are"}.get(period, "; the others are")
        results.print(f"{d['policy']}: dense final phase: {every}the last {d['frac']:.0%} of steps keep every token "
                      f"and {trains}" + (f"{between} sparse steps at a dense step's cost" if period else ""))
    for name, p in result["policies"].items():
        if p.get("inference_flops_ratio"):
            results.print(f"{name}: token schedule {list(p['eval_kept_tokens'])} (the final 10% of steps), inference "
                          f"{p['inference_flops_ratio']:.3f}x the FLOPs of every token; {_deployment(result)}")
    if result.get("trace"):
        tr = result["trace"]
        err = tr["train_flops_rel_error"]
        results.print(f"trace {tr['run_dir']}: predicted {human(tr['predicted_train_flops'], 'FLOP')}, counted "
                      f"{human(tr['counted_train_flops'], 'FLOP')}" + (f" ({err:+.2%})" if err is not None else ""))
        if tr.get("measured_peak_memory_bytes") is not None:  # the table's peak is over all steps
            sampled = tr.get("predicted_peak_memory_sampled_steps_bytes")
            which = "the steps the run measured" if sampled is not None else "all steps"
            predicted = sampled if sampled is not None else tr["predicted_peak_memory_bytes"]
            results.print(f"peak memory over {which}: predicted {human_bytes(int(predicted))}, measured "
                          f"{human_bytes(int(tr['measured_peak_memory_bytes']))} (the table's: over all steps)")
        if tr.get("counted_inference_flops_ratio") and tr.get("predicted_inference_flops_ratio"):
            results.print(f"inference on the token schedule: predicted {tr['predicted_inference_flops_ratio']:.3f}x, "
                          f"counted {tr['counted_inference_flops_ratio']:.3f}x")
    if plot is not None:
        results.print(f"plot written to {plot}")
    return result


@click.command("plan")
@config_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (per policy: FLOPs, memory, time, ratios)")
@click.option("--plot", type=PathOption(),
              help="write a figure: per-block costs and token profile (PNG unless the name has another suffix)")
@click.option("--force", is_flag=True, help="overwrite --plot if it exists (never one of a run's own files)")
@click.option("--trace", type=PathOption(),
              help="replay a run directory's logged budgets, with its own config (no CONFIG, --set or other "
                   "config options)")
@click.option("--calibrate", is_flag=True, help="time a few real training steps on this machine for the time model")
@click.option("--throughput", type=float, help="time from this throughput (FLOP/s) instead of a calibration")
@click.option("--cost-model", type=PathOption(), help="cost model JSON from `alast profile`")
@click.pass_context
def plan_command(ctx: click.Context, config, overrides, as_json, plot, force, trace, calibrate, throughput,
                 cost_model, **named) -> None:
    """Predict training FLOPs, peak memory and time (time with --calibrate or --throughput) of a policy against
    full fine-tuning."""
    run_guarded(lambda: run_plan(config, overrides, named, as_json, plot, trace, calibrate, throughput, cost_model,
                                 force), _debug(ctx))
