"""What every data source shares: the bundle ``build_data`` returns, its error, the stratified split,
and the RGB conversion in front of timm's transforms."""
from __future__ import annotations

import copy
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from alast.data.images import to_rgb


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


def _split_indices(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: the same share of every class goes to validation."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for idx in by_class.values():
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
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
