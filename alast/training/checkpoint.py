"""Run-directory files written safely (temp file, fsync, rename) and checkpoints that cannot run code.

A checkpoint is one file, ``checkpoints/step_XXXXXXXX.safetensors`` (``XXXXXXXX`` = steps
completed): the state's tensors as safetensors, and everything else (step, planner, counters,
config, optimizer param groups, RNG tuples) as JSON in the same file's header metadata, built by
:mod:`alast.training.safe_state`. One file, because one atomic rename then makes the whole
checkpoint appear or not (the primitive every run-directory file uses), a kill or a full disk can
leave at most a ``.step_*.tmp`` file (removed on resume), and pruning stays one unlink.

Reading never unpickles: ``step_*.pt`` files (torch.save pickles from older alast, or planted)
are refused by name and never opened, and a ``.safetensors`` name holding anything else fails to
parse. Resume takes the newest readable checkpoint, says which newer ones it skipped and why, and
refuses (:class:`CheckpointRefused`, exit 2) when checkpoints exist but none is readable.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CKPT_DIR = "checkpoints"
FALL_BACK = "delete it to fall back to an older one"  # the remedy, where resume has not fallen back itself
SUFFIX = ".safetensors"
FORMAT = "alast-checkpoint"
VERSION = 1
_CKPT_RE = re.compile(r"^step_(\d{8})\.safetensors$")
_LEGACY_RE = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a safe-format checkpoint is unreadable (truncated)."""


class CheckpointRefused(ValueError):
    """A checkpoint alast will not read (not the safe format), or no checkpoint it can resume from."""


def file_mode() -> int:
    """The permissions ``open()`` gives a new file under the current umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, fsynced, renamed over it. The file
    gets the permissions a plainly created one would (mkstemp's own 0600 would make it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}{SUFFIX}"


def encode_checkpoint(payload: dict[str, Any]) -> bytes:
    """``payload`` as safetensors bytes: its tensors, and the rest as JSON metadata."""
    from safetensors.torch import save

    from alast.training.safe_state import flatten

    tensors, tree = flatten(payload)
    state = json.dumps(tree, separators=(",", ":"))
    return save(tensors, metadata={"format": FORMAT, "version": str(VERSION), "state": state})


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step_XXXXXXXX.safetensors`` (``step`` = steps completed), prune old ones."""
    path = checkpoint_path(run_dir, step)
    atomic_write_bytes(path, encode_checkpoint(payload))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def _listed(run_dir: Path, pattern: re.Pattern) -> list[Path]:
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if pattern.match(p.name)]
    return sorted(found, key=lambda p: int(pattern.match(p.name).group(1)))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Safe-format checkpoints, oldest first."""
    return _listed(run_dir, _CKPT_RE)


def looks_complete(path: Path) -> bool:
    """Whether the safetensors file ``path`` is as long as its header says (its header read alone, not
    its tensors): a cheap test that a checkpoint was not truncated, for naming the one a resume would
    continue from (:func:`latest_checkpoint` reads each one whole)."""
    try:
        with Path(path).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return Path(path).stat().st_size == 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def legacy_checkpoints(run_dir: Path) -> list[Path]:
    """``step_*.pt`` pickles (older alast): listed so resume can name them, never opened."""
    return _listed(run_dir, _LEGACY_RE)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in ``path``; never unpickles (a ``.pt`` file is refused unopened)."""
    path = Path(path)
    if not _CKPT_RE.match(path.name):
        raise CheckpointRefused(f"{path} is not a safe checkpoint ({_why_not_safe(path)}); alast only reads "
                                f"step_XXXXXXXX{SUFFIX} checkpoints, never pickles, because loading one can run code")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as exc:  # noqa: BLE001 - safetensors has its own error types for garbled files
        sniffed = _sniff(path)
        if sniffed:
            raise CheckpointRefused(f"{path} is {sniffed}, not a safe checkpoint; alast never unpickles "
                                    "checkpoints because loading one can run code") from None
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}); it may be truncated: "
                              f"{FALL_BACK}") from None
    return _decode(path, meta, tensors)


def _decode(path: Path, meta: dict[str, str], tensors: dict[str, Any]) -> dict[str, Any]:
    from alast.training.safe_state import unflatten

    if meta.get("format") != FORMAT:
        raise CheckpointRefused(f"{path} is a safetensors file but not an alast checkpoint (no format tag)")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}, this alast reads "
                              f"{VERSION}; resume it with the alast that wrote it")
    try:
        state = unflatten(json.loads(meta["state"]), tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt (its state is not a mapping)")
    return state


def _sniff(path: Path) -> str:
    """What a file that is not safetensors looks like (to say so), from its first bytes only."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "a torch.save (zip + pickle) file"
    if head[:1] == b"\x80":
        return "a pickle"
    return ""


def _why_not_safe(path: Path) -> str:
    return _sniff(path) or ("a torch.save pickle from an older alast" if _LEGACY_RE.match(path.name)
                            else "not named like one")


UNREADABLE = ".unreadable"  # suffix of a checkpoint resume set aside


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None, set_aside: bool = False
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable safe checkpoint, or None if there is no checkpoint at all.

    Newer files that cannot be used (truncated, or ``.pt`` pickles, which are never opened) are
    skipped and reported through ``warn``; if checkpoints exist but none is readable, resuming is
    refused (:class:`CheckpointRefused`) rather than silently restarting from step 0. With
    ``set_aside`` (the resuming run's main process) a skipped unreadable checkpoint is renamed with
    :data:`UNREADABLE` appended: kept for its owner, but no longer one of the newest that pruning
    keeps, so the readable one the run resumed from is not pruned in its place.
    """
    def step_of(p: Path) -> tuple[int, bool]:
        m = _CKPT_RE.match(p.name)
        return (int(m.group(1)), True) if m else (int(_LEGACY_RE.match(p.name).group(1)), False)

    skipped: list[str] = []
    candidates = sorted(list_checkpoints(run_dir) + legacy_checkpoints(run_dir), key=step_of, reverse=True)
    unreadable: list[Path] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except (CheckpointError, CheckpointRefused) as exc:
            skipped.append(str(exc).removesuffix(f": {FALL_BACK}"))
            if isinstance(exc, CheckpointError) and _CKPT_RE.match(path.name):
                unreadable.append(path)
            continue
        for reason in skipped if warn else ():
            warn(f"skipped a newer checkpoint: {reason}; resuming from {path.name}")
        for bad in unreadable if set_aside else ():
            bad.replace(bad.with_name(bad.name + UNREADABLE))
            if warn:
                warn(f"renamed {bad.name} to {bad.name + UNREADABLE}, so that pruning keeps the readable ones")
        return path, state
    if skipped:
        ckpt_dir = Path(run_dir) / CKPT_DIR
        raise CheckpointRefused(f"cannot resume {run_dir}: {skipped[0]}; no older readable checkpoint in "
                                f"{ckpt_dir}. Start a new run with another --out (or remove {ckpt_dir} to "
                                "restart this run from step 0)")
    return None
