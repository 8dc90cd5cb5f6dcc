"""What alast writes: run files with the permissions the umask gives, and an unwritable --out
refused in one line (exit 2) before any work."""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from alast.training import checkpoint as ckpt
from alast.training import rundir
from alast_cli.main import cli
from tests.cli_errors import one_error_line

FAST = ["--steps", "2", "--batch-size", "4", "--set", 'backend.count_flops="off"', "--set", "backend.threads=1",
        "--set", "data.val_fraction=0.05"]  # a small held-out split: the evaluations cost less


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt.atomic_write_text(tmp_path / "a.txt", "x")
        ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=2)
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert mode(ckpt.checkpoint_path(tmp_path, 1)) == 0o666 & ~umask


def test_run_files_follow_the_umask(tmp_path, umask_027):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(run)])
    assert res.exit_code == 0, res.output
    files = ["config.yaml", "summary.json", "metrics.jsonl", "budgets.png", "final_model.safetensors",
             *ckpt.list_checkpoints(run)]
    assert {str(f): oct(mode(run / f)) for f in files} == {str(f): oct(umask_027) for f in files}


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """``tmp_path/romnt``, reported by statvfs as a read-only mount (tests may run as root, for whom
    permission bits do not stop writes)."""
    mnt = tmp_path / "romnt"
    mnt.mkdir()
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        if Path(path).resolve().is_relative_to(mnt):
            return SimpleNamespace(f_flag=st.f_flag | os.ST_RDONLY)
        return st

    monkeypatch.setattr(os, "statvfs", statvfs)
    return mnt


@pytest.mark.parametrize("sub", ["run", "a/b/run", ""])
def test_a_read_only_out_is_refused_in_one_line(read_only, sub):
    out = read_only / sub if sub else read_only
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(out)])
    line = one_error_line(res, 2)
    assert f"cannot write to run dir {out} (read-only file system); choose a writable --out" in line
    assert ".tmp" not in line and list(read_only.iterdir()) == []


def test_resume_in_a_read_only_run_is_refused_in_one_line(read_only):
    (read_only / "config.yaml").write_text("model: {}\ndata: {}\npolicy: {}\ntrain: {}\n")  # a run saves them all
    res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(read_only)])
    line = one_error_line(res, 2)
    assert "read-only file system" in line and "make it writable to resume" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(locked / "run")])
    assert "no write permission" in one_error_line(res, 2)


def test_a_write_that_fails_anyway_is_one_line(tmp_path, monkeypatch):
    """Permissions can lie (network and FUSE file systems): the run dir is written to once before
    the run starts, and a failure there is the same one-line refusal."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(rundir.RunDirError, match=r"cannot write to run dir .*read-only file system.*writable --out"):
        rundir.prepare_run_dir(tmp_path / "run", resume=False, force=False)


def test_force_clears_only_what_alast_wrote(tmp_path):
    run = tmp_path / "run"
    for name in (*rundir.RUN_FILES, "final_model.safetensors.tmp", ".config.yaml.ab12.tmp",
                 "checkpoints/step_00000300.safetensors", "tensorboard/events.out.tfevents.1",
                 "ort_artifacts/full/fingerprint", "notes.txt", "data/config.yaml", ".hidden"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    # a run from before the lock file: its config.yaml, as a run records it, says an alast run wrote there
    (run / "config.yaml").write_text(f"policy:\n  name: alast\noutput:\n  dir: {run}\n")
    rundir.prepare_run_dir(run, resume=False, force=True)
    rundir.release_run_dir(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [".alast.lock", ".hidden", "data", "data/config.yaml", "notes.txt"]


@pytest.mark.parametrize("config", ["precious\n", "train:\n  steps: 9\n"])  # not a run's record of its config
def test_force_replaces_no_file_of_a_folder_that_holds_no_run(tmp_path, config):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text(config)
    (mine / "notes.txt").write_text("mine\n")
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(mine), "--force"])
    one_error_line(res, 2, f"--force replaces a run, but {mine} holds none: its config.yaml was not written by "
                           "alast; move it out, or choose another --out")
    assert (mine / "config.yaml").read_text() == config and sorted(p.name for p in mine.iterdir()) == [
        "config.yaml", "notes.txt"]


def test_a_runs_config_given_back_as_a_config_cannot_replace_another_run(tmp_path):
    """config.yaml recorded `--force` (output.force: true): given to `alast train` as a config for
    another --out, it replaced the run there although no --force was typed."""
    first, other = tmp_path / "first", tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(first), "--force"])
    assert res.exit_code == 0, res.output
    recorded = (first / "config.yaml").read_text()
    assert "force: false" in recorded and f"dir: {first}" in recorded
    res = CliRunner().invoke(cli, ["train", str(first / "config.yaml"), "--out", str(other)])
    one_error_line(res, 2, "exists and holds files but no alast run")
    assert (other / "summary.json").read_text() == "{}"


def test_resume_removes_the_temp_files_of_killed_writes_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    for name in ("config.yaml", ".summary.json.abc123.tmp", "final_model.safetensors.tmp",
                 "checkpoints/.step_00000300.safetensors.xyz.tmp", "checkpoints/step_00000200.safetensors",
                 ".notes.txt.tmp", "notes.txt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    rundir.prepare_run_dir(run, resume=True, force=False)
    rundir.release_run_dir(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [".alast.lock", ".notes.txt.tmp", "checkpoints", "checkpoints/step_00000200.safetensors", "config.yaml",
                    "notes.txt"]


def test_run_dir_names_match_their_writers():
    from alast.training.report import METRICS
    from alast.training.tensorboard import TB_DIR

    artifacts = pytest.importorskip("runtimes.ort_backend.artifacts")
    assert rundir.ORT_DIR == artifacts.CACHE_DIR
    assert METRICS in rundir.RUN_FILES and TB_DIR in rundir.RUN_DIRS and ckpt.CKPT_DIR in rundir.RUN_DIRS


@pytest.mark.parametrize("refused", [["--model", "vit_small_patch16_18x2_224", "--no-pretrained", "--img-size", "32"],
                                     ["--backend", "ort", "--policy", "alast+lora"]])
def test_a_run_refused_at_its_model_or_runtime_touches_no_out_folder(tmp_path, refused):
    """The model and runtime checks come before --out is made or, with --force, an old run cleared."""
    if "ort" in refused:
        pytest.importorskip("onnxruntime.training")
    old = tmp_path / "old"
    for name in ("config.yaml", "summary.json", "final_model.safetensors", "checkpoints/step_00000002.safetensors"):
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_text("x")
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    res = CliRunner().invoke(cli, ["train", *FAST, *refused, "--out", str(old), "--force"])
    one_error_line(res, 2)
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before
    res = CliRunner().invoke(cli, ["train", *FAST, *refused, "--out", str(tmp_path / "new")])
    one_error_line(res, 2)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out", ["data/run1", "data/cat/run1", "default"])
def test_a_run_inside_its_image_folder_is_refused(tmp_path, monkeypatch, out):
    """Its folder would be a class (or its files a class's) of the next run on that folder."""
    from tests.alast_cli.test_bad_input import make_image_folder

    data = make_image_folder(tmp_path / "data")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    if out == "default":  # trained from inside the data folder, with the default runs/<time>-<policy>
        monkeypatch.chdir(data)
        res = CliRunner().invoke(cli, ["train", *FAST, "--data", "imagefolder:."])
    else:
        res = CliRunner().invoke(cli, ["train", *FAST, "--data", f"imagefolder:{data}", "--out", str(tmp_path / out)])
    one_error_line(res, 2, f"is inside the image folder {data}: its files would become part of the data")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into it


def test_force_refuses_to_replace_the_weights_the_run_starts_from(tmp_path):
    """The new run overwrote the final_model.safetensors it started from, and its config named it."""
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, ["train", *FAST, "--out", str(run)]).exit_code == 0
    weights = run / "final_model.safetensors"
    before = weights.read_bytes()
    res = CliRunner().invoke(cli, ["train", *FAST, "--checkpoint", str(weights), "--out", str(run), "--force"])
    one_error_line(res, 2, f"--checkpoint {weights} is in {run}, the run dir --force would replace")
    assert weights.read_bytes() == before
