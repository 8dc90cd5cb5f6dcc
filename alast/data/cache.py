"""The decoded-image cache (``data.cache``): each image is read, decoded and transformed once.

Without augmentation, the transform an image goes through (timm's eval transform: resize, centre
crop, to tensor, normalise) gives the same tensor at every read. Reading it again every epoch costs
the JPEG decode and the resize each time: about 290 images/s per CPU core for 500x375 photos at
224 px (``python benchmarks/data_speed.py``), far below what a GPU step consumes, so a GPU run would
wait for its images whatever its FLOPs. :class:`DecodedCache` keeps each transformed image, as it is
first read, in 8 bits: the transformed tensor is ``(p / 255 - mean) / std`` of the resized image's
bytes ``p``, so ``p`` is recovered exactly and a read recomputes the same float32 tensor, bit for
bit (checked on every image it stores; an image whose tensor does not round-trip is never stored
and is transformed at every read instead). A batch from the cache is one gather and one
normalisation; for a CUDA device the batch is passed on in 8 bits (:class:`Pixels`) and normalised
there (:class:`runtimes.images.DeviceImages`), so the host copies a quarter of the bytes and does no
float work. On the CPU the normalisation stays in the loader (in the workers, where there are any).

With DataLoader workers the cache lives in shared memory, allocated before the workers start, so
an image one worker decodes serves every worker after it.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import numbers
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from alast.data.common import DataError, say_once
from runtimes.images import Pixels, as_float, normalise

AUTO_SHARE = 0.25  # data.cache=auto: at most this share of the memory available when the data loads
NOTE_BYTES = 256 << 20  # a cache this large is announced in a note
UNKNOWN_MEMORY_BYTES = 1 << 30  # data.cache=auto where the memory available cannot be read: at most this
SHM = "/dev/shm"  # where torch's shared memory lives on Linux (DataLoader workers)


class CacheError(DataError):
    """``data.cache=true`` cannot be honoured (one line: what does not fit, and what to do)."""


class CachedBatch(tuple):
    """A batch :class:`DecodedCache` assembled itself, ``(images, labels)``: :func:`collate` passes it on."""


def collate(batch: Any) -> Any:
    """The DataLoader's ``collate_fn``: a :class:`CachedBatch` as it is, anything else as torch collates it.
    Module-level, so it pickles for spawned workers."""
    return tuple(batch) if isinstance(batch, CachedBatch) else default_collate(batch)


class DecodedCache(Dataset):
    """``ds`` (items ``(image [C, H, W] float32, label)``, its transform deterministic), each image
    kept as 8-bit pixels once read (module docstring). ``shape`` is the transformed images' ``[C, H,
    W]``; ``mean`` and ``std`` the transform's normalisation. Storage is allocated by
    :meth:`allocate`, in the training process before a DataLoader starts its workers."""

    def __init__(self, ds: Dataset, shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.ds, self.shape = ds, tuple(int(s) for s in shape)
        self.norm = tuple(float(m) for m in mean), tuple(float(s) for s in std)  # a batch's Pixels carry them
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.pixels: torch.Tensor | None = None
        self.eight_bit = False  # a batch of stored images as Pixels (for a device that normalises), else float32
        self.labels = torch.zeros(0, dtype=torch.int64)
        self.state = torch.zeros(0, dtype=torch.int8)  # per image: 0 not read, 1 stored, 2 read every time
        self._lock: Any = None  # with workers: orders the marks after the pixels (:meth:`allocate`)

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        """The pixels' bytes once every image is stored."""
        c, h, w = self.shape
        return len(self) * c * h * w

    @property
    def stored(self) -> int:
        """How many images are stored."""
        return int((self.state == 1).sum()) if self.pixels is not None else 0

    def allocate(self, shared: bool) -> None:
        """Make the storage (once); ``shared``: in shared memory, for DataLoader workers."""
        if self.pixels is not None and (not shared or self.pixels.is_shared()):
            return
        n = len(self)
        if self.pixels is None:
            self.pixels = torch.empty((n, *self.shape), dtype=torch.uint8)
            self.labels = torch.zeros(n, dtype=torch.int64)
            self.state = torch.zeros(n, dtype=torch.int8)
        if shared:
            for t in (self.pixels, self.labels, self.state):
                t.share_memory_()
            # a worker marks an image stored under this lock after writing its pixels, and a worker
            # reads the marks under it: it never sees a mark before the pixels (CPUs may reorder stores)
            self._lock = multiprocessing.get_context().Lock()

    def _marks(self) -> Any:
        return self._lock if self._lock is not None else contextlib.nullcontext()

    def __getitem__(self, i: int):
        images, labels = collate(self.__getitems__([i]))
        return as_float(images)[0], labels[0].item() if isinstance(labels, torch.Tensor) else labels[0]

    def __getitems__(self, indices: Sequence[int]) -> CachedBatch | list:
        """The batch of ``indices``, the images not yet stored read from ``ds`` (and stored): a
        :class:`CachedBatch` of float32 images (of :class:`Pixels` with ``eight_bit``, where every
        image is stored now; a device normalises them where it trains), or, where an image read now
        is not one it could have stored (another shape, a label that is not a class index), the
        items as read, for torch to collate."""
        if self.pixels is None:
            self.allocate(shared=False)
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        with self._marks():
            states = self.state[idx].tolist()
        read = {}  # batch position -> the item read from ds now
        every = True  # every image of the batch stored (before, or now)
        for j, (i, state) in enumerate(zip(idx.tolist(), states)):
            if state == 1:
                continue
            read[j] = x, y = self.ds[i]
            every = (self._store(i, x, y) if state == 0 else state) == 1 and every
        if len(read) == len(idx):  # nothing stored before (a first epoch): the items as read
            return [read[j] for j in range(len(idx))]
        if not all(self._fits(x, y) for x, y in read.values()):
            return [read[j] if j in read else self.ds[i] for j, i in enumerate(idx.tolist())]
        if self.eight_bit and every:
            return CachedBatch((Pixels(self.pixels[idx], *self.norm), self.labels[idx]))  # type: ignore[index]
        images = normalise(self.pixels[idx], self.mean, self.std)  # type: ignore[index]
        labels = self.labels[idx]
        for j, (x, y) in read.items():
            images[j], labels[j] = x, int(y)
        return CachedBatch((images, labels))

    def _fits(self, x: Any, y: Any) -> bool:
        """Whether an item has the tensor and the label this cache stores: float32 ``shape``, a class index."""
        label = isinstance(y, numbers.Integral) or isinstance(y, torch.Tensor) and y.ndim == 0 and not y.is_floating_point()
        return label and isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == self.shape

    def _store(self, i: int, x: Any, label: Any) -> int:
        """Store image ``i``, read as ``x``, where its tensor round-trips through 8 bits (state 1), else
        mark it to be read at every use (state 2); returns the state. One image at a time: measured
        faster than a batch, whose temporaries each take fresh pages."""
        state = 2
        if self._fits(x, label):
            p = x.mul(self.std).add_(self.mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
            if torch.equal(normalise(p, self.mean, self.std), x):
                self.pixels[i] = p  # type: ignore[index]
                self.labels[i] = int(label)
                state = 1
        with self._marks():
            self.state[i] = state
        return state


@dataclass(frozen=True)
class CachePlan:
    """What :func:`plan_cache` decided: the datasets to cache and the note to print (None: nothing)."""

    train: bool
    val: bool
    nbytes: int
    note: str | None = None


def available_memory() -> int | None:
    """Bytes of memory available now: Linux's MemAvailable, else the free pages, else half the
    physical memory (macOS); None where none of them can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    for name, share in (("SC_AVPHYS_PAGES", 1), ("SC_PHYS_PAGES", 2)):
        try:
            return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE") // share
        except (ValueError, OSError, AttributeError):
            continue
    return None


def shared_memory_free() -> int | None:
    """Free bytes where torch puts shared memory (Linux ``/dev/shm``; None elsewhere)."""
    try:
        return shutil.disk_usage(SHM).free
    except OSError:
        return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def plan_cache(mode: bool | str, train_bytes: int | None, val_bytes: int, workers: int, processes: int,
               available: int | None, shm_free: int | None) -> CachePlan:
    """Whether to cache the training images (``train_bytes``; None: they are augmented, so never) and
    the validation images, under ``data.cache`` ``mode`` ("auto", True, False), with ``processes``
    training processes on this machine each holding its own cache, ``available`` bytes of memory
    and ``shm_free`` bytes of shared memory for ``workers`` (None: not known). True raises
    :class:`CacheError` where the cache cannot fit; "auto" leaves it out with a note."""
    if mode is False:
        return CachePlan(False, False, 0)
    nbytes = (train_bytes or 0) + val_bytes
    total = nbytes * processes
    per = f" ({processes} processes, one cache each)" if processes > 1 else ""
    what = f"the decoded images take {_size(total)}{per}"
    if available is None and mode == "auto" and total > UNKNOWN_MEMORY_BYTES:
        return CachePlan(False, False, 0, f"not caching the decoded images: {what}, and the memory available is "
                                          "not known here (data.cache=true caches anyway)")
    if available is not None and total > (available if mode is True else AUTO_SHARE * available):
        if mode is True:
            raise CacheError(f"data.cache=true: {what}, more than the {_size(available)} of memory available; set "
                             "data.cache=false, or lower model.img_size")
        return CachePlan(False, False, 0, f"not caching the decoded images: {what}, more than a quarter of the "
                                          f"{_size(available)} of memory available (data.cache=true caches anyway)")
    if workers and shm_free is not None and total > shm_free:
        msg = (f"{what}, more than the {_size(shm_free)} free in {SHM}, where DataLoader workers share them")
        if mode is True:
            raise CacheError(f"data.cache=true: {msg}; enlarge {SHM} (docker run --shm-size), set "
                             "data.num_workers=0, or set data.cache=false")
        return CachePlan(False, False, 0, f"not caching the decoded images: {msg}")
    note = None
    if total >= NOTE_BYTES:
        note = (f"keeping the decoded images in memory as they are first read, up to {_size(total)}{per} "
                "(data.cache=false: never)")
    return CachePlan(train_bytes is not None, True, nbytes, note)


_SHARED: dict[str, dict[str, DecodedCache]] | None = None  # inside shared_between_runs: the caches, by data key


@contextlib.contextmanager
def shared_between_runs() -> Iterator[None]:
    """Runs inside it (those of one ``alast bench``) share their decoded images: a run whose data
    have the key of an earlier run's (:func:`cache_bundle`'s ``key``: everything that makes the data
    sets, so the same images in the same order) takes over that run's caches instead of reading
    every image again. One key's caches are kept at a time: a run on other data (another seed's
    split) releases them first. Outside it, every run has its own caches."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def _take_over(ds: Dataset, earlier: DecodedCache | None) -> Dataset | DecodedCache:
    """``ds`` behind the storage of ``earlier``, a cache of the same images (``ds`` itself where
    there is none)."""
    if earlier is None:
        return ds
    cache = DecodedCache(ds, earlier.shape, *earlier.norm)
    cache.pixels, cache.labels, cache.state, cache._lock = earlier.pixels, earlier.labels, earlier.state, earlier._lock
    return cache


def _can_take_over(earlier: dict[str, DecodedCache], bundle: Any, workers: int) -> bool:
    """Whether a run with ``workers`` may take over ``earlier`` for ``bundle``: the same number of
    images in each data set, and storage in shared memory where there are workers (moving it there
    could overfill ``/dev/shm``, which only a new plan checks)."""
    parts = {"train": bundle.train, "val": bundle.val}
    return all(len(parts[part]) == len(c) and (not workers or c.pixels is None or c.pixels.is_shared())
               for part, c in earlier.items())


def cache_bundle(bundle: Any, mode: bool | str, augment: bool, workers: int, data_cfg: dict[str, Any],
                 processes: int = 1, in_flight: int = 0, key: str | None = None) -> Any:
    """``bundle`` (a :class:`~alast.data.common.DataBundle`) with its datasets behind a
    :class:`DecodedCache` where :func:`plan_cache` says so; the training images only without
    ``augment``. ``data_cfg``: timm's data config, whose transform gives ``input_size`` images
    normalised by ``mean`` and ``std`` (an image it does not give so is never stored).
    ``in_flight``: the shared memory the workers' batches take, which the cache must leave them.
    ``key``: what identifies the data (inside :func:`shared_between_runs`, the caches of an
    earlier run with the same key are taken over, where they sit in the memory ``workers`` need)."""
    if mode is False:
        return bundle
    if _SHARED is not None and key is not None:
        earlier = _SHARED.get(key)
        if earlier is not None and _can_take_over(earlier, bundle, workers):
            cached = replace(bundle, train=_take_over(bundle.train, earlier.get("train")),
                             val=_take_over(bundle.val, earlier.get("val")))
            _share(key, cached)  # this run's caches, which hold the storage once the loaders allocate it
            return cached
        _SHARED.clear()  # another data set's images: released before these are planned
    shape, mean, std = data_cfg["input_size"], data_cfg["mean"], data_cfg["std"]
    per_image = int(torch.Size(shape).numel())  # one byte per value
    shm_free = shared_memory_free() if workers else None
    plan = plan_cache(mode, None if augment else len(bundle.train) * per_image, len(bundle.val) * per_image,
                      workers, processes, available_memory(), None if shm_free is None else max(0, shm_free - in_flight))
    if plan.note:
        say_once([plan.note])
    cached = replace(bundle, train=DecodedCache(bundle.train, shape, mean, std) if plan.train else bundle.train,
                     val=DecodedCache(bundle.val, shape, mean, std) if plan.val else bundle.val)
    if _SHARED is not None and key is not None and (plan.train or plan.val):
        _share(key, cached)
    return cached


def _share(key: str, bundle: Any) -> None:
    _SHARED[key] = {part: ds for part, ds in (("train", bundle.train), ("val", bundle.val))  # type: ignore[index]
                    if isinstance(ds, DecodedCache)}
