"""Map exceptions to one-line messages and exit codes: 2 bad input, 1 failure during a run, 130 Ctrl-C or SIGTERM."""
from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

import click

T = TypeVar("T")
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class UsageProblem(click.ClickException):
    exit_code = EXIT_BAD_INPUT

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


def one_line_usage_error(exc: click.UsageError) -> UsageProblem:
    """Click's usage error (``Usage: ...``, ``Try ...``, ``Error: ...``) as the one ``error:`` line
    every other bad input gets, naming the command's help."""
    ctx = exc.ctx
    msg = exc.format_message().rstrip(".")
    return UsageProblem(f"{msg}; see `{ctx.command_path} --help`" if ctx is not None else msg)



class Stopped(Exception):
    """Ctrl-C or SIGTERM where the loop could not stop at a step boundary: before training, during
    the final evaluation, or mid-step at a second signal. ``checkpoint``: the run's newest, which
    ``--resume`` continues from (None: it has none); ``when``: where it stopped, as words."""

    def __init__(self, checkpoint: Path | None, world_size: int = 1, when: str = "") -> None:
        super().__init__(f"interrupted {when}".strip())
        self.checkpoint, self.world_size, self.when = checkpoint, world_size, when


class RankKilled(Exception):
    """A data-parallel rank was ended by a signal that the launcher did not send (``kill -9``, the
    out-of-memory killer); the other ranks' lost connections are its consequence, not news."""

    def __init__(self, rank: int, signum: int, world_size: int, checkpoint: Path | None = None) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"rank {rank} was killed by {name}")
        self.rank, self.signum, self.world_size, self.checkpoint = rank, signum, world_size, checkpoint


# gloo's words for a peer that has gone (its process ended): the other side of a collective fails with them
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank ended: that rank's own end
    (its failure, its stop, the signal that killed it) is what to report."""
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in _PEER_LOST)


def _stopped_line(exc: Stopped) -> str:
    from alast.training.rundir import checkpoint_run_dir, resume_options

    said = f"interrupted {exc.when}".strip()
    if exc.checkpoint is None:
        return said if exc.when.startswith("before") else f"{said}; no checkpoint was saved"
    return (f"{said}; the last checkpoint is {exc.checkpoint}; continue with "
            f"{resume_options(exc.world_size, checkpoint_run_dir(exc.checkpoint))}")


def _killed_line(exc: RankKilled) -> str:
    from alast.training.rundir import checkpoint_run_dir, resume_options

    why = " (often the out-of-memory killer: see `dmesg`)" if exc.signum == signal.SIGKILL else ""
    then = (f"; the last checkpoint is {exc.checkpoint}; continue with "
            f"{resume_options(exc.world_size, checkpoint_run_dir(exc.checkpoint))}"
            if exc.checkpoint is not None else "; no checkpoint was saved")
    return f"error: {exc}{why}{then}"


def _bad_input_types() -> tuple[type, ...]:
    from alast.config import ConfigError
    from alast.data import DataError
    from alast.models import ModelError
    from alast.training.rundir import RunDirError
    from planners import PlannerError
    from runtimes.torch_backend.patch import PatchError

    return (ConfigError, DataError, ModelError, PlannerError, PatchError, RunDirError, FileNotFoundError)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message. torch re-raises a DataLoader worker's error with the
    worker's traceback as its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ... alast.data.datasets.DataError: cannot read image ..."): for one, the original line."""
    lines = str(exc).strip().splitlines()
    if lines and lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        tag = f"{type(exc).__name__}: "
        found = [line.split(tag, 1)[1].strip() for line in lines[1:] if tag in line]
        if found:
            return found[-1]
    return lines[0] if lines else exc.__class__.__name__


def describe(exc: BaseException, debug: bool = False) -> tuple[int, str]:
    """The exit code for ``exc`` and the line :func:`run_guarded` prints for it."""
    from alast.training.rundir import Interrupted

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, Stopped):
        return EXIT_INTERRUPTED, _stopped_line(exc)
    if isinstance(exc, RankKilled):
        return EXIT_FAILURE, _killed_line(exc)
    if isinstance(exc, Interrupted):
        return EXIT_INTERRUPTED, (f"interrupted at step {exc.step}; checkpoint saved to {exc.path}; "
                                  f"continue with {exc.resume_with}")
    code = EXIT_BAD_INPUT if isinstance(exc, _bad_input_types() + (ValueError,)) else EXIT_FAILURE
    msg = first_line(exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, outside a training step
        msg = ("out of GPU memory; lower --batch-size (train.batch_size) or use backend.precision=bf16 (fp16 on a "
               "GPU without bf16)")
    if isinstance(exc, OSError) and getattr(exc, "strerror", None):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        msg = f"{exc.strerror}{where}"
        code = EXIT_FAILURE if not isinstance(exc, FileNotFoundError) else EXIT_BAD_INPUT
    hint = "" if debug else " (run with --debug for the traceback)" if code == EXIT_FAILURE else ""
    return code, f"error: {msg}{hint}"


def run_guarded(fn: Callable[[], T], debug: bool) -> T:
    """Run ``fn``; on a known problem print ``error: ...`` and exit with its code (traceback if debug)."""
    try:
        return fn()
    except (click.exceptions.Exit, click.ClickException, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - classify, then exit
        if debug and not isinstance(exc, (KeyboardInterrupt, Stopped)):
            traceback.print_exc()
        code, line = describe(exc, debug)
        click.echo(line, err=True)
        sys.exit(code)
