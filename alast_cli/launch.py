"""``alast train --nproc N``: rerun the same command under torchrun, one process per rank."""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Sequence

from runtimes.distributed import env_world_size


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


def launch_torchrun(nproc: int, click_ctx: Any) -> int:
    """Rerun this ``alast train`` invocation as ``python -m torch.distributed.run --nproc-per-node N
    -m alast_cli train ...`` (without ``--nproc``); returns the exit code.

    torchrun's own ``main`` is run in this process (its ``run``, same parser) instead of as a
    subprocess, so the workers' exit codes come back as they are (2 bad input, 1 failure, 130
    interrupted) instead of torchrun's generic 1 and its launcher traceback.
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
    try:
        run(parse_args(torchrun_argv(nproc, click_ctx)))
    except ChildFailedError as exc:
        return _exit_code(exc.failures)
    except SignalException as exc:
        return 130 if exc.sigval == signal.SIGINT else 128 + int(exc.sigval)
    return 0


def _exit_code(failures: dict[int, Any]) -> int:
    """The lowest failed rank's own exit code; ranks killed by a signal (torchrun stops the others
    once one fails) only count when no rank exited by itself; a signal N reads 128+N."""
    codes = [failures[r].exitcode for r in sorted(failures)]
    own = [c for c in codes if c > 0]
    if own:
        return own[0]
    return 128 - codes[0] if codes[0] < 0 else codes[0]
