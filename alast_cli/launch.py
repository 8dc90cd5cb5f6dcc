"""``alast train --nproc N``: rerun the same command under torchrun, one process per rank."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from runtimes.distributed import env_world_size

from .errors import EXIT_INTERRUPTED

LAUNCHER_PID = "ALAST_LAUNCHER_PID"  # set by --nproc for its workers: the process they die with
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def cli_args(ctx: Any, drop: Sequence[str] = ("nproc",)) -> list[str]:
    """The command line that reproduces ``ctx``'s parsed parameters (defaults left out)."""
    import click

    positional: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None:
            continue
        if isinstance(param, click.Argument):
            positional += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        if param.multiple:
            for v in value:
                options += [param.opts[0], str(v)]
        elif param.is_flag:
            if param.secondary_opts:
                options.append(param.opts[0] if value else param.secondary_opts[0])
            elif value and value != param.default:
                options.append(param.opts[0])
        elif value != param.default:
            options += [param.opts[0], str(value)]
    return positional + options


def torchrun_argv(nproc: int, ctx: Any) -> list[str]:
    """Arguments for ``python -m torch.distributed.run`` that rerun ``ctx``'s command on N ranks."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    head = ["--debug"] if debug else []
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "alast_cli", *head, ctx.command.name,
            *cli_args(ctx)]


class RanksFailed(Exception):
    """Ranks of ``--nproc`` ended with a failure. ``codes``: rank -> exit code, -N where signal N
    killed it; torchrun counts the ranks it stopped itself (SIGTERM, then SIGKILL) once one had
    failed, so a signal is not always the first cause."""

    def __init__(self, codes: dict[int, int]) -> None:
        super().__init__(f"ranks failed: {codes}")
        self.codes = codes


def check_nproc(nproc: int, device: str) -> None:
    """Refuse more ranks than this machine runs side by side: one per CPU core on a CPU run, one
    per GPU on a CUDA one. More do not train faster, and each holds a copy of the model: too many
    end in the out-of-memory killer, seen by the user as a peer's lost connection."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        have, what, other = torch.cuda.device_count(), "CUDA device(s)", " (or --set backend.device=cpu)"
    else:
        have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        what, other = "CPU cores", ""
    if nproc > have:
        raise ValueError(f"--nproc {nproc} is more than the {have} {what} this run can use (one process each); "
                         f"use --nproc {have} or fewer{other}")


def newest_checkpoint(run_dir: Path, resume: bool, since: float) -> Path | None:
    """The checkpoint ``--resume`` would continue this run from: the newest complete one, if it is the run's
    own (with ``resume`` any is; else one written since ``since``, a ``time.time()``: an older one
    belongs to the run that ``--force`` is replacing)."""
    from alast.training.checkpoint import list_checkpoints, looks_complete

    for path in reversed(list_checkpoints(run_dir)):  # newest first; a truncated one is skipped, as resume skips it
        try:
            if not (resume or path.stat().st_mtime >= since):
                return None
        except OSError:  # pruned meanwhile
            continue
        if looks_complete(path):
            return path
    return None


def die_with_launcher() -> None:
    """In a worker of ``alast train --nproc``: have the kernel kill this process when the launcher
    dies (Linux's ``PR_SET_PDEATHSIG``). A launcher killed by SIGKILL (``kill -9``, the
    out-of-memory killer) cannot stop its workers, and orphans would go on training and writing the
    run dir. torchrun's agent runs inside the launcher, so the launcher is the workers' parent."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def launch_torchrun(nproc: int, click_ctx: Any) -> int:
    """Rerun this ``alast train`` invocation as ``python -m torch.distributed.run --nproc-per-node N
    -m alast_cli train ...`` (without ``--nproc``); returns the exit code.

    torchrun's own ``main`` is run in this process (its ``run``, same parser) instead of as a
    subprocess, so the workers' exit codes come back as they are (2 bad input, 1 failure, 130
    interrupted) instead of torchrun's generic 1 and its launcher traceback: failed ranks raise
    :class:`RanksFailed` with each one's code. SIGINT and SIGTERM to this process reach the workers
    through torchrun's agent and end as interrupts (130) with one process or N.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if env_world_size() > 1:
        raise ValueError("--nproc cannot be used inside torchrun; drop --nproc (torchrun sets the ranks)")
    debug = bool(click_ctx.obj and click_ctx.obj.get("debug"))
    if not debug:  # the agent logs each worker's exit and every signal; the workers say what matters
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(parse_args(torchrun_argv(nproc, click_ctx)))
    except ChildFailedError as exc:
        raise RanksFailed({rank: failure.exitcode for rank, failure in exc.failures.items()}) from None
    except SignalException as exc:
        return EXIT_INTERRUPTED if exc.sigval in (signal.SIGINT, signal.SIGTERM) else 128 + int(exc.sigval)
    finally:  # the agent's handlers raise its SignalException; the launcher's own go on after it
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)
    return 0
