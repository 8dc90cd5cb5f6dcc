"""The frozen bottom blocks' outputs, kept for the training images they were computed for.

With the top blocks trained and the embeddings frozen (``freeze_mode: last``; the ``freeze``
policy), the embeddings and the bottom ``depth`` blocks never change after the last step that
trains any of them, and they keep every token: what they compute for an image is the same every
time the image comes back. :class:`FrozenCache` keeps it, per training image (the sampler's index):
the tokens leaving block ``depth - 1`` and each bottom block's per-image delta (what the budget rule
reads), so a later step starts at block ``depth`` for the images it holds and runs the bottom blocks
for the others only. A step that trains one of them empties it (:meth:`clear`).

The storage is allocated once, for at most ``capacity`` images (images past it are never kept), on
the runtime's device: on a GPU a read is a gather on the device and a store a copy there, so a step
neither waits on the device nor moves tokens through the host (a host copy could cost more than
the blocks it saves); only the slot table, which the sampler's keys index, stays on the CPU. On a
GPU the loop keeps it only when asked (``backend.frozen_cache=on``): there it takes device memory.
Nothing is cached under random transforms (``data.augment``) or where the bottom blocks draw random
numbers in training (dropout, drop-path, patch dropout): the loop and :func:`check_frozen_prefix`
refuse those.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenCacheError(ValueError):
    """The frozen blocks' outputs cannot be cached for this model (the message says why)."""


def check_frozen_prefix(timm_model: nn.Module, depth: int) -> None:
    """Refuse a model whose embeddings and first ``depth`` blocks do not compute the same tokens for
    the same image every time in training: a model class whose forward is not timm's
    ``VisionTransformer``'s (the cached tokens enter block ``depth`` directly), or dropout,
    drop-path or patch dropout with a rate above 0 there."""
    from timm.models.vision_transformer import VisionTransformer

    cls = type(timm_model)
    if not isinstance(timm_model, VisionTransformer) or any(
            getattr(cls, name) is not getattr(VisionTransformer, name) for name in ("forward", "forward_features")):
        raise FrozenCacheError(f"caching the frozen blocks needs timm's VisionTransformer forward; {cls.__name__} "
                               "runs its own; set backend.frozen_cache=off")
    if not 0 < depth < len(timm_model.blocks):
        raise FrozenCacheError(f"the cached bottom blocks must be 1 to {len(timm_model.blocks) - 1}, got {depth}")
    stem = [timm_model.patch_embed, timm_model.pos_drop, timm_model.patch_drop, timm_model.norm_pre,
            *timm_model.blocks[:depth]]
    for part in stem:
        for m in part.modules():
            if getattr(m, "track_running_stats", False):  # BatchNorm: the batch's statistics, running stats updated
                raise FrozenCacheError(f"{type(m).__name__} in the frozen embeddings or bottom blocks normalises each "
                                       "image by its batch's statistics in training, so their outputs cannot be "
                                       "cached; set backend.frozen_cache=off")
            rates = [getattr(m, attr, None) for attr in ("p", "drop_prob", "prob")]  # Dropout, DropPath, PatchDropout
            rate = max((float(r) for r in rates if isinstance(r, (int, float)) and not isinstance(r, bool)), default=0.0)
            if rate > 0:
                raise FrozenCacheError(f"{type(m).__name__} with rate {rate:g} in the frozen bottom blocks draws new "
                                       "numbers every step, so their outputs cannot be cached; set "
                                       "backend.frozen_cache=off or the rate to 0")


def stored_bytes(tokens: int, width: int, depth: int) -> int:
    """The storage :class:`FrozenCache` keeps for one image, on its device: its tokens and deltas (fp32)."""
    return tokens * width * 4 + depth * 4


def bytes_per_image(tokens: int, width: int, depth: int) -> int:
    """What one image costs :class:`FrozenCache`: its storage and its slot in the host's table."""
    return stored_bytes(tokens, width, depth) + 8


class FrozenCache:
    """Per training image, the tokens entering block ``depth`` and the bottom blocks' deltas.

    ``num_images``: the training split's size (keys are its indices); ``tokens``, ``width``: the
    tokens entering a block (prefix and patch tokens) and their width; ``capacity``: the most images
    kept; ``device``: where the tokens and deltas are kept (the runtime's). ``host_views``: write the
    storage through numpy views (default: on the CPU, where a memory tracker around a step would
    otherwise count the whole storage as the step's); off, it is written with torch ops, as on a GPU.
    """

    def __init__(self, depth: int, num_images: int, tokens: int, width: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 host_views: bool | None = None) -> None:
        self.depth = int(depth)
        self.device = torch.device(device)
        self.capacity = max(0, min(int(capacity), int(num_images)))
        self.slot = torch.full((int(num_images),), -1, dtype=torch.long)
        self.tokens = torch.empty((self.capacity, tokens, width), dtype=dtype, device=self.device)
        self.deltas = torch.empty((self.capacity, self.depth), dtype=torch.float32, device=self.device)
        self.host_views = self.device.type == "cpu" if host_views is None else bool(host_views)
        # numpy views, made here: a write through them is outside torch's dispatch, so a memory tracker
        # around a step does not count the whole storage as the step's (``Tensor.numpy()`` inside it would)
        self._slot = self.slot.numpy()
        if self.host_views:
            self._tokens, self._deltas = self.tokens.numpy(), self.deltas.numpy()
        self.used = 0
        self.hits = self.cleared = 0
        self.images = 0  # the images of every step given keys, whether it read the cache or not

    @property
    def nbytes(self) -> int:
        """The storage's bytes, on its device (the host's slot table, 8 bytes an image, apart)."""
        return self.tokens.nbytes + self.deltas.nbytes

    def held(self, keys: Tensor) -> Tensor:
        """Which of ``keys`` (training indices, on the CPU) the cache holds, as a bool mask."""
        return self.slot[keys] >= 0

    def get(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """The stored tokens ``[n, T, D]`` and deltas ``[n, depth]`` of ``keys`` (all held), where
        they are kept."""
        slots = to_device(self.slot[keys], self.device)
        return self.tokens.index_select(0, slots), self.deltas.index_select(0, slots)

    def put(self, keys: Tensor, tokens: Tensor, deltas: Tensor) -> None:
        """Store the images of ``keys`` that are not held, while there is room (in the order given):
        ``tokens`` ``[n, T, D]`` and ``deltas`` ``[depth, n]``, one row or column per key, written
        through the numpy views (``host_views``) or by a copy on the storage's device."""
        new = self.slot[keys] < 0
        keys = keys[new]
        room = self.capacity - self.used
        if room <= 0 or not len(keys):
            return
        keys, take = keys[:room], new.nonzero().flatten()[:room]
        start, stop = self.used, self.used + len(keys)
        take = to_device(take, tokens.device)
        rows, d = tokens.detach().index_select(0, take), deltas.detach().index_select(1, take).t()
        if self.host_views:
            self._tokens[start:stop] = rows.to("cpu", self.tokens.dtype).numpy()
            self._deltas[start:stop] = d.float().cpu().numpy()
        else:  # queued on the device with the step: nothing waits
            self.tokens[start:stop].copy_(rows)
            self.deltas[start:stop].copy_(d)
        self._slot[keys.numpy()] = range(start, stop)
        self.used = stop

    def clear(self) -> None:
        """Forget every image (the bottom blocks or the embeddings are about to change)."""
        if self.used:
            self._slot[:] = -1
            self.used = 0
            self.cleared += 1

    def stats(self) -> dict[str, int | str]:
        return {"depth": self.depth, "capacity_images": self.capacity, "held_images": self.used,
                "bytes": self.nbytes, "hits": self.hits, "cleared": self.cleared,
                "images": self.images, "device": self.device.type}


def to_device(index: Tensor, device: torch.device) -> Tensor:
    """A small host tensor (indices) on ``device`` without waiting on it: through page-locked memory on
    a GPU (a copy from pageable memory would wait for the device's queued work)."""
    if index.device.type != "cpu" or device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)
