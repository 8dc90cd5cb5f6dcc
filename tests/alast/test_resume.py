"""Exact resume after kill -9 and Ctrl-C, safe checkpoints, and refusal of result-changing resumes."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alast.config import ConfigError
from alast.training import checkpoint as ckpt
from alast.training.report import read_metrics
from alast.training.resume import NAMED_OPTION_KEYS, result_changes, resume_config
from alast_cli.main import cli

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
BASE = ["--steps", str(STEPS), "--batch-size", "16", "--set", 'backend.count_flops="off"',
        "--set", "backend.threads=1", "--set", "output.checkpoint_every=3",
        "--set", "data.val_fraction=0.05"]  # a small held-out split: the evaluations take a quarter of the time


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]


def invoke(*args: str):
    return CliRunner().invoke(cli, ["train", *args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (in this process: the same code, threads and settings)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    res = invoke(*BASE, "--out", str(run))
    assert res.exit_code == 0, res.output
    assert len(losses(run)) == STEPS
    return run


def start_run(run: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "alast_cli", "train", *BASE, "--out", str(run)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 240) -> None:
    """Block until ``run`` has logged ``n`` steps (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= n:
            return
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-2000:]}"
        time.sleep(0.01)
    proc.kill()
    pytest.fail("run too slow")


def test_kill_9_then_resume_logs_the_same_losses(reference, tmp_path):
    run = tmp_path / "run"
    proc = start_run(run)
    wait_for_steps(proc, run, 8)  # between the step-6 and step-9 checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    assert len(losses(run)) >= 8

    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert losses(run) == losses(reference)  # exact, not approximately
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] in (6, 9) and summary["steps"] == STEPS
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["val_accuracy"] == ref["val_accuracy"] and summary["val_loss"] == ref["val_loss"]
    assert summary["eval_kept_tokens"] == ref["eval_kept_tokens"]


def test_ctrl_c_saves_exits_130_and_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    proc = start_run(run)
    wait_for_steps(proc, run, 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("interrupted at step")][0]
    step = int(line.split()[3].rstrip(";"))
    assert 4 <= step < STEPS and line.endswith(f"continue with --resume --out {run}")
    # the checkpoint is at the step boundary where the loop stopped: exactly `step` logged steps
    assert (run / "checkpoints" / f"step_{step:08d}.safetensors").exists()
    assert len(losses(run)) == step

    # what the line says, typed after `alast` (the demo) as after `alast train`
    res = CliRunner().invoke(cli, line.split("continue with ")[1].split(), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert losses(run) == losses(reference)


def interrupt_after_step_1(monkeypatch) -> None:
    """SIGINT this process once step 1's metrics are written, as Ctrl-C would."""
    from alast.training import report

    write = report.MetricsWriter.write

    def write_then_interrupt(self, record):
        write(self, record)
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(report.MetricsWriter, "write", write_then_interrupt)


def test_sigint_in_process_saves_at_the_step_boundary_and_exits_130(tmp_path, monkeypatch):
    """SIGINT asks the loop to stop at the next step boundary, with a checkpoint (CLI: exit 130)."""
    interrupt_after_step_1(monkeypatch)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup/background jobs
    res = invoke(*BASE, "--steps", "4", "--out", str(tmp_path / "run"))
    assert res.exit_code == 130
    assert "interrupted at step 2" in res.stderr
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000002.safetensors"]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_ctrl_c_in_the_last_step_stops_before_the_final_evaluation(tmp_path, monkeypatch):
    """The request used to be dropped at the last step, and the run went on through an evaluation
    that can take minutes; now it stops with the final checkpoint, and resume only evaluates."""
    from alast.training import loop

    interrupt_after_step_1(monkeypatch)
    evaluated = []
    monkeypatch.setattr(loop._Run, "final_evaluation", lambda self, data: evaluated.append(1))
    run = tmp_path / "run"
    res = invoke(*BASE, "--steps", "2", "--out", str(run))
    assert res.exit_code == 130 and "interrupted at step 2" in res.stderr, res.output
    assert evaluated == [] and [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002.safetensors"]
    monkeypatch.undo()
    res = invoke("--resume", "--out", str(run), "--json")
    assert res.exit_code == 0, res.output
    assert f"resuming from {run / 'checkpoints' / 'step_00000002.safetensors'} (step 2)" in res.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2


@pytest.mark.parametrize("minutes", ["1e-7", "10", "null"])
def test_timed_checkpoints_start_once_the_first_steps_are_timed(tmp_path, minutes):
    """A kill -9 lost the whole run under the default checkpoint_every: 0; now a checkpoint is written
    about every output.checkpoint_minutes (here every step, from the 10th, or never in so short a run)."""
    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "13", "--set", f"output.checkpoint_minutes={minutes}",
                 "--set", "output.keep_last=10", "--out", str(run))
    assert res.exit_code == 0, res.output
    steps = [int(p.name[5:13]) for p in ckpt.list_checkpoints(run)]
    assert steps == ([10, 11, 12, 13] if minutes == "1e-7" else [13])


def test_resume_without_a_checkpoint_says_it_starts_again(tmp_path):
    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "2", "--out", str(run))
    assert res.exit_code == 0, res.output
    shutil.rmtree(run / "checkpoints")
    (run / "summary.json").unlink()  # as after a kill -9 before any checkpoint
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert f"warning: no checkpoint in {run / 'checkpoints'}: the run starts again from step 0" in res.stderr


def test_resume_without_the_log_says_where_the_log_starts(tmp_path):
    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "2", "--set", "output.checkpoint_every=1", "--out", str(run))
    assert res.exit_code == 0, res.output
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step_00000002.safetensors").unlink()
    (run / "metrics.jsonl").unlink()
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert f"warning: {run / 'metrics.jsonl'} is missing: its log, and budgets.png, start at step 1" in res.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]


def test_a_run_dir_in_use_is_refused_to_a_second_process(tmp_path):
    """A second ``--resume`` (or ``--force``) on a run still training used to write beside it: two
    processes appended to one metrics.jsonl."""
    from alast.training import rundir

    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "2", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert not rundir._HELD  # the run released its lock when it ended
    (run / "summary.json").unlink()  # as if still training
    code = ("import sys, time; from alast.training.rundir import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--resume"], [*FAST, "--steps", "2", "--force"]):
            res = invoke(*extra, "--out", str(run))
            assert res.exit_code == 2, res.output
            assert res.stderr.strip() == (f"error: run dir {run} is in use by another alast process (pid {holder.pid}); "
                                          "wait for it to end or stop it, or choose another --out")
        # export told to finish the run with the resume refused just above
        res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
        assert res.exit_code == 2 and res.stderr.strip().endswith(
            f"it is still training (process {holder.pid}); export it when that ends"), res.output
    finally:
        holder.kill()
        holder.wait()
    res = invoke("--resume", "--out", str(run))  # the lock died with its process
    assert res.exit_code == 0, res.output


def test_force_keeps_what_alast_did_not_write(tmp_path):
    """--force deleted everything in checkpoints/ (a user's resnet_epoch90.pth too)."""
    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "2", "--set", "output.checkpoint_every=1", "--out", str(run))
    assert res.exit_code == 0, res.output
    for mine in ("checkpoints/resnet_epoch90.pth", "tensorboard/notes.txt", "ort_artifacts/readme"):
        (run / mine).parent.mkdir(exist_ok=True)
        (run / mine).write_text("mine\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    res = invoke(*FAST, "--steps", "2", "--out", str(run), "--force")
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"error: --force would delete checkpoints/resnet_epoch90.pth, tensorboard/notes.txt, "
                                  f"ort_artifacts/readme in {run}, which alast did not write; move them out of the "
                                  "run dir, or choose another --out")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_force_does_not_replace_the_config_it_was_given(tmp_path):
    """``alast train run/config.yaml --out run --force`` deleted the config it was reading."""
    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "2", "--out", str(run))
    assert res.exit_code == 0, res.output
    config = run / "config.yaml"
    text = config.read_text() + "# my notes\n"
    config.write_text(text)
    res = CliRunner().invoke(cli, ["train", str(config), "--out", str(run), "--force"])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"error: the config {config} is the config.yaml that --force would replace in "
                                  f"{run}; copy it out of the run dir and pass the copy, or choose another --out")
    assert config.read_text() == text


def test_changed_config_resume_is_refused_naming_the_keys(reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "config.yaml", run / "config.yaml")
    with pytest.raises(ConfigError) as err:
        resume_config(run, None, ["train.lr=0.01"], {"steps": 20, "batch_size": None})
    assert "train.lr (0.001 -> 0.01)" in str(err.value) and "train.steps (12 -> 20)" in str(err.value)
    # bookkeeping-only keys may change
    cfg = resume_config(run, None, ["output.keep_last=5", "train.eval_every=2"], {"steps": STEPS})
    assert cfg.output.keep_last == 5 and cfg.train.steps == STEPS

    res = invoke("--resume", "--out", str(run), "--policy", "full", "--set", "train.seed=3")
    assert res.exit_code == 2
    assert "policy.name (alast -> full)" in res.stderr and "train.seed (0 -> 3)" in res.stderr
    assert "Traceback" not in res.output


def test_hand_edited_config_is_caught_against_the_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()  # unfinished (a finished run is left as it is, config and all)
    text = (run / "config.yaml").read_text().replace("lr: 0.001", "lr: 0.002")
    (run / "config.yaml").write_text(text)
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 2 and "train.lr (0.001 -> 0.002)" in res.stderr


def test_resume_without_a_run_is_refused(tmp_path):
    res = invoke("--resume", "--out", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "cannot resume" in res.stderr
    assert not (tmp_path / "nothing").exists()


def test_named_option_keys_match_the_cli():
    from alast_cli.options import _NAMED

    assert NAMED_OPTION_KEYS == _NAMED


def test_neutral_keys_are_not_reported():
    from alast.config import load_config

    a = load_config(None, [])
    b = load_config(None, ["output.keep_last=9", "backend.threads=1", "export.opset=18"])
    assert result_changes(a, b) == []
    assert result_changes(a, load_config(None, ["policy.b_min=0.6"])) == ["policy.b_min (0.5 -> 0.6)"]


# -- checkpoint files ------------------------------------------------------------------------
def test_keep_last_and_names(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000003.safetensors", "step_00000004.safetensors"]
    path, state = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step_00000004.safetensors" and state["step"] == 4


def test_failed_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 5, {"step": 5, "w": torch.ones(3)}, keep_last=2)
    good = (tmp_path / "checkpoints" / "step_00000005.safetensors").read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 5, {"step": 5, "w": torch.zeros(3)}, keep_last=2)
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step_00000005.safetensors"]  # no temp file left, the good one untouched
    assert (tmp_path / "checkpoints" / "step_00000005.safetensors").read_bytes() == good


def test_truncated_newest_checkpoint_falls_back(tmp_path):
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep_last=3)
    newest = tmp_path / "checkpoints" / "step_00000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])  # as if written in place and killed
    warnings: list[str] = []
    path, state = ckpt.latest_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "step_00000002.safetensors" and state["step"] == 2
    assert len(warnings) == 1 and "step_00000004.safetensors is unreadable" in warnings[0]
    assert "delete it" not in warnings[0] and warnings[0].endswith("resuming from step_00000002.safetensors")


@pytest.mark.parametrize("cut", [20, -1])  # the header cut, the last tensor's last byte missing
def test_an_interrupted_resume_names_the_checkpoint_it_would_continue_from(tmp_path, cut):
    from alast_cli.launch import newest_checkpoint

    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(5)}, keep_last=3)
    assert newest_checkpoint(tmp_path, True, 0.0).name == "step_00000004.safetensors"
    newest = tmp_path / "checkpoints" / "step_00000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:cut])
    assert newest_checkpoint(tmp_path, True, 0.0).name == "step_00000002.safetensors"
    assert ckpt.latest_checkpoint(tmp_path)[0].name == "step_00000002.safetensors"  # what resume takes


def test_resume_sets_an_unreadable_checkpoint_aside_so_pruning_keeps_the_readable_one(tmp_path):
    """Resumed from step 2 past a truncated step 4, a run that writes step 6 with keep_last=2 used to
    keep the truncated 4 and prune 2, the one readable before it."""
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep_last=3)
    newest = tmp_path / "checkpoints" / "step_00000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])
    warnings: list[str] = []
    path, _ = ckpt.latest_checkpoint(tmp_path, warn=warnings.append, set_aside=True)
    assert path.name == "step_00000002.safetensors" and "renamed step_00000004.safetensors" in warnings[-1]
    ckpt.save_checkpoint(tmp_path, 6, {"step": 6}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002.safetensors", "step_00000004.safetensors.unreadable", "step_00000006.safetensors"]


def test_no_readable_checkpoint_refuses_instead_of_restarting(tmp_path):
    """Checkpoints exist but none can be read: resume must not silently start again from step 0."""
    ckpt.save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=2)
    only = tmp_path / "checkpoints" / "step_00000003.safetensors"
    only.write_bytes(only.read_bytes()[:20])
    with pytest.raises(ckpt.CheckpointRefused, match="no older readable checkpoint"):
        ckpt.latest_checkpoint(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None  # no checkpoint at all: start from 0


# -- --force over a finished run, and a failed final evaluation -------------------------------
FAST = ["--batch-size", "4", "--set", 'backend.count_flops="off"', "--set", "backend.threads=1",
        "--set", "data.val_fraction=0.05"]


def test_force_replaces_the_old_run_and_resume_continues_the_new_one(tmp_path, monkeypatch):
    """--force starts from a clean slate of alast's own files: the old run's checkpoints can neither
    be resumed nor prune the new run's; its results are gone; the user's own files stay."""
    run = tmp_path / "run"
    res = invoke(*FAST, "--steps", "6", "--set", "output.checkpoint_every=3", "--out", str(run))
    assert res.exit_code == 0, res.output
    (run / "notes.txt").write_text("mine\n")
    for planted in ("tensorboard/events.out.tfevents.1", "ort_artifacts/full/fingerprint", ".summary.json.x.tmp",
                    "checkpoints/.step_00000009.safetensors.x.tmp"):
        (run / planted).parent.mkdir(parents=True, exist_ok=True)
        (run / planted).write_text("old run\n")

    interrupt_after_step_1(monkeypatch)
    res = invoke(*FAST, "--steps", "4", "--set", "train.lr=0.002", "--set", "output.checkpoint_every=1",
                 "--out", str(run), "--force")
    assert res.exit_code == 130, res.output
    monkeypatch.undo()
    names = sorted(p.name for p in run.iterdir())
    assert names == [".alast.lock", "checkpoints", "config.yaml", "metrics.jsonl", "notes.txt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.safetensors",
                                                                       "step_00000002.safetensors"]
    assert (run / "notes.txt").read_text() == "mine\n"

    res = invoke("--resume", "--out", str(run), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [step for step, _ in losses(run)] == [0, 1, 2, 3]


def test_a_failed_final_evaluation_keeps_the_training(reference, tmp_path, monkeypatch):
    """The final checkpoint is written before the final evaluation: resume redoes only the end."""
    from alast.data import DataError
    from alast.training import loop

    def unreadable(self, data):
        raise DataError("cannot read image val/7.png")

    monkeypatch.setattr(loop._Run, "final_evaluation", unreadable)
    run = tmp_path / "run"
    res = invoke(*BASE, "--out", str(run))
    assert res.exit_code == 2 and "cannot read image" in res.stderr
    assert ckpt.list_checkpoints(run)[-1].name == f"step_{STEPS:08d}.safetensors"
    assert not (run / "summary.json").exists()
    monkeypatch.undo()

    trained: list[int] = []
    step = loop._Run.step
    monkeypatch.setattr(loop._Run, "step", lambda self, *a: trained.append(a[2]) or step(self, *a))
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert trained == []  # no step trained again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == STEPS and summary["steps"] == STEPS
    assert losses(run) == losses(reference)
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["val_accuracy"] == ref["val_accuracy"] and summary["val_loss"] == ref["val_loss"]


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert invoke(*FAST, "--steps", "3", "--out", str(run)).exit_code == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = invoke("--resume", "--out", str(run), "--json")
    assert res.exit_code == 0, res.output
    assert f"{run} finished its 3 steps already; nothing to resume" in res.stderr
    assert json.loads(res.stdout) == json.loads((run / "summary.json").read_text())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resumed_runs_wall_time_includes_the_earlier_session(tmp_path, monkeypatch):
    from alast.training import loop

    run = tmp_path / "run"
    step = loop._Run.step

    def slow_step(self, *a):  # a second of wall time per step, outside the timed step
        time.sleep(1.0)
        return step(self, *a)

    monkeypatch.setattr(loop._Run, "step", slow_step)
    interrupt_after_step_1(monkeypatch)
    assert invoke(*FAST, "--steps", "3", "--set", "output.checkpoint_every=1", "--out", str(run)).exit_code == 130
    monkeypatch.undo()
    t0 = time.perf_counter()
    assert invoke("--resume", "--out", str(run)).exit_code == 0
    resumed = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    # the first session slept 2 s before its checkpoint: the run's wall time holds it, beyond this session's
    assert summary["resumed_from_step"] == 2 and summary["wall_time_s"] >= resumed + 1.0


def _stopped_after_step_2(data: Path, run: Path, *extra: str) -> None:
    """A 4-step run on the image folder ``data`` left as if killed after step 2's checkpoint."""
    args = [*FAST, "--data", f"imagefolder:{data}", "--steps", "4", "--set", "output.checkpoint_every=2", *extra,
            "--out", str(run)]
    assert invoke(*args).exit_code == 0
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step_00000004.safetensors").unlink()


def test_resume_refuses_an_image_folder_whose_files_changed(tmp_path):
    """The split by data.val_fraction is drawn over the folder's files: one more file moves images
    between training and validation, and the resumed run would train on the ones it validated on."""
    from tests.alast_cli.test_bad_input import make_image_folder

    data, run = make_image_folder(tmp_path / "data"), tmp_path / "run"
    _stopped_after_step_2(data, run, "--set", "output.keep_last=5")
    extra = data / "cat" / "extra.png"
    shutil.copy(data / "cat" / "0.png", extra)
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: cannot resume {run}: the files in ")
    assert "(12 images then, 13 now)" in res.stderr and "restore the folder as it was" in res.stderr
    extra.unlink()
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 0, res.output


def _split_folder(root: Path) -> Path:
    """train/ and val/ folders of three classes (4 and 1 images each)."""
    from PIL import Image

    for split, n in (("train", 4), ("val", 1)):
        for c, colour in zip(("k0", "k1", "k2"), ((200, 0, 0), (0, 200, 0), (0, 0, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), tuple(v // (i + 1) for v in colour)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("change,fragment", [
    # a class renamed: every label index after it would shift, and the run would train on wrong labels
    (lambda d: [(d / s / "k0").rename(d / s / "k9") for s in ("train", "val")],
     ("the data's classes changed since the run started (gone: k0; new: k9): the model's outputs would be read as "
      "other classes")),
    # a class added: the head no longer fits (it was a state-dict size mismatch)
    (lambda d: shutil.copytree(d / "train" / "k1", d / "train" / "k3"), "(new: k3)"),
    # training images added or renamed: the steps after the resume would draw other batches
    (lambda d: shutil.copy(d / "train" / "k1" / "0.png", d / "train" / "k1" / "9.png"),
     "the training files in {data}/train changed since the run started (12 images then, 13 now)"),
    (lambda d: (d / "train" / "k1" / "0.png").rename(d / "train" / "k1" / "8.png"),
     "(12 images then, 12 now, some renamed or moved)"),
])
def test_resume_refuses_train_and_val_folders_that_changed(tmp_path, change, fragment):
    data, run = _split_folder(tmp_path / "data"), tmp_path / "run"
    _stopped_after_step_2(data, run, "--batch-size", "4")
    change(data)
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 2, res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot resume {run}: ") and fragment.format(data=data) in last, last


def test_a_resume_needs_no_longer_the_weights_file_the_run_started_from(tmp_path):
    """The model was rebuilt from model.checkpoint before the run's checkpoint replaced every weight:
    with that file moved away, --resume stopped ("checkpoint not found ... or drop --checkpoint")."""
    first, weights = tmp_path / "first", tmp_path / "w.safetensors"
    assert invoke(*FAST, "--steps", "1", "--out", str(first)).exit_code == 0
    shutil.copy(first / "final_model.safetensors", weights)
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = [*FAST, "--checkpoint", str(weights), "--steps", "4", "--set", "output.checkpoint_every=2"]
    assert invoke(*args, "--out", str(ref)).exit_code == 0
    assert invoke(*args, "--out", str(run)).exit_code == 0
    (run / "summary.json").unlink()  # as if killed after step 2's checkpoint
    (run / "checkpoints" / "step_00000004.safetensors").unlink()
    weights.unlink()
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert losses(run) == losses(ref)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints")  # nothing to resume from: the weights it started from are needed again
    res = invoke("--resume", "--out", str(run))
    assert res.exit_code == 2 and f"checkpoint not found: {weights}" in res.stderr
