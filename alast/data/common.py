"""What every data source shares: the bundle ``build_data`` returns, its error, the stratified split,
and the RGB conversion in front of timm's transforms."""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from alast.data.images import to_rgb

_said: set[str] = set()


def say_once(notes: Sequence[str]) -> None:
    """Each note once per process, on stderr, from the first rank only (every rank builds the data)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for note in notes:
        if note not in _said:
            _said.add(note)
            print(f"note: {note}", file=sys.stderr, flush=True)


def nfc(name: str) -> str:
    """``name`` in Unicode NFC: macOS may write ``café`` as ``cafe`` + a combining accent (NFD)."""
    return unicodedata.normalize("NFC", name)


class DataError(ValueError):
    """The data spec, directory or files are unusable; the message names the problem."""


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    skipped_files: int = 0
    notes: list[str] = field(default_factory=list)  # what was left out, and why: printed once when built
    # an image folder split by data.val_fraction: the files split (:func:`files_fingerprint`), else None
    fingerprint: dict[str, Any] | None = None
    # a train/ folder beside a validation folder: its files (:func:`files_fingerprint`), which a resumed run
    # must find as they were (its steps draw their batches from them), else None
    train_files: dict[str, Any] | None = None
    # the validation split is drawn by train.seed from the dataset under ``train`` (:func:`_split_indices`
    # on all its labels): another seed draws other validation images
    seeded_split: bool = False


def files_fingerprint(folder: str, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> dict[str, Any]:
    """What a split by ``data.val_fraction`` depends on, beside the fraction and seed: ``samples``'
    paths (relative to ``folder``) and classes, in order (``sha256``). Adding, removing or renaming a
    file changes it (the split would move images between training and validation); the file contents
    do not. ``contents`` tells the same names holding other images apart (:func:`same_files`): every
    file's size and the first MiB of :data:`CONTENT_SAMPLES` of them, spread over the list."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(os.fsencode(os.path.relpath(path, folder)) + b"\0" + os.fsencode(classes[label]) + b"\n")
    c = hashlib.sha256()
    for path, _ in samples:
        c.update(b"%d\n" % os.path.getsize(path))
    for i in sorted({k * len(samples) // CONTENT_SAMPLES for k in range(CONTENT_SAMPLES)} if samples else ()):
        with open(samples[i][0], "rb") as f:
            c.update(f.read(1 << 20))
    return {"folder": os.path.abspath(folder), "files": len(samples), "sha256": h.hexdigest(),
            "contents": c.hexdigest()}


CONTENT_SAMPLES = 16  # files whose first MiB :func:`files_fingerprint`'s ``contents`` reads (every file's size too)


def same_files(now: dict[str, Any], recorded: dict[str, Any] | None) -> bool:
    """Whether fingerprint ``now`` is of the files ``recorded`` was: the same names and classes, and the same
    contents where ``recorded`` has them (a run made before contents were fingerprinted: the names alone)."""
    return bool(recorded) and _same_names(now, recorded) and recorded.get("contents") in (None, now.get("contents"))


def _same_names(now: dict[str, Any], recorded: dict[str, Any]) -> bool:
    """Whether two fingerprints list the same files under the same names and classes (the split's inputs)."""
    return (now.get("files"), now.get("sha256")) == (recorded.get("files"), recorded.get("sha256"))


def files_changed(recorded: dict[str, Any] | None, now: dict[str, Any] | None,
                  gone: str = "it is no longer split by data.val_fraction") -> tuple[str, str] | None:
    """Where an image folder's files differ from the ``recorded`` fingerprint of them (None: a run
    made before fingerprints, or data not split from an image folder): the folder and the counts
    then and now, in words (``gone``: why there is no fingerprint now); None where they are the same."""
    if not recorded or not isinstance(recorded, dict):
        return None
    now = now or {}
    if _same_names(now, recorded):
        return None
    folder = now.get("folder") or recorded.get("folder") or "the run's image folder"
    if not now:
        return folder, f"{recorded.get('files')} images then; {gone}"
    counts = f"{recorded.get('files')} images then, {now['files']} now"
    if now.get("files") == recorded.get("files"):  # as many files, under other names or classes
        counts += ", some renamed or moved"
    return folder, counts


def check_fingerprint(recorded: dict[str, Any] | None, bundle: DataBundle) -> None:
    """Refuse to rebuild a run's validation split from an image folder whose files changed since the
    run split it (``recorded``: its fingerprint then; None: a run made before fingerprints, or data
    not split from an image folder): the new split would hold images the run trained on."""
    changed = files_changed(recorded, bundle.fingerprint)
    if changed is None:
        return
    folder, counts = changed
    raise DataError(f"the files in {folder} changed since the run trained ({counts}): its validation split cannot "
                    "be rebuilt, and scoring the folder now would score images the run trained on; restore the "
                    "folder as it was, or score another folder with --data imagefolder:PATH (every image of it "
                    "is scored)")


def _split_indices(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: the same share of every class goes to validation, at least one image of a class
    with two or more, and never its last: every class keeps a training image."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for idx in by_class.values():
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val += perm[:n_val]
        train += perm[n_val:]
    return sorted(train), sorted(val)


def _split(ds: Dataset, train: list[int], val: list[int]) -> tuple[Subset, Subset]:
    """Train and validation subsets of ``ds`` over two shallow copies of it: the same sample list,
    each copy with its own ``transform``, so augmenting training leaves validation unaugmented."""
    return Subset(ds, train), Subset(copy.copy(ds), val)


def _need_two_classes(classes: list[str], where: str) -> None:
    """Refuse fewer than 2 classes: a one-class model is always right, so its accuracy means nothing."""
    if len(classes) < 2:
        has = f"only one class ({classes[0]!r})" if classes else "no class"
        raise DataError(f"{where} has {has}; a classifier needs at least 2 classes: add a class folder")


class RGBTransform:
    """Convert a PIL image to RGB (:func:`~alast.data.images.to_rgb`) before ``transform`` (timm's
    transforms normalise 3 channels)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        if hasattr(img, "convert") and getattr(img, "mode", "RGB") != "RGB":
            img = to_rgb(img)
        return self.transform(img)
