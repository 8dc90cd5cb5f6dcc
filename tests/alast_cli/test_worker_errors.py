"""What the torchrun workers of `alast train --nproc N` print when they fail: a failure every rank
meets (a non-finite loss, bad input) once, from rank 0; a failure of one rank > 0 alone still shown.

The ranks run in this process one after the other (alast_cli.train_cmd._run_worker), then the
launcher's report of the other ranks (_echo_other_ranks); tests/runtimes/test_distributed.py runs
the same under torchrun.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from alast_cli import train_cmd
from alast_cli.train_cmd import RANK_ERRORS, _echo_other_ranks, _run_worker
from runtimes.protocol import NonFiniteLoss


@pytest.fixture(autouse=True)
def keep_sigterm():
    before = signal.getsignal(signal.SIGTERM)  # _run_worker ignores SIGTERM, as a worker must
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """The folder `--nproc` gives its workers for their failures."""
    monkeypatch.setenv(RANK_ERRORS, str(tmp_path))
    return tmp_path


def fail_with(exc: BaseException):
    def work():
        print("a warning on this rank", file=sys.stderr)
        raise exc
    return work


def run_rank(rank: int, exc: BaseException, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        _run_worker(fail_with(exc), rank, debug=False)
    return stop.value.code, capsys.readouterr().err


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_a_failure_every_rank_meets_is_printed_once_by_rank_0(launcher, capsys):
    nan = NonFiniteLoss(1, float("nan"))
    code, err = run_rank(0, nan, capsys)
    assert code == 1 and error_lines(err) == [f"error: {nan} (run with --debug for the traceback)"]
    assert "a warning on this rank" in err  # rank 0 prints as it goes
    assert run_rank(1, NonFiniteLoss(1, float("nan")), capsys) == (1, "")
    _echo_other_ranks(launcher)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rank_0", [None, ValueError("bad input on every rank")], ids=["rank 0 killed", "rank 0 other"])
def test_a_failure_of_rank_1_alone_reaches_the_user(launcher, capsys, rank_0):
    if rank_0 is not None:
        run_rank(0, rank_0, capsys)
    assert run_rank(1, RuntimeError("only rank 1 saw this"), capsys) == (1, "")
    assert run_rank(2, RuntimeError("only rank 1 saw this"), capsys) == (1, "")  # said once, not per rank
    _echo_other_ranks(launcher)
    err = capsys.readouterr().err
    assert error_lines(err) == ["error: only rank 1 saw this (run with --debug for the traceback)"]
    assert "a warning on this rank" in err  # with what that rank printed before


def test_without_the_launcher_a_rank_above_0_prints_its_own_failure_unless_it_is_bad_input(monkeypatch, capsys):
    monkeypatch.delenv(RANK_ERRORS, raising=False)  # a plain torchrun: no launcher to report for it
    code, err = run_rank(1, RuntimeError("only rank 1 saw this"), capsys)
    assert code == 1 and error_lines(err) == ["error: only rank 1 saw this (run with --debug for the traceback)"]
    assert run_rank(1, ValueError("bad input on every rank"), capsys) == (2, "")


def test_a_rank_that_succeeds_prints_what_it_held_back(launcher, capsys):
    _run_worker(lambda: print("a warning on rank 1", file=sys.stderr), 1, debug=False)
    assert capsys.readouterr().err == "a warning on rank 1\n"
    assert not list(launcher.iterdir())


def test_debug_shows_every_ranks_traceback(launcher, capsys):
    with pytest.raises(SystemExit):
        _run_worker(fail_with(RuntimeError("boom")), 1, debug=True)
    assert "Traceback" in capsys.readouterr().err


def test_the_launcher_gives_its_workers_a_folder_and_removes_it(monkeypatch, tmp_path):
    import click

    from alast_cli import launch

    seen = []
    monkeypatch.setattr(launch, "launch_torchrun", lambda nproc, ctx: seen.append(os.environ[RANK_ERRORS]) or 0)
    ctx = click.Context(train_cmd.train_command, obj={})
    train_cmd.launch(ctx, 2, None, ("backend.threads=1",), tmp_path / "run", False, False, {})
    assert len(seen) == 1 and not Path(seen[0]).exists() and RANK_ERRORS not in os.environ


@pytest.mark.parametrize("world_size, hint", [(1, "continue with --resume"), (2, "continue with --resume --nproc 2")])
def test_an_interrupted_run_says_how_to_continue_it(world_size, hint):
    """A data-parallel run resumes only at its own process count, so the hint names it."""
    from alast.training.rundir import Interrupted
    from alast_cli.errors import EXIT_INTERRUPTED, describe

    code, line = describe(Interrupted(7, Path("run/checkpoints/step_00000007.safetensors"), world_size))
    assert code == EXIT_INTERRUPTED and line.endswith(hint)
