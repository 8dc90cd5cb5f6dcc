"""Stopping `alast train`, with one process and with `--nproc 2`, wherever the stop lands: SIGINT and
SIGTERM give exit 130 and one line (naming the checkpoint to continue from where there is one);
a rank killed by a signal is named once; workers die with their launcher.

The `--nproc` runs pause their workers where a test needs them (before loading the data, in a
step, in the final evaluation) through a ``sitecustomize`` on ``PYTHONPATH``, which every
process of the run imports; it leaves a file ``rank{R}.{pid}`` once a worker has got there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from alast.training import loop
from alast_cli.errors import describe
from alast_cli.main import cli
from alast_cli.train_cmd import RANK_ERRORS, _echo_other_ranks, _run_worker
from tests.cli_errors import one_error_line

REPO = Path(__file__).resolve().parents[2]
# random images: no data set to import or read in each of the processes
TINY = ["--data", "random:64", "--batch-size", "8", "--steps", "3", "--set", "backend.threads=1"]
AGENT_GRACE_S = 30  # torchrun's agent SIGKILLs workers this long after its SIGTERM: a stop must beat it

PAUSE = '''
import os, time
stage = os.environ.get("ALAST_TEST_PAUSE")
if stage and os.environ.get("WORLD_SIZE"):
    from alast.training import loop

    def arrived():
        folder = os.environ["ALAST_TEST_MARKS"]
        open(os.path.join(folder, "rank%s.%d" % (os.environ["RANK"], os.getpid())), "w").close()

    def pausing(name, owner, when=lambda *a: True, pause_s=120.0):
        original = getattr(owner, name)
        def paused(*args, **kwargs):
            if when(*args):
                arrived()
                time.sleep(pause_s)
            return original(*args, **kwargs)
        setattr(owner, name, paused)

    if stage == "data":
        pausing("load_data", loop)
    elif stage == "evaluation":
        pausing("final_evaluation", loop._Run)
    elif stage == "steps":  # one second a step, from the second on
        pausing("step", loop._Run, when=lambda run, images, labels, step, *rest: step >= 1, pause_s=1.0)
'''


@pytest.fixture
def sigterm_raises():
    """Where alast has no SIGTERM handler of its own, SIGTERM would end pytest: here it raises."""
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test's own handler, not alast's")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, before)


def signal_self(signum: int):
    """A stand-in for ``fn`` that first sends ``signum`` to this process, as a terminal or a
    scheduler would while ``fn`` runs."""
    def wrap(fn):
        def call(*args, **kwargs):
            os.kill(os.getpid(), signum)
            return fn(*args, **kwargs)
        return call
    return wrap


def one_interrupt_line(res, code: int, *needles: str) -> str:
    """An interrupt's contract: exit ``code``, no traceback, one line on stderr holding ``needles``."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, res.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


# -- one process ---------------------------------------------------------------------------------
def test_sigterm_before_training_stops_at_once_and_leaves_no_run_dir(tmp_path, monkeypatch, sigterm_raises):
    monkeypatch.setattr(loop, "load_data", signal_self(signal.SIGTERM)(loop.load_data))
    res = CliRunner().invoke(cli, ["train", *TINY, "--out", str(tmp_path / "run")])
    one_interrupt_line(res, 130, "interrupted before training started")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_during_the_final_evaluation_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch,
                                                                               sigterm_raises, signum):
    run = tmp_path / "run"
    evaluate = loop._Run.final_evaluation
    monkeypatch.setattr(loop._Run, "final_evaluation", signal_self(signum)(evaluate))
    res = CliRunner().invoke(cli, ["train", *TINY, "--out", str(run)])
    line = one_interrupt_line(res, 130, "interrupted during the final evaluation")
    assert line.endswith(f"the last checkpoint is {run / 'checkpoints' / 'step_00000003.safetensors'}; "
                         f"continue with --resume --out {run}")
    if signum == signal.SIGTERM:  # what the line says to do works: only the evaluation is left
        monkeypatch.setattr(loop._Run, "final_evaluation", evaluate)
        again = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume"])
        assert again.exit_code == 0, again.output
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 and (run / "summary.json").exists()


def test_a_stop_waits_for_a_run_dir_write_to_finish(tmp_path):
    from alast.training.process import Comm, StopAtOnce, on_main

    target = tmp_path / "file"

    def write() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        target.write_text("whole")

    with pytest.raises(KeyboardInterrupt), StopAtOnce():
        on_main(Comm(), write)
    assert target.read_text() == "whole"


# -- --nproc 2 -------------------------------------------------------------------------------------
class NprocRun:
    """``alast train --nproc 2`` in a subprocess, its workers paused at ``stage``."""

    def __init__(self, tmp_path: Path, stage: str, *extra: str) -> None:
        hook, self.marks, self.run_dir = tmp_path / "hook", tmp_path / "marks", tmp_path / "run"
        hook.mkdir()
        self.marks.mkdir()
        (hook / "sitecustomize.py").write_text(PAUSE)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), OMP_NUM_THREADS="1",
                   ALAST_TEST_PAUSE=stage, ALAST_TEST_MARKS=str(self.marks),
                   TMPDIR=str(tmp_path))  # a launcher killed by SIGKILL leaves its rank-error folder there
        # output to a file, not a pipe: waiting for a pipe's end would wait for every worker
        self.stderr = tmp_path / "stderr"
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "alast_cli", "train", *TINY, *extra, "--nproc", "2",
                                          "--out", str(self.run_dir)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                         stderr=err)

    def workers(self, timeout_s: float = 240) -> dict[int, int]:
        """Rank -> pid, once both workers are where the stage pauses them."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = {int(p.name.split(".")[0][4:]): int(p.name.split(".")[1]) for p in self.marks.iterdir()}
            if len(found) == 2:
                return found
            assert self.proc.poll() is None, self.stderr.read_text()
            time.sleep(0.2)
        raise AssertionError("the workers did not get there")

    def end(self, timeout_s: float) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout_s), self.stderr.read_text()

    def clean_up(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for mark in self.marks.iterdir():
            if alive(int(mark.name.split(".")[1])):
                os.kill(int(mark.name.split(".")[1]), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which an init that does not reap leaves, has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def nproc_run(tmp_path):
    runs: list[NprocRun] = []

    def start(stage: str, *extra: str) -> NprocRun:
        runs.append(NprocRun(tmp_path, stage, *extra))
        return runs[-1]

    yield start
    for run in runs:
        run.clean_up()


def interrupt_line(err: str) -> str:
    assert "Traceback" not in err and "gloo" not in err and "error:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, err
    return lines[0]


# slow: the one-process tests above give each stop's message; the three-process run during training
# (below) shows a SIGTERM reaching every rank
@pytest.mark.slow
def test_nproc_sigterm_before_training_stops_every_rank_at_once(nproc_run):
    run = nproc_run("data")
    run.workers()
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.end(timeout_s=AGENT_GRACE_S - 5)
    assert code == 130 and interrupt_line(err) == "interrupted before training started"


@pytest.mark.slow  # as above
def test_nproc_sigterm_during_the_final_evaluation_names_the_checkpoint(nproc_run):
    run = nproc_run("evaluation")
    run.workers()
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.end(timeout_s=AGENT_GRACE_S - 5)
    ckpt = run.run_dir / "checkpoints" / "step_00000003.safetensors"
    assert code == 130 and interrupt_line(err) == (f"interrupted during the final evaluation; the last checkpoint "
                                                   f"is {ckpt}; continue with --resume --nproc 2 --out {run.run_dir}")


def test_nproc_sigterm_during_training_exits_130_as_one_process_does(nproc_run):
    run = nproc_run("steps", "--steps", "60")
    run.workers()
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.end(timeout_s=AGENT_GRACE_S - 5)
    line = interrupt_line(err)
    assert code == 130 and line.startswith("interrupted at step ")
    assert line.endswith(f"continue with --resume --nproc 2 --out {run.run_dir}")


def test_nproc_a_rank_killed_by_a_signal_is_named_once(nproc_run):
    run = nproc_run("steps", "--steps", "60", "--set", "output.checkpoint_every=1")
    os.kill(run.workers()[1], signal.SIGKILL)
    code, err = run.end(timeout_s=AGENT_GRACE_S - 5)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and errors == [(
        "error: rank 1 was killed by SIGKILL (often the out-of-memory killer: see `dmesg`); the last checkpoint is "
        f"{run.run_dir / 'checkpoints' / 'step_00000001.safetensors'}; continue with --resume --nproc 2 --out "
        f"{run.run_dir}")], err
    assert "gloo" not in err and "Traceback" not in err and "interrupted" not in err


def test_nproc_workers_die_with_a_launcher_killed_by_sigkill(nproc_run):
    run = nproc_run("steps", "--steps", "60")
    pids = run.workers().values()
    run.proc.kill()
    run.proc.wait()
    end = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "orphaned workers go on training"


# -- what the launcher prints and refuses ---------------------------------------------------------
def leave(rank: int, exc: BaseException) -> None:
    """Rank ``rank`` fails with ``exc`` and leaves it for the launcher (as under --nproc)."""
    def fail():
        raise exc
    with pytest.raises(SystemExit):
        _run_worker(fail, rank, debug=False)


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setenv(RANK_ERRORS, str(tmp_path))
    yield tmp_path
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_ranks_own_failure_comes_before_the_sigterm_torchrun_sent_the_others(launcher, capsys):
    """torchrun records the ranks it stopped itself (SIGTERM) beside the one that failed."""
    from alast.data import DataError
    from alast_cli.train_cmd import _ranks_ended

    leave(1, DataError("image folder not found: x"))
    assert _ranks_ended(launcher, {0: -signal.SIGTERM, 1: 2}, 2, lambda: None) == 2
    assert capsys.readouterr().err == "error: image folder not found: x\n"


def test_a_rank_killed_by_sigkill_comes_before_its_peers_lost_connection(launcher, capsys):
    from alast_cli.errors import RankKilled
    from alast_cli.train_cmd import _ranks_ended

    leave(0, RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:19843"))
    assert capsys.readouterr().err == ""  # rank 0 leaves a lost peer to the launcher
    checkpoint = Path("run/checkpoints/step_00000004.safetensors")
    with pytest.raises(RankKilled) as killed:
        _ranks_ended(launcher, {0: 1, 1: -signal.SIGKILL}, 2, lambda: checkpoint)
    assert describe(killed.value) == (1, ("error: rank 1 was killed by SIGKILL (often the out-of-memory killer: see "
                                          "`dmesg`); the last checkpoint is run/checkpoints/step_00000004.safetensors; "
                                          "continue with --resume --nproc 2 --out run"))


def test_rank_errors_that_differ_only_in_ports_are_printed_once(launcher, capsys):
    for rank, port in ((1, 19843), (2, 22960)):
        leave(rank, RuntimeError(f"[pair.cc:561] Connection closed by peer [127.0.0.1]:{port}"))
    _echo_other_ranks(launcher)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        "error: [pair.cc:561] Connection closed by peer [127.0.0.1]:19843 (run with --debug for the traceback)"]


@pytest.mark.parametrize("device, cores, gpus, what", [("cpu", 1, 0, "1 CPU cores"),
                                                       ("cuda", 8, 1, "1 CUDA device(s)")])
def test_nproc_above_the_cores_or_gpus_is_refused_before_anything_starts(tmp_path, monkeypatch, device, cores, gpus,
                                                                        what):
    import torch

    from alast_cli import launch

    def started(*a, **k):
        raise AssertionError("torchrun started")

    monkeypatch.setattr(launch, "launch_torchrun", started)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    res = CliRunner().invoke(cli, ["train", "--nproc", "2", "--set", f"backend.device={device}",
                                   "--out", str(tmp_path / "run")])
    one_error_line(res, 2, f"--nproc 2 is more than the {what}", "use --nproc 1 or fewer")
    assert not (tmp_path / "run").exists()


def test_a_sigterm_to_every_process_of_a_run_with_data_workers_stops_at_a_step_boundary(tmp_path):
    """systemd and batch schedulers signal every process of a run, its DataLoader workers too: they
    leave the stop to the training process, which saves a checkpoint and exits 130."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "alast_cli", "train", "--data", "digits", "--batch-size", "16",
                             "--steps", "100000", "--set", "backend.threads=1", "--set", "data.num_workers=2",
                             "--set", 'backend.count_flops="off"', "--out", str(run)],
                            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted at step ")]
    assert len(lines) == 1 and "checkpoint saved to" in lines[0] and "error" not in err, err
    assert list((run / "checkpoints").glob("step_*.safetensors"))
