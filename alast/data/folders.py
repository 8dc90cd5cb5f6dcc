"""Image folders: the layouts ``imagefolder:PATH`` reads (class folders, or train/val splits under
their common names), and the checks before a run (unreadable files, empty classes, splits mistaken
for classes). ``build_data`` in :mod:`alast.data.datasets` calls :func:`imagefolder`."""
from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from alast.data.common import (
    DataBundle,
    DataError,
    _need_two_classes,
    _split,
    _split_indices,
    files_fingerprint,
    nfc,
    same_files,
    say_once,
)
from alast.data.images import IMG_EXTENSIONS, check_file, failure, read_rgb

# Split folder names, matched in any case and with "-" or a space for "_" (Train/, VAL/, Training Set/).
# Validation is the validation folder, else the test folder (a test folder beside one is not used).
TRAIN_FOLDERS = ("train", "training", "trn", "train_set", "training_set", "trainset", "seg_train")
VAL_FOLDERS = ("val", "valid", "validation", "dev", "eval", "val_set", "validation_set", "valset", "seg_val")
TEST_FOLDERS = ("test", "testing", "tst", "test_set", "testing_set", "testset", "seg_test")
JUNK_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini")  # Windows writes them into image folders
JUNK_FOLDERS = ("__macosx",)  # macOS's zip archives: resource forks (._x.jpg), not images


def _check_images(files: Sequence[str], skip_bad: bool) -> list[int]:
    """Indices of unreadable files (:func:`~alast.data.images.check_file`); raises on the first one
    unless ``skip_bad``.

    ``skip_bad``: every file is decoded (the cheap check passes a file damaged inside its compressed
    data, which would fail when read, mid-run), on a few threads (PIL decodes without the GIL).
    Files over PIL's warning level of pixels are named in one note (PIL's own warning is silenced).
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    threads = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    size = max(1, min(256, -(-len(files) // (threads * 4))))  # files a task: 4 tasks a thread, or more

    def check(start: int) -> list[int | None]:  # pixel counts of files[start:start + size], None: unreadable
        out: list[int | None] = []
        for f in files[start:start + size]:
            try:
                out.append(check_file(f, decode=skip_bad))
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                if not skip_bad:
                    raise DataError(_unreadable(f, exc)) from None
                out.append(None)
        return out

    starts = range(0, len(files), size)
    if skip_bad and threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads) as pool:
            pixels = [n for part in pool.map(check, starts) for n in part]
    else:
        pixels = [n for s in starts for n in check(s)]
    limit = Image.MAX_IMAGE_PIXELS
    large = [(f, n) for f, n in zip(files, pixels) if limit and n is not None and n > limit]
    if large:
        more = f" and {len(large) - 1} other image(s) have" if len(large) > 1 else " has"
        say_once([(f"{large[0][0]}{more} over {limit:,} pixels ({large[0][1]:,}), PIL's decompression-bomb "
                   "warning level; read all the same, slowly and with much memory (resize to train faster)")])
    return [i for i, n in enumerate(pixels) if n is None]


def _unreadable(path: str, exc: BaseException) -> str:
    """The one line for a file the pre-run check refuses: a valid image too large for PIL is not corrupt,
    nor is a link to nothing."""
    from PIL import Image

    if os.path.islink(path) and not os.path.exists(path):
        return (f"{path} is a link to {os.readlink(path)}, which does not exist; remove the link or pass "
                "--skip-bad-images")
    if isinstance(exc, Image.DecompressionBombError):
        return f"{path} has {failure(exc)}; resize it, or pass --skip-bad-images to skip it"
    return f"corrupt or non-image file: {path}; remove it or pass --skip-bad-images"


def load_image(path: str) -> Any:
    """The image file at ``path`` upright and RGB (:func:`~alast.data.images.read_rgb`), for ImageFolder.

    The error names the file, which PIL's "image file is truncated" does not. In an image folder, a
    file that fails here passed the pre-run check: the cheap one (:func:`_check_images` reads a
    JPEG's end and a PNG's chunks, not their pixels) where ``--skip-bad-images`` is off, whose full
    decode would have skipped it; or the file changed since. The error says so, and how a run goes
    on: ``--resume`` refuses a run whose file list changed (a file removed), not a file replaced.
    """
    try:
        return read_rgb(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image {path} ({failure(exc)}); fix or remove the file and run again, or pass "
                        "--skip-bad-images (it decodes every image first and skips such files); to --resume a run, "
                        "replace the file with a readable one of the same name") from None


def _hidden(name: str) -> bool:
    """Not data: hidden (``.ipynb_checkpoints/``, macOS's ``._x.jpg``) or macOS's ``__MACOSX/``."""
    return name.startswith(".") or name.lower() in JUNK_FOLDERS


def _walk(folder: str, loops: list[str]) -> Iterator[str]:
    """The visible files under ``folder`` in torchvision's ImageFolder order, following links to
    folders as it does (``os.walk(followlinks=True)``). A link back to a folder it sits in is not
    followed (``os.walk`` would follow it until the path grew too long) but added to ``loops``: one
    to ``folder``, to a folder above it (the data folder, or higher), or to any folder on the way
    down to the link, or above one of those. Walked one level, such a link would file every other
    class's images under this class."""
    here = os.path.abspath(folder)
    above = {os.path.realpath(p) for p in (here, *Path(here).parents)}  # the folders ``folder`` sits in
    chains = {folder: (os.path.realpath(folder), *above)}
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        chain, keep = chains.pop(root), []
        for d in dirs:
            if _hidden(d):
                continue
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if _leads_back(real, chain):
                loops.append(path)
                continue
            chains[path] = (real, *chain)
            keep.append(d)
        dirs[:] = keep
        found.append((root, sorted(f for f in files if not _hidden(f))))
    for root, files in sorted(found):
        yield from (os.path.join(root, f) for f in files)


def _leads_back(real: str, chain: Sequence[str]) -> bool:
    """Whether the folder ``real`` (resolved) is one of the folders in ``chain`` or holds one."""
    inside = real.rstrip(os.sep) + os.sep
    return any(c == real or c.startswith(inside) for c in chain)


def _class_folders() -> type:
    """:class:`ClassFolders`, defined on first use: importing this module does not import
    torchvision (a second); the module's ``__getattr__`` finds it for pickle (spawned workers)."""
    if "ClassFolders" in globals():
        return globals()["ClassFolders"]
    from torchvision.datasets import ImageFolder

    class ClassFolders(ImageFolder):
        """torchvision's ImageFolder over the visible class folders, their names in NFC (a class
        matches across splits whichever form its folder's name was written in), and the files
        :func:`_walk` finds with an image extension. ``other[c]`` counts class ``c``'s other files by
        extension (Windows' ``Thumbs.db`` and ``desktop.ini`` uncounted); ``loops`` lists the folder
        links not followed."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            names: dict[str, list[str]] = {}
            self.loops = []
            # a class folder that is a link to the data folder or above it would hold every class
            above = [os.path.realpath(p) for p in (directory, *Path(os.path.abspath(directory)).parents)]
            with os.scandir(directory) as entries:
                for e in entries:
                    if not e.is_dir() or _hidden(e.name):
                        continue
                    if e.is_symlink() and _leads_back(os.path.realpath(e.path), above):
                        self.loops.append(e.path)
                        continue
                    names.setdefault(nfc(e.name), []).append(e.name)
            for same in names.values():
                if len(same) > 1:
                    raise DataError(f"{directory} has class folders {' and '.join(map(ascii, same))}, one name in "
                                    "two Unicode forms; merge them")
            self.folders = {c: same[0] for c, same in names.items()}
            classes = sorted(self.folders)
            return classes, {c: i for i, c in enumerate(classes)}

        def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                         is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
            samples, self.other = [], {}
            for c in sorted(class_to_idx):
                other = self.other[c] = Counter()
                for f in _walk(os.path.join(directory, self.folders[c]), self.loops):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        samples.append((f, class_to_idx[c]))
                    elif os.path.basename(f).lower() not in JUNK_FILES:
                        other[os.path.splitext(f)[1].lower() or os.path.basename(f)] += 1
            return samples

    ClassFolders.__qualname__ = "ClassFolders"
    globals()["ClassFolders"] = ClassFolders
    return ClassFolders


def __getattr__(name: str) -> Any:
    if name == "ClassFolders":
        return _class_folders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _subfolders(path: Path) -> list[Path]:
    """The visible folders in ``path``, sorted."""
    try:
        with os.scandir(path) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir() and not _hidden(e.name))
    except OSError:
        return []


def _images_in(path: Path) -> Iterator[os.DirEntry]:
    """The visible image files in ``path`` itself, not in its folders (none where it cannot be read)."""
    try:
        with os.scandir(path) as entries:
            yield from (e for e in entries if not _hidden(e.name) and e.name.lower().endswith(IMG_EXTENSIONS)
                        and e.is_file())
    except OSError:
        return


def _holds_images(path: Path) -> bool:
    """Whether ``path`` holds an image file itself, not only in its folders (stops at the first one)."""
    return next(_images_in(path), None) is not None


def _holds_classes(path: Path) -> bool:
    """Whether ``path`` holds class folders, as a split does: folders, and no image of its own unless
    every folder in it holds images itself (then a stray image beside them, left out with a note)."""
    subs = _subfolders(path)
    return bool(subs) and (not _holds_images(path) or all(_holds_images(s) for s in subs))


def _role(name: str) -> str | None:
    key = nfc(name).casefold().replace("-", "_").replace(" ", "_")
    return next((role for role, names in (("train", TRAIN_FOLDERS), ("val", VAL_FOLDERS), ("test", TEST_FOLDERS))
                 if key in names), None)


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(p.name for p in paths[:4]) + (", ..." if len(paths) > 4 else "")


def _looks_like_splits(folders: Sequence[Path]) -> bool:
    """Whether ``folders`` look like the splits of one dataset rather than classes: none holds an
    image itself, each holds two or more folders whose names mostly recur in the others', and those
    hold their images themselves. Nested classes (``cat/indoor/1.jpg``) name their folders per class,
    or keep images deeper, unless they look exactly like splits (``cat/2019``, ``dog/2019``)."""
    if len(folders) < 2 or any(_holds_images(f) for f in folders):
        return False
    subs = [_subfolders(f) for f in folders]
    names = [{nfc(s.name) for s in sub} for sub in subs]
    if any(len(a & b) < max(2, min(len(a), len(b)) / 2) for a, b in itertools.combinations(names, 2)):
        return False
    return all(_holds_images(s) or not _subfolders(s) for sub in subs for s in sub)


def _split_folders(root: Path, notes: list[str]) -> tuple[Path | None, Path | None] | None:
    """``(train, val)`` where ``root`` is laid out in splits, else None (``root`` holds the classes).

    A split folder is named as in :data:`TRAIN_FOLDERS`, :data:`VAL_FOLDERS` or :data:`TEST_FOLDERS`
    and holds class folders. ``val`` is the validation folder, else the test folder; None: the
    training images are split by ``data.val_fraction``. ``train`` None: there is none (evaluation
    can use ``val``). Split folders without class folders (Kaggle's unlabeled ``test/``) and other
    folders beside the splits are left out, with a note. Folders that look like splits but are named
    otherwise are refused: as classes they would train a model to tell the splits apart.
    """
    roles: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    others = []
    for p in _subfolders(root):
        role = _role(p.name)
        (roles[role] if role else others).append(p)
    for role, found in roles.items():
        if len(found) > 1:
            why = "differ only in case" if len({p.name.lower() for p in found}) == 1 else f"are both {role} folders"
            raise DataError(f"{root} has split folders {' and '.join(p.name for p in found)}, which {why}; "
                            "merge or rename one")
    named = roles["train"] + roles["val"] + roles["test"]
    splits = [p for p in named if _holds_classes(p)]
    train = roles["train"][0] if roles["train"] and roles["train"][0] in splits else None
    if (train is None and others) or (train is not None and others and not roles["val"] + roles["test"]):
        if _looks_like_splits(named + others):
            raise DataError(f"the folders in {root} ({_names(named + others)}) look like splits (each holds the same "
                            "class folders), not classes; point imagefolder: at the training folder, or rename "
                            "them train and val")
        return None  # classes, some maybe named like splits (a "train" among vehicles)
    if roles["train"] and train is None or not splits and named and all(_holds_images(p) for p in named):
        raise DataError(f"{root} holds {_names(named)}, named like split folders but without class folders in "
                        "them; give each split class folders (train/<class>/<image>), or rename the folders if "
                        "they are classes")
    if not splits:
        return None
    val = next((p for p in roles["val"] + roles["test"] if p in splits), None)
    left = [p for p in roles["val"] + roles["test"] if p is not val] + (others if train or val else [])
    for p in left:
        why = f"validation reads {val.name}" if p in splits else \
            "it holds no class folders (unlabeled?)" if p in named else "it is not a split folder"
        notes.append(f"not using {p}: {why}")
    return train, val


def _relabel(ds: Dataset, classes: list[str], drop: set[int] | frozenset[int] = frozenset()) -> None:
    """Give a torchvision ImageFolder ``classes`` (each of its samples' classes among them) as its
    label set, in that order, without the samples at the indices in ``drop``."""
    index = {ds.class_to_idx[c]: classes.index(c) for c in ds.classes if c in classes}
    ds.samples = ds.imgs = [(f, index[t]) for i, (f, t) in enumerate(ds.samples) if i not in drop]
    ds.targets = [t for _, t in ds.samples]
    ds.classes, ds.class_to_idx = list(classes), {c: i for i, c in enumerate(classes)}


def _load_folder(path: Path, transform: Callable, skip_bad: bool, role: str,
                 notes: list[str]) -> tuple[Dataset, list[str], int]:
    """The image folder ``path`` read and checked, its classes, and the unreadable files skipped.

    ``role`` "train": every class needs a readable image; "val" and "eval": an empty class folder
    is fine (a validation split may lack a class) and its class is left out of the classes.
    """
    try:
        ds = _class_folders()(str(path), transform=transform, loader=load_image, allow_empty=True)
    except OSError as exc:
        raise DataError(f"{path} is not an image folder ({exc.strerror or exc}); "
                        "expected PATH/<class>/<image> files") from None
    if not ds.classes:
        raise DataError(f"{path} is not an image folder (no class folder); expected PATH/<class>/<image> files")
    loose = sum(1 for _ in _images_in(path))  # a data folder's images belong in its class folders
    if loose:
        notes.append(f"left out {loose} image(s) in {path} itself, outside any class folder; a class's images go "
                     f"in its folder ({path}/<class>/<image>)")
    other = sum(ds.other.values(), Counter())
    if other:
        kinds = ", ".join(f"{n} {ext}" for ext, n in other.most_common(4)) + (", ..." if len(other) > 4 else "")
        notes.append(f"left out {sum(other.values())} files in {path} that are not images alast reads ({kinds})")
    if ds.loops:
        notes.append(f"not following {len(ds.loops)} link(s) in {path} back to a folder they sit in ({ds.loops[0]})")
    count = Counter(ds.targets)
    empty = [c for c in ds.classes if not count[ds.class_to_idx[c]]]
    if empty and (role == "train" or len(empty) == len(ds.classes)):
        listed = [repr(ds.folders[c]) + (f" (only {', '.join(sorted(ds.other[c])[:3])} files)" if ds.other[c] else "")
                  for c in empty]
        what = "class folder {} holds" if len(empty) == 1 else "class folders {} hold"
        raise DataError(f"{what.format(', '.join(listed[:3]))} no image in {path} "
                        f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
    bad = set(_check_images([s[0] for s in ds.samples], skip_bad))
    readable = Counter(t for i, t in enumerate(ds.targets) if i not in bad)
    lost = [c for c in ds.classes if count[ds.class_to_idx[c]] and not readable[ds.class_to_idx[c]]]
    if lost and role == "train":
        raise DataError(f"class {lost[0]!r} in {path} has no readable image (all {count[ds.class_to_idx[lost[0]]]} "
                        "skipped as unreadable); fix its images or remove its folder")
    classes = ds.classes if role == "train" else [c for c in ds.classes if readable[ds.class_to_idx[c]]]
    _relabel(ds, classes, drop=bad)
    return ds, classes, len(bad)


def imagefolder(root: Path, transform: Callable, val_fraction: float, seed: int, skip_bad: bool,
                 for_eval: bool = False, run_files: dict[str, Any] | None = None) -> DataBundle:
    """The image folder ``root``'s training and validation data (see the module). ``for_eval``: the
    data scores a trained model: a folder of class folders is scored whole, unless it holds the very
    files a run split by ``data.val_fraction`` (``run_files``: the run's fingerprint of them), a copy
    of the run's folder or the folder moved, whose whole would count the images the run trained on:
    then the run's validation split, drawn again."""
    if root.is_file():
        raise DataError(f"{root} is a file, not a folder; pass imagefolder:PATH to a directory of class folders")
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; pass imagefolder:PATH to a directory of class folders")
    notes: list[str] = []
    splits = _split_folders(root, notes)
    train_dir, val_dir = splits if splits is not None else (root, None)
    if for_eval and (val_dir is not None or splits is None):  # every image of the evaluation folder is scored
        where = val_dir or root
        ds, classes, nb = _load_folder(where, transform, skip_bad, "eval", notes)
        files = files_fingerprint(str(where), ds.samples, classes)
        if val_dir is None and same_files(files, run_files):
            train, val = _split(ds, *_split_indices(ds.targets, val_fraction, seed))
            notes.append(f"{where} holds the files the run split by data.val_fraction: scoring its validation split "
                         f"({len(val)} images), not the images it trained on")
            return DataBundle(train, val, classes, nb, notes, files)
        notes.append(f"evaluating on every image in {where} ({len(ds)})")
        return DataBundle(Subset(ds, []), ds, classes, nb, notes)
    if train_dir is None:
        raise DataError(f"{root} has {val_dir.name}/ but no training folder beside it; add {root / 'train'} with "
                        "class folders, or point imagefolder: at a folder of class folders")
    train, classes, nb1 = _load_folder(train_dir, transform, skip_bad, "eval" if for_eval else "train", notes)
    if not for_eval:
        _need_two_classes(classes, str(train_dir))
    if val_dir is None:  # the split moves when files come or go: the run records which files it split
        alone = [c for c, n in sorted(Counter(classes[t] for t in train.targets).items()) if n == 1]
        if alone and not for_eval:
            notes.append(f"class{'es' if len(alone) > 1 else ''} {', '.join(map(repr, alone[:3]))}"
                         f"{', ...' if len(alone) > 3 else ''} {'have' if len(alone) > 1 else 'has'} one image: "
                         "trained on, never validated (a class needs two images to be held out)")
        return DataBundle(*_split(train, *_split_indices(train.targets, val_fraction, seed)), classes, nb1, notes,
                          files_fingerprint(str(train_dir), train.samples, classes), seeded_split=True)
    val, vclasses, nb2 = _load_folder(val_dir, transform, skip_bad, "val", notes)
    unknown = [c for c in vclasses if c not in classes]
    if unknown:
        raise DataError(f"{val_dir} has class folders that {train_dir} lacks ({', '.join(map(repr, unknown[:3]))}"
                        f"{', ...' if len(unknown) > 3 else ''}); a model cannot be validated on classes it "
                        "never trained on: add their training images or remove them")
    _relabel(val, classes)  # train's label indices; a class may have no validation images
    # its own split: files that come or go do not move images; they change the batches a resume draws
    train_files = files_fingerprint(str(train_dir), train.samples, classes)
    return DataBundle(train, val, classes, nb1 + nb2, notes, train_files=train_files)
