"""A disk cache of measured cost models, so a model is profiled once per machine, not once per run.

Profiling measures every distinct block at many token counts (FLOPs, saved bytes, and backward
peaks under torch's MemTracker): seconds on the demo model, minutes on ViT-B. Its result depends
only on the model, its input size and classes, the LoRA setting, the device kind, the library
versions and this package's own code, so a file keyed by all of them is exact: a change in any
of them (a new alast, torch or timm, an edited source file) gives a new key and a fresh profile.

The directory is ``$ALAST_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/alast`` (``~/.cache/alast``);
``ALAST_CACHE_DIR=off`` turns the cache off. A file that cannot be read is measured again and
replaced; a directory that cannot be written is skipped (the run goes on with the measured model).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from planners.costmodel import CostModel, CostModelError, load_cost_model

OFF = "off"
_PACKAGES = ("alast", "planners", "runtimes")


def cache_dir() -> Path | None:
    """Where cost models are cached (None: the cache is off)."""
    env = os.environ.get("ALAST_CACHE_DIR")
    if env is not None and env.strip().lower() == OFF:
        return None
    if env:
        return Path(env).expanduser() / "cost_models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alast" / "cost_models"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of this package's Python sources (what the measurements run through)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions of the libraries a profile measures through (what a cost model's provenance records)."""
    import warnings

    import timm
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import fvcore
    return {"torch": torch.__version__, "timm": timm.__version__, "fvcore": getattr(fvcore, "__version__", "?")}


def cache_key(**parts: Any) -> str:
    """The file name for a profile of ``parts`` (model, size, classes, LoRA, device) with today's
    library versions and code."""
    from planners.costmodel import COST_MODEL_VERSION

    record = {**parts, **library_versions(), "cost_model_version": COST_MODEL_VERSION, "code": code_digest()}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]
    name = str(parts.get("name", "model")).replace("/", "_")
    return f"{name}-{digest}.json"


def read(key: str) -> tuple[CostModel, Path] | None:
    """The cached cost model and its file, or None (off, absent or unreadable)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / key
    try:
        return load_cost_model(path), path
    except CostModelError:  # absent, unreadable, or not a cost model this alast reads
        return None


def write(key: str, cm: CostModel) -> Path | None:
    """Store ``cm`` under ``key`` (atomically: a concurrent reader sees the old file or the new one);
    None where the cache is off or its directory cannot be written."""
    folder = cache_dir()
    if folder is None:
        return None
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        os.close(fd)
        os.replace(cm.save(Path(tmp)), folder / key)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
    return folder / key
