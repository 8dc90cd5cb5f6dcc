"""torchvision datasets (``torchvision:NAME`` with ``--data-dir``): the dataset class, its split and
subset names, and its labels and class names wherever the class keeps them. ``build_data`` in
:mod:`alast.data.datasets` calls :func:`torchvision_data`."""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from alast.data.common import DataBundle, DataError, RGBTransform, _need_two_classes, _split, _split_indices
from alast.data.folders import imagefolder, load_image
from alast.data.images import first_line

# (training, validation) splits of torchvision datasets where "train" and "test" do not both fit, or
# where the standard protocol trains on more (FGVCAircraft's train + val); others with a split argument
# use "train" and "test", or else the first of _TV_TRAIN and _TV_VAL that they accept.
_TV_SPLITS = {"FGVCAircraft": ("trainval", "test"), "OxfordIIITPet": ("trainval", "test"),
              "Places365": ("train-standard", "val"), "ImageNet": ("train", "val"), "Imagenette": ("train", "val")}
_TV_TRAIN = ("train", "trainval", "train-standard", "training")
_TV_VAL = ("test", "val", "valid", "validation")
_TV_BASES = ("VisionDataset", "DatasetFolder")  # generic bases: they need a loader and a layout
# attributes that hold a torchvision dataset's class names, then its labels (ints, or pairs ending in one)
_NAME_ATTRS = ("classes", "categories")
_LABEL_ATTRS = ("targets", "_labels", "labels", "y", "_samples", "samples")


def _torchvision_class(name: str) -> type:
    """The torchvision dataset class ``name``, or the nearest names in the error."""
    import torchvision.datasets as tvd

    if name in _TV_BASES:
        raise DataError(f"torchvision:{name} is a base class, not a dataset; for a folder of class folders use "
                        "imagefolder:PATH")
    names = {n.lower(): n for n in getattr(tvd, "__all__", dir(tvd)) if isinstance(getattr(tvd, n, None), type)}
    if name not in names.values():
        near = [names[name.lower()]] if name.lower() in names else \
            [names[n] for n in difflib.get_close_matches(name.lower(), list(names), n=3, cutoff=0.75)]
        hint = f"did you mean {' or '.join(near)}? (names are case-sensitive)" if near else \
            "e.g. Flowers102, CIFAR100, Food101"
        raise DataError(f"unknown torchvision dataset {name!r}; {hint}")
    return getattr(tvd, name)


def _valid_values(exc: ValueError, argument: str) -> list[str] | None:
    """The values torchvision's ``verify_str_arg`` lists for ``argument`` in ``exc``, else None."""
    found = re.search(rf"for argument {argument}\. Valid values are \{{(.*)\}}", str(exc))
    return [v.strip(" '\"") for v in found.group(1).split(",")] if found else None


def torchvision_data(name: str, data_dir: Path | None, download: bool, transform: Callable, val_fraction: float,
                 seed: int, skip_bad: bool = False, splits: dict[str, str | None] | None = None,
                 for_eval: bool = False) -> DataBundle:
    """torchvision's dataset ``name`` under ``data_dir``: its own splits where it has them (``splits``:
    ``train_split``, ``val_split`` and ``subset`` from the data config, None: automatic), else split
    by ``val_fraction``. ``ImageFolder`` is read as ``imagefolder:DATA_DIR``, with its checks."""
    cls = _torchvision_class(name)
    if data_dir is None:
        raise DataError(f"torchvision:{name} needs --data-dir (where the dataset lives or should be downloaded)"
                        + ("; or pass imagefolder:PATH" if name == "ImageFolder" else ""))
    splits = {k: v for k, v in (splits or {}).items() if v is not None}
    if name == "ImageFolder":
        refuse_settings(splits, f"torchvision:{name}")
        return imagefolder(Path(data_dir).expanduser(), transform, val_fraction, seed, skip_bad, for_eval)
    tv = _TorchvisionSplits(cls, name, str(data_dir), download, RGBTransform(transform), splits)
    if for_eval:  # only the split that is scored; all of a dataset without splits
        train = val = tv.split(False)
    elif tv.has_splits:
        train, val = tv.split(True), tv.split(False)
    else:
        full = tv.make(True, None)
        labels = labels_of(full)
        labels = labels if labels is not None else [full[i][1] for i in range(len(full))]
        train, val = _split(full, *_split_indices(labels, val_fraction, seed))
    classes = _class_names(train, name)
    if not for_eval:
        _need_two_classes(classes, f"torchvision:{name} under {data_dir}")
    return DataBundle(Subset(val, []) if for_eval else train, val, classes,
                      seeded_split=not for_eval and not tv.has_splits)


def _remove_if_no_files(root: Path) -> None:
    """Remove ``root`` (which a failed download created) where it holds folders alone, no file."""
    if root.is_dir() and not any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
        for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        root.rmdir()


class _TorchvisionSplits:
    """The splits of torchvision dataset class ``cls`` (named ``name``) under ``root``: the arguments
    it takes, the split names to pass, and one line for each error torchvision raises.

    A ``split`` argument beside ``train`` names a subset (EMNIST's ``letters``): ``data.subset``.
    Split names: ``splits`` (``train_split``, ``val_split``), else :data:`_TV_SPLITS`, else "train"
    and "test", else the first of :data:`_TV_TRAIN` and :data:`_TV_VAL` that the dataset accepts.
    """

    def __init__(self, cls: type, name: str, root: str, download: bool, transform: Callable,
                 splits: dict[str, str]) -> None:
        self.cls, self.name, self.root, self.download, self.transform = cls, name, root, download, transform
        self.params, self.splits = _init_params(cls), splits
        self.has_subset = "train" in self.params and "split" in self.params
        self.has_split = "split" in self.params and not self.has_subset
        self.has_splits = self.has_split or "train" in self.params
        needs = [k for k, v in self.params.items() if k not in ("self", "root") and v.default is v.empty
                 and v.kind != v.VAR_POSITIONAL and not (self.has_subset and k == "split")]
        if "root" not in self.params:
            raise DataError(f"torchvision:{name} reads no files (it takes no root); for noise images use random:N")
        if needs:
            raise DataError(f"torchvision:{name} needs {', '.join(needs)}, which alast does not pass; alast reads "
                            "image-classification datasets (root, train or split, download)")
        refuse_settings({k: v for k, v in splits.items()
                          if (k == "subset") != self.has_subset or not (self.has_split or self.has_subset)},
                         f"torchvision:{name}")
        if self.has_subset and "subset" not in splits:
            choices = getattr(cls, "splits", None)
            raise DataError(f"torchvision:{name} needs a subset: --set data.subset=NAME"
                            + (f" (one of {', '.join(choices)})" if choices else ""))

    def make(self, train: bool, split: str | None) -> Dataset:
        kw: dict[str, Any] = dict(root=self.root, transform=self.transform)
        if "download" in self.params:
            kw["download"] = self.download
        if "loader" in self.params:  # 16-bit and palette images read right, photos upright
            kw["loader"] = load_image
        if "train" in self.params:
            kw["train"] = train
        if split is not None:
            kw["split"] = split
        created = not Path(self.root).exists()
        try:
            return self.cls(**kw)
        except (RuntimeError, FileNotFoundError) as exc:  # "Dataset not found or corrupted...", USPS's missing file
            if "download" not in self.params:
                hint = f" (torchvision cannot download {self.name})"
            else:
                hint = "" if self.download else " or let `alast train` fetch it with --set data.download=true (needs internet)"
            raise DataError(f"torchvision:{self.name} not found under {self.root} ({first_line(exc)}); "
                            f"put it there{hint}") from None
        except OSError as exc:  # the download: no network, a proxy, a server gone (URLError, socket errors)
            if not self.download:
                raise
            if created:
                _remove_if_no_files(Path(self.root))
            raise DataError(f"could not download torchvision:{self.name} ({first_line(exc)}); download it where the "
                            f"internet is reachable and put its files under {self.root} as torchvision lays them "
                            "out, then run without data.download") from None
        except ImportError as exc:  # LSUN reads lmdb files
            package = (exc.name or "").split(".")[0]
            raise DataError(f"torchvision:{self.name} needs the Python package {package or first_line(exc)}; "
                            f"install it (pip install {package or '...'})") from None
        except TypeError as exc:  # arguments this dataset does not take as alast passes them
            raise DataError(f"torchvision:{self.name} cannot be read by alast ({first_line(exc)}); alast reads "
                            "image-classification datasets (root, train or split, download)") from None

    def split(self, train: bool) -> Dataset:
        """The training or validation split (a dataset with a train flag or without splits: ``make``'s)."""
        key = "subset" if self.has_subset else "train_split" if train else "val_split"
        if not (self.has_split or self.has_subset):
            return self.make(train, None)
        name = self.splits.get(key) or _TV_SPLITS.get(self.name, ("train", "test"))[0 if train else 1]
        try:
            return self.make(train, name)
        except DataError:
            raise
        except ValueError as exc:  # torchvision's "Unknown value 'train' for argument split. Valid values are {...}"
            valid = _valid_values(exc, "split")
            if valid is None:
                raise DataError(f"torchvision:{self.name} under {self.root}: {first_line(exc)}") from None
            chosen = None if key in self.splits else \
                next((v for v in (_TV_TRAIN if train else _TV_VAL) if v in valid), None)
            if chosen is None:
                raise DataError(f"torchvision:{self.name} has no {'subset' if self.has_subset else 'split'} "
                                f"{name!r}; set data.{key} to one of {', '.join(valid)}") from None
            return self.make(train, chosen)


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    """The arguments ``cls`` takes, its bases' too where its ``__init__`` passes ``**kwargs`` on
    (EMNIST: ``root, split, **kwargs`` to MNIST's ``train``, ``download``)."""
    params: dict[str, inspect.Parameter] = {}
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        own = inspect.signature(base.__init__).parameters
        params.update({k: v for k, v in own.items() if k not in params and v.kind != v.VAR_KEYWORD})
        if not any(v.kind == v.VAR_KEYWORD for v in own.values()):
            break
    return params


def refuse_settings(settings: dict[str, str], what: str) -> None:
    """Refuse a split or subset name (``data.train_split``, ...) set for data that takes none."""
    if settings:
        key = next(iter(settings))
        raise DataError(f"data.{key} does not apply to {what} (it takes no {'subset' if key == 'subset' else 'split'} "
                        "name); unset it")


def labels_of(ds: Dataset) -> list[int] | None:
    """A dataset's labels from the first of :data:`_LABEL_ATTRS` that holds them: ints (``targets``:
    this project's datasets, image folders and most of torchvision's; SVHN's and SEMEION's ``labels``,
    Caltech101's ``y``), or pairs whose second item is the label (GTSRB's and FER2013's ``_samples``);
    None where none does."""
    for attr in _LABEL_ATTRS:
        values = getattr(ds, attr, None)
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (list, tuple)) or not values:
            continue
        if all(isinstance(v, (tuple, list)) and len(v) == 2 for v in values):
            values = [v[1] for v in values]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return list(values)
    return None


def _class_names(ds: Dataset, name: str) -> list[str]:
    """The class names of torchvision dataset ``ds``, or ``0..N-1`` from its labels."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    for attr in _NAME_ATTRS:
        names = getattr(ds, attr, None)
        if isinstance(names, (list, tuple)) and names:
            return [str(c) for c in names]
    labels = labels_of(ds)
    if labels is None:
        raise DataError(f"cannot tell the classes of torchvision:{name}: it has none of the attributes "
                        f"{', '.join(_NAME_ATTRS + _LABEL_ATTRS)}")
    return [str(i) for i in range(max(labels) + 1)]
