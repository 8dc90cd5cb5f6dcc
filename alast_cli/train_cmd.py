"""`alast train`: fine-tune with a policy and backend, write a run directory."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, RankKilled, Stopped, describe, peer_lost, run_guarded
from .options import PathOption, config_options, resolve_config, set_keys

RANK_ERRORS = "ALAST_RANK_ERRORS"  # set by --nproc: the folder where each failed rank leaves its message


def default_run_dir(policy: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{policy.replace('+', '-')}"


def _resolve(config: Path | None, overrides: tuple[str, ...], out: Path | None, resume: bool, force: bool,
             named: dict[str, Any], skip_bad_images: bool = False):
    if resume and out is None:
        raise click.UsageError("--resume needs --out RUN_DIR (the run to continue)")
    if resume and force:
        raise ValueError("--resume continues the run in --out and --force replaces it; pass one of them")
    if resume:
        from alast.training.resume import resume_config

        cfg = resume_config(Path(out), config, overrides, named)
    else:
        cfg = resolve_config(config, overrides, **named)
    _refuse_flag_and_set(cfg, overrides, out, force, skip_bad_images)
    return cfg


def _refuse_flag_and_set(cfg, overrides: tuple[str, ...], out: Path | None, force: bool, skip_bad_images: bool) -> None:
    """Refuse ``--out``, ``--force`` or ``--skip-bad-images`` beside a ``--set`` of its key to another
    value: the flag would win without a word. (Agreeing values pass: ``--nproc`` hands its ranks the
    ``--out`` it chose.)"""
    keys = set_keys(overrides)
    differ = (("--out", "output.dir", out is not None and "output.dir" in keys
               and (cfg.output.dir is None or Path(cfg.output.dir).resolve() != Path(out).resolve())),
              ("--force", "output.force", force and not cfg.output.force),
              ("--skip-bad-images", "data.skip_bad_images", skip_bad_images and not cfg.data.skip_bad_images))
    for flag, key, conflict in differ:
        if conflict and key in keys:
            from alast.config import ConfigError

            raise ConfigError(f"{flag} and --set {key} give it two values; pass one of them")


def check_cost_model(cfg, cost_model: Path | None) -> None:
    """``--cost-model`` is read for a FLOPs target only, and must be a cost model of this model."""
    if cost_model is None:
        return
    if cfg.policy.target_flops is None:
        raise ValueError("--cost-model is read to plan a FLOPs target only; add --target-flops or leave it out")
    from alast.planning.plan import load_cost_model_for

    load_cost_model_for(cfg, cost_model)


@dataclasses.dataclass
class _Reached:
    """How far this session of the run got (from the loop's hooks), for the line a stop prints."""

    total: int | None = None  # the run's steps, once training starts
    done: int = 0

    def watch(self, hooks):
        started, stepped = hooks.on_start, hooks.on_step

        def on_start(start: int, total: int, info: dict[str, Any]) -> None:
            self.total, self.done = total, start
            started(start, total, info)

        def on_step(step: int, result, record: dict[str, Any]) -> None:
            self.done = step + 1
            stepped(step, result, record)

        return dataclasses.replace(hooks, on_start=on_start, on_step=on_step)

    @property
    def when(self) -> str:
        if self.total is None:
            return "before training started"
        return "during the final evaluation" if self.done >= self.total else ""


def run_train(config: Path | None, overrides: tuple[str, ...], out: Path | None, resume: bool, force: bool,
              as_json: bool, skip_bad_images: bool, named: dict[str, Any],
              cost_model: Path | None = None) -> dict[str, Any]:
    from alast.training.process import Comm, on_main, stop_signalled
    from alast.training.rundir import check_run_dir
    from runtimes.distributed import init_from_env

    from .launch import newest_checkpoint
    from .render import results, summary_table

    since = time.time()  # a checkpoint written after this is this run's (newest_checkpoint)
    cfg = _resolve(config, overrides, out, resume, force, named, skip_bad_images)
    check_cost_model(cfg, cost_model)
    if skip_bad_images:
        cfg.data.skip_bad_images = True
    if force:
        cfg.output.force = True
    # Under torchrun (WORLD_SIZE > 1) join the process group; rank 0 alone prints and writes.
    dist_comm = init_from_env(cfg.backend.device)
    comm = Comm(dist_comm.rank, dist_comm.world_size, dist_comm) if dist_comm else Comm()
    finished, reached = False, _Reached()
    run_dir = Path(out) if out is not None else (cfg.output.dir or default_run_dir(cfg.policy.name))
    try:
        run_dir = Path(comm.broadcast_object(str(run_dir)))
        if config is not None and not resume:  # --force must not delete the config being read
            on_main(comm, lambda: check_run_dir(run_dir, resume, cfg.output.force, config))
        summary = _train(cfg, run_dir, resume, comm, cost_model, reached)
        finished = True
    except (KeyboardInterrupt, RuntimeError) as exc:  # a stop outside the loop's step boundaries
        if isinstance(exc, RuntimeError) and not (stop_signalled() and peer_lost(exc)):
            raise  # (with a signal, a peer that stopped first is why a collective failed)
        raise Stopped(newest_checkpoint(run_dir, resume, since), comm.world_size, reached.when) from None
    finally:
        if dist_comm is not None:
            dist_comm.close(barrier=finished)  # no barrier after an error: a peer may never reach it
    if comm.is_main:
        if as_json:
            click.echo(json.dumps(summary))
        else:
            results.print(summary_table(summary, run_dir))
        _warn_target_miss(summary, cfg.policy.target_flops, run_dir, cost_model)
        _warn_data_bound(summary, cfg)
    return summary


DATA_BOUND_SHARE = 0.2  # the share of the training loop spent waiting for batches that warrants a warning


def _warn_data_bound(summary: dict[str, Any], cfg: Any) -> None:
    """One warning line where the loop waited for its batches a fifth of its time or more (and at
    least 2 s): the images, not the steps, set the pace, so fewer FLOPs cannot shorten the run."""
    waited, steps = summary.get("data_wait_s") or 0.0, summary.get("train_time_s") or 0.0
    if waited < 2.0 or waited < DATA_BOUND_SHARE * (waited + steps):
        return
    fixes = [f"raise data.num_workers ({summary.get('data_workers')} now, {os.cpu_count()} CPU cores here)"]
    if cfg.data.cache is False:
        fixes.append("set data.cache=auto to keep the decoded images in memory")
    click.echo(f"warning: the steps waited {waited:.1f} s for their images, {waited / (waited + steps):.0%} of the "
               f"training loop, so reading the data sets the pace, not the model; {' or '.join(fixes)}", err=True)


def _warn_target_miss(summary: dict[str, Any], target: float | None, run_dir: Path, cost_model: Path | None) -> None:
    """One warning line where the counted FLOPs missed the target by more than 3%."""
    from alast.training.summary import target_miss

    miss = target_miss(summary, target)
    if miss is None:
        return
    ratio = summary["flops_ratio_vs_full"]
    said = f"warning: the run counted {ratio:.3f}x full fine-tuning's FLOPs, {miss:+.1%} off --target-flops {target:g}"
    predicted = (summary.get("plan") or {}).get("predicted_ratio")
    if predicted and abs(ratio / predicted - 1) < 0.01:  # the plan said so: its knobs cannot divide finer
        click.echo(f"{said}, as its plan predicted ({predicted:.3f}x): too few tokens or steps to divide the "
                   "target finer; use more steps or a larger input", err=True)
        return
    fix = (f"re-profile {cost_model} (`alast profile MODEL --img-size N --out {cost_model}`) or drop --cost-model"
           if cost_model else f"`alast plan --trace {run_dir}` compares the plan with the run step by step")
    click.echo(f"{said}: the cost model it was planned on does not price its steps as they ran; {fix}", err=True)


def _train(cfg, run_dir: Path, resume: bool, comm, cost_model: Path | None = None,
           reached: _Reached | None = None) -> dict[str, Any]:
    from alast.training import loop
    from alast.training.rundir import finished_summary

    from .render import console, knobs_text, make_progress, training_hooks

    done = finished_summary(run_dir) if resume else None
    if done is not None:  # nothing to redo: its results stay as they are
        if comm.is_main:
            console.print(f"{run_dir} finished its {done['steps']} steps already; nothing to resume. Its results "
                          f"are below and in {run_dir / 'summary.json'}; `alast eval {run_dir}` evaluates it again")
        return done
    solve = None
    if cfg.policy.target_flops is not None:
        def solve(steps: int) -> tuple[dict[str, Any], dict[str, Any]]:  # run by the loop once the data is loaded
            from alast.planning.plan import solve_target

            overrides, info = solve_target(cfg, cost_model, comm.world_size, steps)
            if comm.is_main:
                console.print(f"target {cfg.policy.target_flops:.2f}x full FLOPs -> {knobs_text(info['knobs'], info['policy'])}",
                              style="dim")
            return overrides, info
    kwargs = dict(resume=resume, comm=comm, solve=solve)
    reached = reached or _Reached()
    if not comm.is_main:
        return loop.train(cfg, run_dir, hooks=reached.watch(loop.Hooks()), **kwargs)
    with make_progress() as progress:
        return loop.train(cfg, run_dir, hooks=reached.watch(training_hooks(progress)), **kwargs)


def launch(ctx: click.Context, nproc: int, config: Path | None, overrides: tuple[str, ...], out: Path | None,
           resume: bool, force: bool, named: dict[str, Any], cost_model: Path | None = None) -> None:
    """Check the input once here (one clean error instead of one per rank), then rerun on N ranks
    and say once how they ended."""
    from alast.data import check_batch_size
    from alast.training.rundir import check_run_dir

    from .launch import LAUNCHER_PID, RanksFailed, check_nproc, launch_torchrun, newest_checkpoint

    since = time.time()
    cfg = _resolve(config, overrides, out, resume, force, named, bool(ctx.params.get("skip_bad_images")))
    check_nproc(nproc, cfg.backend.device)
    check_cost_model(cfg, cost_model)
    check_batch_size(None, cfg.train.batch_size, nproc)  # before torchrun starts (the data: on each rank)
    if out is None:  # every rank must write to the same directory
        ctx.params["out"] = out = cfg.output.dir or default_run_dir(cfg.policy.name)
    check_run_dir(Path(out), resume, force or cfg.output.force, config)
    with tempfile.TemporaryDirectory(prefix="alast-ranks-") as folder:
        os.environ.update({RANK_ERRORS: folder, LAUNCHER_PID: str(os.getpid())})  # the workers inherit them

        def resume_from() -> Path | None:
            return newest_checkpoint(Path(out), resume, since)

        try:
            code = launch_torchrun(nproc, ctx)  # not 0: stopped by a signal to this process
            if code:
                _echo_other_ranks(Path(folder), describe(Stopped(resume_from(), nproc))[1])
        except RanksFailed as exc:
            code = _ranks_ended(Path(folder), exc.codes, nproc, resume_from)
        finally:
            for name in (RANK_ERRORS, LAUNCHER_PID):
                os.environ.pop(name, None)
    if code:
        sys.exit(code)


def _ranks_ended(folder: Path, codes: dict[int, int], nproc: int, resume_from: Callable[[], Path | None]) -> int:
    """Say why the ranks ended (``codes``: see :class:`~.launch.RanksFailed`) and return the exit
    code. A rank's own failure is the cause where there is one (a rank that left none in ``folder``
    said its own); else a rank killed by a signal (:class:`RankKilled`: the others only lost their
    peer, or got torchrun's SIGTERM); else a stop (130); else what the ranks said."""
    left = _left(folder)
    own = [rank for rank in sorted(codes) if codes[rank] > 0 and not left.get(rank, {}).get("consequence")]
    if own:
        _echo_other_ranks(folder)
        return codes[own[0]]
    killed = sorted((rank for rank in codes if codes[rank] < 0), key=lambda r: (codes[r] == -signal.SIGTERM, r))
    if killed:
        raise RankKilled(killed[0], -codes[killed[0]], nproc, resume_from())
    if EXIT_INTERRUPTED in codes.values():
        _echo_other_ranks(folder, describe(Stopped(resume_from(), nproc))[1])
        return EXIT_INTERRUPTED
    _echo_other_ranks(folder)
    return codes[min(codes)]


def _echo_other_ranks(folder: Path, stopped: str | None = None) -> None:
    """Print what the ranks left in ``folder`` that no one has printed. After a stop (``stopped``:
    the launcher's own line for it), rank 0's line on where it stopped, or else ``stopped``; the
    other ranks' add nothing. Otherwise each rank's own failure (not a lost peer, not the SIGTERM
    torchrun sends once a rank ends) that rank 0 did not print, once (port numbers aside), with
    what that rank printed before it; where no rank failed on its own, what they said."""
    left = _left(folder)
    if stopped is not None:
        zero = left.get(0, {})
        if not zero.get("printed"):
            sys.stderr.write(zero["message"] if zero.get("code") == EXIT_INTERRUPTED else stopped + "\n")
        return
    said = {_sans_ports(left[0]["message"])} if left.get(0, {}).get("printed") else set()
    own = [rank for rank in sorted(left) if not left[rank].get("consequence")]
    for rank in own or sorted(left):
        if _sans_ports(left[rank]["message"]) not in said:
            said.add(_sans_ports(left[rank]["message"]))
            sys.stderr.write(left[rank]["output"] + left[rank]["message"])


def _left(folder: Path) -> dict[int, dict[str, Any]]:
    """Rank -> what it left in ``folder`` (:func:`_run_worker`)."""
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


def _sans_ports(message: str) -> str:
    """``message`` without the port numbers in it: gloo's errors name each rank's own port."""
    return re.sub(r"(\]|\b\d{1,3}(?:\.\d{1,3}){3}|localhost):\d+", r"\1:<port>", message)


@click.command("train")
@config_options
@click.option("--out", type=PathOption(), help="run directory (default runs/<time>-<policy>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--force", is_flag=True, help="replace the run in an existing --out: removes the files alast wrote "
              "there (checkpoints, metrics, results) and keeps any others")
@click.option("--skip-bad-images", is_flag=True, help="skip unreadable images instead of failing")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="data-parallel processes (runs torchrun)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--cost-model", type=PathOption(),
              help="cost model JSON from `alast profile` to plan --target-flops with (default: profile now)")
@click.pass_context
def train_command(ctx: click.Context, config, overrides, out, resume, force, skip_bad_images, nproc, as_json,
                  cost_model, **named) -> None:
    """Fine-tune a ViT with a policy (alast, full, freeze, tokens, random, +lora)."""
    debug = ctx.obj.get("debug", False) if ctx.obj else False
    if nproc > 1:
        run_guarded(_stops_at_once(lambda: launch(ctx, nproc, config, overrides, out, resume, force, named,
                                                  cost_model)), debug)
        return
    work = lambda: run_train(config, overrides, out, resume, force, as_json, skip_bad_images, named,  # noqa: E731
                             cost_model)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _run_worker(work, int(os.environ.get("RANK", "0") or 0), debug)
    else:
        run_guarded(_stops_at_once(work), debug)


def _stops_at_once(work: Callable[[], Any], signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
                   ) -> Callable[[], Any]:
    """``work`` with ``signals`` stopping it wherever it is (:class:`~alast.training.process.StopAtOnce`;
    the training loop saves and stops at a step boundary)."""
    def run() -> Any:
        from alast.training.process import StopAtOnce

        with StopAtOnce(signals):
            return work()
    return run


@contextlib.contextmanager
def _reporting():
    """SIGINT and SIGTERM wait while a worker reports how it ended: torchrun sends SIGTERM to every
    rank as soon as one ends, and a rank failing on the same bad input must still get to say why."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _run_worker(work: Callable[[], Any], rank: int, debug: bool) -> None:
    """Run one torchrun worker.

    Most failures end every rank alike (bad input, a non-finite loss, an interrupt), so rank 0
    alone prints: a rank > 0 holds back its output and, under ``--nproc``, leaves its failure in
    :data:`RANK_ERRORS`, for the launcher to print where rank 0 said something else (a failure of
    that rank alone). Under ``--nproc`` rank 0 also leaves, unprinted, an interrupt and a collective
    that failed for a lost peer: torchrun stops every rank with SIGTERM once one ends, and a peer
    may have been killed; the launcher, which knows how each rank ended, says it once. Under a
    plain torchrun a rank > 0 prints its failure unless it is bad input or an interrupt, and, as
    nothing there tells torchrun's SIGTERM after another rank's failure from a request to stop,
    SIGTERM only stops the training loop (at a step boundary): elsewhere a rank failing on the same
    bad input must still get to say why. With ``debug`` every rank prints its traceback. A worker
    of ``--nproc`` dies with the launcher.
    """
    from .launch import die_with_launcher

    die_with_launcher()
    if os.environ.get(RANK_ERRORS):
        work = _stops_at_once(work)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        work = _stops_at_once(work, (signal.SIGINT,))
    if debug:
        run_guarded(work, debug)
        return
    held = io.StringIO()
    with contextlib.redirect_stderr(held) if rank else contextlib.nullcontext():
        failure = _failure(work)
    with _reporting():
        if failure is None:
            sys.stderr.write(held.getvalue())
            return
        code, line = describe(failure)
        message = line + "\n"
        consequence = code == EXIT_INTERRUPTED or peer_lost(failure)
        printed = rank == 0 and not (consequence and os.environ.get(RANK_ERRORS))
        if printed:
            sys.stderr.write(message)
        left = _leave_for_launcher(rank, {"output": held.getvalue(), "message": message, "code": code,
                                          "printed": printed, "consequence": consequence})
        if rank > 0 and not left and code not in (EXIT_BAD_INPUT, EXIT_INTERRUPTED):
            sys.stderr.write(held.getvalue() + message)
        sys.exit(code)


def _leave_for_launcher(rank: int, failure: dict[str, Any]) -> bool:
    """Write this rank's failure to the launcher's :data:`RANK_ERRORS` folder; False without one."""
    folder = os.environ.get(RANK_ERRORS)
    if not folder:
        return False
    path = Path(folder) / f"rank{rank}.json"
    try:
        path.with_suffix(".tmp").write_text(json.dumps(failure))
        path.with_suffix(".tmp").replace(path)  # whole or absent when the launcher reads it
    except OSError:
        return False
    return True


def _failure(work: Callable[[], Any]) -> BaseException | None:
    """Run ``work``; what it raised, for :func:`~.errors.describe` (click's own exits pass through, as
    in :func:`run_guarded`)."""
    try:
        work()
    except (click.exceptions.Exit, click.ClickException, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - reported by describe
        return exc
    return None

