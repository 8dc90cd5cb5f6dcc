"""What a run directory holds, by name, and the checks before a run writes into one.

A run directory: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per step),
``checkpoints/`` (see :mod:`alast.training.checkpoint`), ``summary.json``, ``final_model.safetensors``,
``budgets.png``, optionally ``tensorboard/`` and, for the ort backend, ``ort_artifacts/``.
Nothing else in it is alast's: ``--force`` replaces a run by removing exactly these (other files stay),
and refuses where its folders hold files alast did not write. ``.alast.lock`` marks a run in progress.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from alast.training import checkpoint as ckpt
from alast.training.report import METRICS
from alast.training.tensorboard import TB_DIR

SUMMARY = "summary.json"
CONFIG = "config.yaml"
FINAL_WEIGHTS = "final_model.safetensors"
HEATMAP = "budgets.png"
ORT_DIR = "ort_artifacts"  # runtimes.ort_backend.artifacts.CACHE_DIR, named here without importing onnxruntime
# What a run writes: the files at its top level, and the folders that are wholly its own.
RUN_FILES = (CONFIG, METRICS, SUMMARY, FINAL_WEIGHTS, HEATMAP)
RUN_DIRS = (ckpt.CKPT_DIR, TB_DIR, ORT_DIR)
LOCK = ".alast.lock"  # held (flock) by the process writing the run; holds its pid
# The files alast writes in RUN_DIRS: checkpoints (and older pickles, set-aside and temp ones),
# TensorBoard's event files, and the ort backend's artifact sets (one folder each).
_OWN_IN = {
    ckpt.CKPT_DIR: re.compile(r"^(step_\d{8}\.(safetensors|pt)(\.unreadable)?|\.step_.*\.tmp)$"),
    TB_DIR: re.compile(r"^events\.out\.tfevents\..*"),
}


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of the run in ``run_dir`` if it finished (``summary.json`` is written at its end),
    else None (a run stopped in its final evaluation has its last checkpoint and no summary)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "steps" in summary else None


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, missing, or incompatible)."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM during training; a checkpoint was written first."""

    def __init__(self, step: int, path: Path | None, world_size: int = 1, run_dir: Path | None = None) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {path}")
        self.step, self.path, self.world_size, self.run_dir = step, path, world_size, run_dir

    @property
    def resume_with(self) -> str:
        return resume_options(self.world_size, self.run_dir)


def resume_options(world_size: int, run_dir: Path | str | None = None) -> str:
    """The options that continue a run: a data-parallel run resumes only at its process count, and
    ``--out`` names the run (the interrupted command may have left it to its default)."""
    nproc = "" if world_size == 1 else f" --nproc {world_size}"
    return f"--resume{nproc}" + ("" if run_dir is None else f" --out {shlex.quote(str(run_dir))}")


def checkpoint_run_dir(checkpoint: Path | str | None) -> Path | None:
    """The run directory a checkpoint file is in (``RUN/checkpoints/step_N.safetensors``)."""
    return None if checkpoint is None else Path(checkpoint).parent.parent


def check_run_dir(run_dir: Path, resume: bool, force: bool, config: Path | None = None) -> None:
    """Refuse a run dir that cannot be used as asked; touches nothing. ``config``: the config file
    the run was given, which ``force`` must not replace."""
    if resume:
        if not (run_dir / CONFIG).exists():
            raise RunDirError(f"cannot resume {run_dir}: no {CONFIG} there; start a new run instead")
        _check_writable(run_dir, resume)
        _check_unlocked(run_dir)
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} is a file; choose another --out")
    if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()):
        if not force and not _holds_run(run_dir):  # neither --resume nor --force would take it
            raise RunDirError(f"run dir {run_dir} exists and holds files but no alast run (no run's {CONFIG}); choose another "
                              "--out (a new or empty folder)")
        if not force:
            raise RunDirError(f"run dir {run_dir} exists and is not empty; pass --resume to continue it, "
                              "--force to replace the run in it, or choose another --out")
        _check_replaceable(run_dir, config)
    _check_writable(run_dir, resume)
    if run_dir.is_dir():
        _check_unlocked(run_dir)


def check_outside_data(run_dir: Path, data_spec: str) -> None:
    """Refuse a run dir inside the image folder the run reads (``imagefolder:PATH``): the next run on
    that folder would take the run's folder for a class (or its files for a class's), and the run's
    own files would change the folder its checkpoints record."""
    kind, _, arg = data_spec.partition(":")
    if kind != "imagefolder" or not arg:
        return
    data, out = Path(arg).expanduser().resolve(), run_dir.expanduser().resolve()
    if out == data or data in out.parents:
        raise RunDirError(f"run dir {run_dir} is inside the image folder {arg}: its files would become part of "
                          "the data (a class of their own, or files in one); write the run outside it with --out")


def check_weights_outside(run_dir: Path, checkpoint: Path | None, force: bool) -> None:
    """Refuse ``--force`` where the run's starting weights (``model.checkpoint``) lie in the run dir it
    replaces: the new run would overwrite the file it starts from, and its config would name it."""
    if not force or checkpoint is None or not run_dir.exists():
        return
    out, weights = run_dir.resolve(), Path(checkpoint).expanduser().resolve()
    if out in weights.parents:
        raise RunDirError(f"--checkpoint {checkpoint} is in {run_dir}, the run dir --force would replace; copy it "
                          "out of the run dir and pass the copy, or choose another --out")


def _check_replaceable(run_dir: Path, config: Path | None) -> None:
    """Refuse ``--force`` where it would delete what alast did not write: a file in the run's own
    folders, or the config file given to this very command (the run's ``config.yaml``)."""
    if config is not None and (run_dir / CONFIG).exists() and (run_dir / CONFIG).samefile(config):
        raise RunDirError(f"the config {config} is the {CONFIG} that --force would replace in {run_dir}; "
                          "copy it out of the run dir and pass the copy, or choose another --out")
    named = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_FILES or p.name in RUN_DIRS)
    if named and not _holds_run(run_dir):
        listed = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        raise RunDirError(f"--force replaces a run, but {run_dir} holds none: its {listed} "
                          f"{'was' if len(named) == 1 else 'were'} not written by alast; move "
                          f"{'it' if len(named) == 1 else 'them'} out, or choose another --out")
    foreign = [path.relative_to(run_dir) for folder in RUN_DIRS for path in _foreign_in(run_dir / folder)]
    if foreign:
        listed = ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunDirError(f"--force would delete {listed} in {run_dir}, which alast did not write; move "
                          f"{'it' if len(foreign) == 1 else 'them'} out of the run dir, or choose another --out")


def _holds_run(run_dir: Path) -> bool:
    """Whether an alast run wrote in ``run_dir``: its lock file (every run since it existed makes one),
    or a ``config.yaml`` as a run records it (a mapping with ``policy`` and ``output.dir``)."""
    if (run_dir / LOCK).exists():
        return True
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and "policy" in cfg and isinstance(cfg.get("output"), dict) and "dir" in cfg["output"]


def _foreign_in(folder: Path) -> list[Path]:
    """What in ``folder`` (one of :data:`RUN_DIRS`) is not alast's."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    own = _OWN_IN.get(folder.name)
    if own is None:  # ort_artifacts: a folder per artifact set
        return sorted(p for p in folder.iterdir() if not p.is_dir() or p.is_symlink())
    return sorted(p for p in folder.iterdir() if not own.match(p.name))


def lock_holder(run_dir: Path) -> str | None:
    """The pid recorded by the process that holds ``run_dir``'s lock, "?" where unreadable, or None
    where no process holds it (or locks are not supported here)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: runs are not locked
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def _check_unlocked(run_dir: Path) -> None:
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)


def _in_use(run_dir: Path, holder: str) -> RunDirError:
    return RunDirError(f"run dir {run_dir} is in use by another alast process (pid {holder}); wait for it to "
                       "end or stop it, or choose another --out")


_HELD: dict[Path, int] = {}  # run dir -> the locked file descriptor, while this process writes the run


def lock_run_dir(run_dir: Path) -> None:
    """Mark ``run_dir`` as written by this process until :func:`release_run_dir` (or its exit): a
    second ``alast train --resume`` or ``--force`` on it is refused instead of writing beside it."""
    try:
        import fcntl
    except ImportError:
        return
    key = Path(run_dir).resolve()
    if key in _HELD:
        return
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise _in_use(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Make and lock the run dir; a new run over an existing one (``force``) first removes the old
    run's files. The caller releases the lock (:func:`release_run_dir`) when the run ends."""
    check_run_dir(run_dir, resume, force)
    if not resume:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run dir {run_dir} ({exc.strerror or exc}); "
                              "choose a writable --out") from None
    _probe_write(run_dir, resume)
    lock_run_dir(run_dir)
    if resume:  # temp files of writes killed half-way: the checkpoints' and the run files'
        for stale in [*(run_dir / ckpt.CKPT_DIR).glob(".*.tmp"), *_run_file_temps(run_dir)]:
            stale.unlink(missing_ok=True)
    else:
        if not force and any(p.name != LOCK for p in run_dir.iterdir()):  # another new run got here first
            release_run_dir(run_dir)
            check_run_dir(run_dir, resume, force)
        clear_run(run_dir)


def _is_run_file_temp(name: str) -> bool:
    """Whether ``name`` is a temp file of a :data:`RUN_FILES` write (``.NAME.*.tmp``, and the final
    weights' ``NAME.tmp``)."""
    return name == FINAL_WEIGHTS + ".tmp" or (name.startswith(tuple(f".{n}." for n in RUN_FILES))
                                              and name.endswith(".tmp"))


def _run_file_temps(run_dir: Path) -> list[Path]:
    """The temp files of :data:`RUN_FILES` writes in ``run_dir`` (see :func:`_is_run_file_temp`)."""
    return [p for p in run_dir.iterdir() if p.is_file() and _is_run_file_temp(p.name)]


def clear_run(run_dir: Path) -> None:
    """Remove what alast writes in ``run_dir`` (:data:`RUN_FILES`, :data:`RUN_DIRS`, their temp
    files), so that a new run never resumes from, prunes against or reports the old run's files.
    Anything else in the directory stays."""
    for path in run_dir.iterdir():
        if path.name in RUN_DIRS and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.name in RUN_FILES:
            path.unlink()
    for path in _run_file_temps(run_dir):
        path.unlink()


def is_run_file(run_dir: Path, path: Path) -> bool:
    """Whether ``path`` is, or would be, one of the files a run writes in ``run_dir``: its run files,
    their temp files (a resume removes them as leftovers), its lock, and what its folders hold."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return False
    parts = rel.parts
    return bool(parts) and (parts[0] in RUN_DIRS or (len(parts) == 1 and (
        parts[0] in RUN_FILES or parts[0] == LOCK or _is_run_file_temp(parts[0]))))


def owning_run(path: Path) -> Path | None:
    """The run directory whose own file ``path`` is (a folder holding both ``config.yaml`` and
    ``metrics.jsonl``), or None."""
    parent = Path(path).resolve().parent
    for run_dir in (parent, parent.parent):
        if (run_dir / CONFIG).is_file() and (run_dir / METRICS).is_file() and is_run_file(run_dir, path):
            return run_dir
    return None


def check_out_file(out: Path, force: bool, command: str, example: str, run_dir: Path | None = None,
                   option: str = "--out") -> None:
    """Refuse an ``option`` file of ``command`` that is a directory, that is a file of a run (of
    ``run_dir``, which need not exist yet, or of any run whose folder holds it; always), or that
    exists (unless ``force``)."""
    out = Path(out)
    if out.is_dir():
        raise RunDirError(f"{option} {out} is a directory; give the file to write, e.g. {out / example}")
    owner = run_dir if run_dir is not None and is_run_file(run_dir, out) else owning_run(out)
    if owner is not None:
        raise RunDirError(f"{option} {out} is one of the files of the run {owner}: the run's own files are never "
                          f"written over by {command}; choose another {option}, e.g. {Path(owner) / example}")
    if out.exists() and not force:
        raise RunDirError(f"{option} {out} exists; pass --force to overwrite it, or choose another {option}")


def nearest_existing(path: Path) -> Path:
    """``path``, or the nearest folder above it that exists (where creating it would start)."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def unwritable(folder: Path) -> str | None:
    """Why nothing can be written in the existing ``folder`` (a read-only file system, no write
    permission), or None; touches nothing."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(folder, os.W_OK | os.X_OK):
        return "read-only file system" if read_only else f"no write permission in {folder}"
    return None


def probe_write(folder: Path) -> str | None:
    """Write and remove a temp file in ``folder``; why it failed, or None. For file systems whose
    permissions lie (network, FUSE, /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return str(exc.strerror or exc).lower()
    os.close(fd)
    os.unlink(name)
    return None


def _check_writable(run_dir: Path, resume: bool) -> None:
    """Refuse a run dir on a read-only file system or in a folder without write permission,
    judged on the nearest folder that exists; touches nothing."""
    where = nearest_existing(run_dir)
    if not where.is_dir():
        return  # a file in the way: creating the run dir says so
    why = unwritable(where)
    if why:
        _refuse_unwritable(run_dir, why, resume)


def _probe_write(run_dir: Path, resume: bool) -> None:
    """Write and remove a temp file, so that an unwritable run dir fails here, in one line."""
    why = probe_write(run_dir)
    if why:
        _refuse_unwritable(run_dir, why, resume)


def _refuse_unwritable(run_dir: Path, why: str, resume: bool) -> NoReturn:
    remedy = "make it writable to resume the run there" if resume else "choose a writable --out"
    raise RunDirError(f"cannot write to run dir {run_dir} ({why}); {remedy}")


