"""Datasets and batches: built-in digits and letters, image folders, torchvision datasets, synthetic tasks.

Batches are a pure function of (seed, step): step ``s`` reads slice ``s mod E`` of the permutation
drawn for epoch ``s // E``. A resumed run therefore sees exactly the batches it would have seen, and
data-parallel ranks take disjoint slices of the same global batch. With ``data.augment``, each
sample's random augmentation is a pure function of (seed, step, index) too (StepSeededAugment).
"""
from __future__ import annotations

import copy
import os
import random
import signal
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from alast.data.cache import DecodedCache, collate
from alast.data.common import DataBundle, DataError, RGBTransform, _split_indices, say_once


class ArrayImageDataset(Dataset):
    """Small uint8 images kept at their own size; the model's transform runs per sample when read.

    Transforming up front at the model's input size costs ``N * 3 * H * W * 4`` bytes (about 6 GB
    for the digits at 518 px); transforming in ``__getitem__`` keeps only the source pixels, like
    torchvision datasets and image folders. ``images`` is uint8 [N, h, w] (grayscale) or
    [N, h, w, 3]; each is handed to ``transform`` as an RGB PIL image. Picklable, so DataLoader
    workers can use it.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable) -> None:
        if images.dtype != np.uint8:
            raise TypeError(f"ArrayImageDataset needs uint8 images, got {images.dtype}")
        self.images, self.transform = images, transform
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), self.targets[i]


class RandomImageDataset(Dataset):
    """Normal-noise float images at the model's input size, each drawn from (seed, index) when read.

    For timing real architectures, not accuracy: nothing is stored but the labels, so any N fits
    in memory, and image ``i`` is the same whichever worker, order or batch reads it.
    """

    def __init__(self, shape: Sequence[int], labels: Sequence[int], seed: int, first_index: int = 0) -> None:
        self.shape, self.seed, self.first = tuple(shape), seed % (1 << 64), first_index
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.first + i])
        return torch.from_numpy(rng.standard_normal(self.shape, dtype=np.float32)), self.targets[i]


def digit_images() -> tuple[np.ndarray, list[int]]:
    """The UCI digits shipped in scikit-learn: 1,797 8x8 images of 16 grey levels, scaled to uint8,
    and their labels (0-9)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).astype("uint8"), [int(y) for y in d.target]


def _digits(train_tf: Callable, eval_tf: Callable, val_fraction: float, seed: int) -> DataBundle:
    """The UCI digits, kept at 8x8 until read."""
    pixels, labels = digit_images()
    tr, va = _split_indices(labels, val_fraction, seed)
    val = ArrayImageDataset(pixels, labels, eval_tf)
    train = val if train_tf is eval_tf else ArrayImageDataset(pixels, labels, train_tf)
    return DataBundle(Subset(train, tr), Subset(val, va), [str(c) for c in range(10)], seeded_split=True)


def _synthetic(family: str, train_tf: Callable, eval_tf: Callable) -> DataBundle:
    """The fixed-seed synthetic sets, stored as 32x32 uint8 and transformed per sample."""
    from alast.data import synthetic

    train = synthetic.SyntheticDataset(family, size=6000, seed=synthetic.SHAPES_TRAIN_SEED, transform=train_tf)
    val = synthetic.SyntheticDataset(family, size=1500, seed=synthetic.SHAPES_VAL_SEED, transform=eval_tf)
    return DataBundle(train, val, list(train.classes))


def _letters(train_tf: Callable, eval_tf: Callable) -> DataBundle:
    """Capital letters typeset in matplotlib's fonts; validation uses fonts never seen in training."""
    from alast.data.letters import FontError, LettersDataset

    try:
        train, val = LettersDataset("train", train_tf), LettersDataset("val", eval_tf)
    except FontError as exc:
        raise DataError(str(exc)) from None
    return DataBundle(train, val, list(train.classes))


def _random_images(data_cfg: dict[str, Any], n: int, seed: int, num_classes: int = 10) -> DataBundle:
    """Normal-noise images at the model's input size: for timing real architectures, not accuracy."""
    if n < 2:
        raise DataError("random:N needs N >= 2")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g).tolist()
    split = max(1, n // 8)
    shape = data_cfg["input_size"]
    return DataBundle(RandomImageDataset(shape, y[split:], seed, first_index=split),
                      RandomImageDataset(shape, y[:split], seed), [str(i) for i in range(num_classes)])


def describe_spec(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in ("digits", "shapes", "letters", "imagefolder", "torchvision", "random"):
        raise DataError(f"unknown data spec {spec!r}; use digits, shapes, letters, imagefolder:PATH, "
                        "torchvision:NAME or random[:N] (timing only)")
    if kind in ("imagefolder", "torchvision") and not arg:
        raise DataError(f"data spec {spec!r} needs a value, e.g. {kind}:{'PATH' if kind == 'imagefolder' else 'CIFAR100'}")
    if kind == "random" and arg and not arg.strip().isdigit():
        raise DataError(f"data spec {spec!r}: N in random:N is a number of images, e.g. random:256")
    if kind in ("digits", "shapes", "letters") and (arg or spec != kind):
        raise DataError(f"data spec {spec!r}: the built-in {kind} task takes no value; use --data {kind}, or "
                        "imagefolder:PATH for a folder")
    return kind, arg



def build_data(spec: str, data_cfg: dict[str, Any], *, data_dir: Path | None = None, download: bool = False,
               val_fraction: float = 0.2, seed: int = 0, augment: bool = False, skip_bad_images: bool = False,
               train_split: str | None = None, val_split: str | None = None, subset: str | None = None,
               for_eval: bool = False, run_files: dict[str, Any] | None = None,
               tune_fraction: float | None = None, tune_outside_seeds: Sequence[int] = ()) -> DataBundle:
    """Train/validation datasets for ``spec`` with timm's transforms for ``data_cfg``.

    ``train_split``, ``val_split``, ``subset``: a torchvision dataset's split and subset names (None:
    automatic). ``for_eval``: the data scores a trained model and nothing trains on it, so a flat
    image folder (or a torchvision dataset without splits) is scored whole, not split, one class is
    enough, and ``val`` is the only split read; but an image folder that holds the files a run split
    (``run_files``: the run's ``data_fingerprint``) is split again as the run split it.
    ``tune_fraction``: train on the rest of the training images and score on this share of them
    (:func:`tuning_split`, none of them a validation image under a seed of ``tune_outside_seeds``)
    instead of on the validation split.
    """
    from timm.data import create_transform

    kind, arg = describe_spec(spec)
    if kind == "imagefolder" and data_dir is not None:
        raise DataError(f"--data-dir (data.data_dir) applies to torchvision:NAME only, not to {spec}, whose folder "
                        "is its path; drop it (--set data.data_dir=null)")
    splits = {"train_split": train_split, "val_split": val_split, "subset": subset}
    if kind != "torchvision":
        from alast.data.tvsets import refuse_settings

        refuse_settings({k: v for k, v in splits.items() if v is not None}, spec)
    eval_tf = create_transform(**data_cfg, is_training=False)
    train_tf = create_transform(**data_cfg, is_training=True) if augment and not for_eval else eval_tf
    if kind == "digits":
        bundle = _digits(train_tf, eval_tf, val_fraction, seed)
    elif kind == "shapes":
        bundle = _synthetic("shapes", train_tf, eval_tf)
    elif kind == "letters":
        bundle = _letters(train_tf, eval_tf)
    elif kind == "random":
        bundle = _random_images(data_cfg, int(arg) if arg else 256, seed)
    else:
        if kind == "imagefolder":
            from alast.data.folders import imagefolder

            bundle = imagefolder(Path(arg).expanduser(), eval_tf, val_fraction, seed, skip_bad_images, for_eval,
                                 run_files)
        else:
            from alast.data.tvsets import torchvision_data

            bundle = torchvision_data(arg, data_dir, download, eval_tf, val_fraction, seed, skip_bad_images, splits,
                                      for_eval)
        if len(bundle.val) == 0:
            raise DataError(f"{spec} leaves no validation images (a class with one image goes to training); add "
                            "images or give PATH/train and PATH/val folders")
        if train_tf is not eval_tf:
            _set_transform(bundle.train, train_tf)
    if tune_fraction is not None and not for_eval:
        outside = [s for s in tune_outside_seeds if s != seed] if bundle.seeded_split else []
        bundle = tuning_split(bundle, tune_fraction, seed, None if train_tf is eval_tf else eval_tf,
                              val_fraction, outside)
    say_once(bundle.notes)
    return bundle


def _under(ds: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under ``ds``'s subsets, and the indices into it of ``ds``'s items."""
    idx = list(range(len(ds)))
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in idx]
        ds = ds.dataset
    return ds, idx


def _all_labels(base: Dataset) -> list[int]:
    """The labels of every item of ``base``, in its order."""
    from alast.data.tvsets import labels_of

    labels = labels_of(base)
    return [int(y) for y in labels] if labels is not None else [int(base[i][1]) for i in range(len(base))]


def tuning_split(bundle: DataBundle, fraction: float, seed: int, eval_tf: Callable | None,
                 val_fraction: float = 0.2, outside_seeds: Sequence[int] = ()) -> DataBundle:
    """``bundle`` with ``fraction`` of its training images (stratified by class, drawn by ``seed``; every
    class keeps a training image) as its validation set and the rest as its training set: a run on it
    chooses settings without scoring the validation images. ``eval_tf``: the transform the held-out
    images get where training augments (None: they keep the training images' own). ``outside_seeds``:
    seeds whose validation images (split by ``val_fraction`` from the dataset under ``bundle.train``)
    are never held out, so that a class holds out its share from the rest of its training images, as
    many as they allow."""
    base, idx = _under(bundle.train)
    labels = _all_labels(base)
    train_labels = [labels[i] for i in idx]
    held = _split_indices(train_labels, fraction, seed)[1]  # positions in the training split
    if outside_seeds:  # as many of each class, drawn from the images no other seed validates on
        want = Counter(train_labels[p] for p in held)
        avoided = {i for s in outside_seeds for i in _split_indices(labels, val_fraction, s)[1]}
        free: dict[int, list[int]] = {}
        for p, i in enumerate(idx):
            if i not in avoided:
                free.setdefault(train_labels[p], []).append(p)
        g = torch.Generator().manual_seed(seed)
        held = sorted(ps[j] for c, ps in free.items() for j in torch.randperm(len(ps), generator=g).tolist()[:want[c]])
    out = set(held)
    keep = [p for p in range(len(idx)) if p not in out]
    if not held:
        raise DataError(f"data.tune_fraction={fraction:g} holds out none of the {len(idx)} training images: every "
                        "class has a single training image (or none that is not another seed's validation "
                        "image); add images")
    held_base = base
    if eval_tf is not None and hasattr(base, "transform"):  # the held-out images are scored unaugmented
        held_base = copy.copy(base)
        held_base.transform = RGBTransform(eval_tf)
    note = (f"data.tune_fraction={fraction:g}: training on {len(keep)} of the {len(idx)} training images and "
            f"scoring the {len(held)} held out of them, not the validation split")
    return replace(bundle, train=Subset(base, [idx[i] for i in keep]), val=Subset(held_base, [idx[i] for i in held]),
                   notes=[*bundle.notes, note])


def _set_transform(ds: Dataset, tf: Callable) -> None:
    while isinstance(ds, Subset):
        ds = ds.dataset
    if hasattr(ds, "transform"):
        ds.transform = RGBTransform(tf)


def check_batch_size(n: int | None, batch_size: int, world_size: int = 1) -> None:
    """Refuse a batch the training set (``n`` images; None: not loaded yet) cannot fill, or
    ``world_size`` ranks cannot share."""
    if n is not None and batch_size > n:
        raise DataError(f"batch size {batch_size} exceeds the {n} training images; lower --batch-size (train.batch_size)")
    if batch_size % world_size:
        below = batch_size - batch_size % world_size
        fits = [b for b in (below, below + world_size) if 0 < b and (n is None or b <= n)]
        fix = f"use a multiple of {world_size}, such as {' or '.join(map(str, fits))}" if fits else "use fewer ranks"
        raise DataError(f"global batch size {batch_size} is not divisible by {world_size} ranks; {fix}")


class StepBatchSampler:
    """Index lists for steps ``start..total-1``: a pure function of (seed, step, rank)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        check_batch_size(n, batch_size, world_size)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.total = start_step, total_steps
        self.rank, self.world = rank, world_size
        self.per_epoch = n // batch_size
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        batch = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        per_rank = self.batch_size // self.world
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.total):
            yield self.indices(s)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


_AUGMENT_SALT = 0x61756720  # keeps the augmentation streams apart from other draws seeded from train.seed


class _StepKeyedSampler:
    """A :class:`StepBatchSampler`'s batches as ``(index, step)`` pairs: the same indices, each
    tagged with the step that draws it, for :class:`StepSeededAugment`."""

    def __init__(self, sampler: StepBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.sampler.start, self.sampler.total):
            yield [(i, s) for i in self.sampler.indices(s)]

    def __len__(self) -> int:
        return len(self.sampler)


class StepSeededAugment(Dataset):
    """Reads ``ds[index]`` for an ``(index, step)`` key with the global random generators that
    augmentations draw from (Python's ``random``, numpy's and torch's CPU generator) seeded from
    (seed, step, index), and puts them back as they were afterwards.

    A sample's augmentation is then a pure function of (train.seed, step, index): the same whether
    the run resumed or not, whatever ``data.num_workers`` (a worker's own generators would depend on
    which samples it served before, and are not checkpointed), and on however many ranks, since
    ranks share the global batch. With no workers it runs in the training process, whose own
    draws it leaves untouched. Module-level, so it pickles for spawned workers.
    """

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.ds, self.seed = ds, seed % (1 << 64)

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, step = key
        words = np.random.SeedSequence([self.seed, _AUGMENT_SALT, int(step), int(index)]).generate_state(8)
        # a worker's generators serve only these reads, each reseeded: only the training process's
        # need putting back (saving numpy's costs about 0.1 ms)
        saved = None if get_worker_info() else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.seed(int(words[0]) << 32 | int(words[1]))
            np.random.seed(words[2:6])
            torch.default_generator.manual_seed(int(words[6]) << 31 | int(words[7]) >> 1)  # CPU only, not CUDA
            return self.ds[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


AUTO_WORKERS_MAX = 8  # data.num_workers=auto on CUDA: at most this many per training process
LOADER_PREFETCH = 2  # batches a DataLoader worker prepares ahead (torch's prefetch_factor default)


def resolve_workers(setting: int | str, device: str, processes: int = 1, cpus: int | None = None,
                    batch_bytes: int = 0, shm_free: int | None = None) -> int:
    """``data.num_workers``: a count as given; ``auto``: none on the CPU, where the training threads
    use every core, so a worker only moves the decoding (``benchmarks/data_speed.py``: one worker
    reads no faster than the training process itself), and on CUDA, whose host only launches
    kernels, one per CPU core each of ``processes`` training processes has, less one, 1 to
    :data:`AUTO_WORKERS_MAX`; but no more than ``shm_free`` bytes of shared memory (None: unknown)
    hold, each worker passing up to ``LOADER_PREFETCH`` batches of ``batch_bytes`` through it
    (Docker's default /dev/shm holds 64 MiB: one batch of 128 images at 224 px is 77 MB)."""
    if setting != "auto":
        return int(setting)
    if device != "cuda":
        return 0
    cpus = cpus or os.cpu_count() or 1
    workers = max(1, min(AUTO_WORKERS_MAX, cpus // max(1, processes) - 1))
    if shm_free is not None and batch_bytes:
        fit = shm_free // (LOADER_PREFETCH * batch_bytes * max(1, processes))
        if fit < workers:
            note = (f"data.num_workers=auto: {fit} DataLoader workers, not {workers}: {shm_free / 2**20:.0f} MiB "
                    f"are free in /dev/shm, through which each passes up to {LOADER_PREFETCH} batches of "
                    f"{batch_bytes / 2**20:.0f} MiB (docker run --shm-size=8g gives more)")
            say_once([note])
            workers = fit
    return workers


def _leave_stop_signals_to_the_run(_worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: ignore SIGINT and SIGTERM, which a terminal, systemd
    or a batch scheduler sends to every process of the run. The training process stops at the next
    step boundary with a checkpoint (alast.training.process.StopOnSignal) and then ends its workers;
    a worker killed by the signal would end the run at once, with an error and no checkpoint. A
    worker whose training process dies ends by itself (torch's watchdog)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _loader_options(ds: Dataset, num_workers: int, pin_memory: bool, eight_bit: bool | None) -> dict[str, Any]:
    """The DataLoader options every loader here shares; a :class:`~alast.data.cache.DecodedCache`
    gets its storage (shared with the workers, if any) before they start, and assembles its own
    batches: 8-bit ones with ``eight_bit`` (None: with ``pin_memory``, for a CUDA device, which
    normalises them where it trains), else float32 ones."""
    if isinstance(ds, DecodedCache):
        ds.allocate(shared=num_workers > 0)
        ds.eight_bit = pin_memory if eight_bit is None else eight_bit
    options = {"num_workers": num_workers, "pin_memory": pin_memory, "collate_fn": collate}
    if num_workers:
        options["worker_init_fn"] = _leave_stop_signals_to_the_run
    return options


def train_batches(ds: Dataset, sampler: StepBatchSampler, num_workers: int = 0, augment: bool = False,
                  pin_memory: bool = False, eight_bit: bool | None = None) -> DataLoader:
    """The batches of ``sampler``'s steps from ``ds``.

    The loader has its own generator, so building and iterating it never draws from torch's global
    one (which a resume restores from the checkpoint before the loader starts). ``augment``: the
    samples are randomly augmented, and each is read by :class:`StepSeededAugment` with its
    randomness seeded from (``sampler.seed``, step, index); without it nothing is wrapped.
    ``pin_memory``: batches in page-locked memory, for a copy to a CUDA device that does not wait.
    ``eight_bit``: see :func:`_loader_options`.
    """
    generator = torch.Generator().manual_seed(sampler.seed % (1 << 63))
    options = _loader_options(ds, num_workers, pin_memory, eight_bit)
    if not augment:
        return DataLoader(ds, batch_sampler=sampler, generator=generator, **options)
    return DataLoader(StepSeededAugment(ds, sampler.seed), batch_sampler=_StepKeyedSampler(sampler),
                      generator=generator, **options)


EVAL_BATCH_BYTES = 8 << 20  # input-tensor budget of one automatic evaluation batch
MAX_EVAL_BATCH = 256


def auto_eval_batch_size(sample_bytes: int) -> int:
    """The largest batch whose input tensor stays within ``EVAL_BATCH_BYTES``, in [1, MAX_EVAL_BATCH].

    Evaluation needs no gradients, so its batch need not match training's: small images get large
    batches (fewer calls), large ones small batches (2 images at 518 px, 13 at 224 px). Larger
    batches at large sizes buy nothing on CPU: measured on vit_small_patch14_reg4_dinov2 at 518 px,
    1 thread, batch 2, 5 and 10 cost the same user time per image, but batches whose activations
    pass glibc's 32 MiB mmap threshold add page-fault system time (+10-25%) and memory.
    """
    return max(1, min(MAX_EVAL_BATCH, EVAL_BATCH_BYTES // max(1, sample_bytes)))


def eval_batches(ds: Dataset, batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = False, eight_bit: bool | None = None) -> DataLoader:
    """Validation batches in order; ``batch_size=None`` sizes them from the first sample's bytes.

    The loader's own generator keeps evaluations (their number: train.eval_every) out of torch's
    global one, which training draws from (drop path, LoRA dropout)."""
    if batch_size is None:
        x = ds[0][0] if len(ds) else None
        batch_size = auto_eval_batch_size(x.numel() * x.element_size()) if isinstance(x, torch.Tensor) else 1
    return DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                      **_loader_options(ds, num_workers, pin_memory, eight_bit))
