"""Whether a run caches its frozen bottom blocks' outputs, and which share of each step it reads.

The runtime keeps the outputs (``TorchRuntime.enable_frozen_cache``); this module decides whether
it applies (``backend.frozen_cache``) and predicts, from the batch sampler (a pure function of the
seed and the step), the share of each step's images the cache will hold, so that under a FLOPs
target the planner can spend the saving on tokens before the steps run (``expect_cached``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..data import StepBatchSampler

MIB = 2 ** 20


def cached_shares(sampler: StepBatchSampler, steps: int, serves: Callable[[int], bool], capacity: int,
                  start: int = 0) -> list[float]:
    """Per step, the share of its images a cache of ``capacity`` images holds when the step starts,
    as the runtime fills it: a step that ``serves`` reads the images it holds and stores the others
    while there is room; one that does not empties it. The cache is empty at step ``start`` (0 before
    it)."""
    held: set[int] = set()
    shares = [0.0] * start
    for step in range(start, steps):
        keys = sampler.indices(step)
        if not serves(step):
            held.clear()
            shares.append(0.0)
            continue
        shares.append(sum(k in held for k in keys) / len(keys))
        for k in keys:
            if len(held) >= capacity:
                break
            held.add(k)
    return shares


def _on_gpu(device: str) -> bool:
    """Whether ``auto`` leaves the cache off on ``device``: on a GPU it would be kept in device memory,
    counted in the peak (``backend.frozen_cache=on`` keeps it there)."""
    return device.startswith("cuda")


def _why_not(cfg: Any, runtime: Any, planner: Any, world_size: int) -> str | None:
    """Why the frozen blocks' outputs cannot be cached in this run (None: they can)."""
    if not hasattr(runtime, "enable_frozen_cache"):
        return f"the {runtime.name} backend does not cache them"
    return _why_not_planned(cfg, planner, world_size)


def _why_not_planned(cfg: Any, planner: Any, world_size: int) -> str | None:
    """:func:`_why_not`, from the config and the planner alone."""
    if not getattr(planner, "frozen_bottom", 0):
        return "no bottom block stays frozen with every token in this policy"
    if cfg.data.augment:
        return "data.augment gives each step new views of its images"
    if world_size > 1:
        return "not under data parallelism"
    micro = cfg.train.micro_batch_size
    if micro is not None and micro < cfg.train.batch_size // world_size:
        return "not with gradient accumulation (train.micro_batch_size)"
    return None


def setup_frozen_cache(cfg: Any, runtime: Any, planner: Any, num_images: int, steps: int,
                       world_size: int = 1) -> dict[str, Any] | None:
    """Turn the cache on where ``backend.frozen_cache`` asks for it and it applies, and tell the
    planner what it will save (:func:`plan_frozen_cache`). Returns what the summary records (None:
    off). ``on`` where it cannot apply raises ValueError, naming why."""
    setting = cfg.backend.frozen_cache
    if setting == "off" or setting == "auto" and _on_gpu(str(getattr(runtime, "device", "cpu"))):
        return None
    why = _why_not(cfg, runtime, planner, world_size)
    if why is not None:
        if setting == "on":
            raise ValueError(f"backend.frozen_cache=on cannot apply: {why}; set backend.frozen_cache=auto or off")
        return None
    from runtimes.torch_backend.frozen_cache import FrozenCacheError

    try:
        cache = runtime.enable_frozen_cache(planner.frozen_bottom, num_images, int(cfg.backend.frozen_cache_mib * MIB))
    except FrozenCacheError as exc:
        if setting == "on":
            raise ValueError(str(exc)) from None
        return None
    return plan_frozen_cache(cfg, cache, planner, num_images, steps)


def plan_frozen_cache(cfg: Any, cache: Any, planner: Any, num_images: int, steps: int, start: int = 0
                      ) -> dict[str, Any]:
    """Predict the share of each step's images ``cache`` will hold from step ``start`` on (where it is
    empty: the run's start, or a resume) and tell the planner; returns what the summary records."""
    sampler = StepBatchSampler(num_images, cfg.train.batch_size, cfg.train.seed, 0, steps)
    shares = cached_shares(sampler, steps, lambda s: planner.serves_cache(s, s / steps), cache.capacity, start)
    if hasattr(planner, "expect_cached"):
        planner.expect_cached(shares, steps, start)
    ahead = shares[start:]
    return {"blocks": cache.depth, "capacity_images": cache.capacity, "bytes": cache.nbytes,
            "device": cache.device.type, "planned_share": sum(ahead) / len(ahead) if ahead else 0.0}


def planned_cache(cfg: Any, planner: Any, num_images: Callable[[], int], steps: int, tokens: int, width: int,
                  position_kind: str | None = None, device: str = "cpu") -> tuple[list[float], int, int] | None:
    """What ``alast plan`` expects the run's cache to read: per step the share of its images, the
    blocks cached and the bytes it takes; None where the run would not cache
    (``backend.frozen_cache``, decided from the config as the run decides it; ``num_images``: the
    training split's size, asked for only where it would). ``tokens``, ``width``: the tokens entering a block and their width (the cache's capacity);
    ``position_kind``: the model's (rotary, relative; None: positions added before the blocks), whose
    blocks need their own forward, so no cache; ``device``: the run's (on a GPU ``auto`` leaves it off)."""
    setting = cfg.backend.frozen_cache
    if setting == "off" or setting == "auto" and _on_gpu(device):
        return None
    why = _why_not_planned(cfg, planner, 1)
    if why is None and cfg.backend.name != "torch":
        why = f"the {cfg.backend.name} backend does not cache them"
    if why is None and not (cfg.policy.embeddings_frozen or cfg.policy.lora is not None):
        why = "the embeddings train in this run"
    depth = planner.frozen_bottom
    # timm's drop-path rates rise from 0 at block 0; LoRA's dropout sits in every adapted block
    if why is None and (cfg.model.drop_path_rate > 0 and depth > 1 or cfg.policy.lora is not None
                        and cfg.policy.lora.dropout > 0):
        why = "the cached blocks draw numbers in training (model.drop_path_rate, policy.lora.dropout)"
    if why is None and position_kind is not None:
        why = f"the model's blocks take {position_kind} positions, so they run a forward of their own"
    if why is not None:
        if setting == "on":
            raise ValueError(f"backend.frozen_cache=on cannot apply: {why}; set backend.frozen_cache=auto or off")
        return None
    from runtimes.torch_backend.frozen_cache import bytes_per_image, stored_bytes

    n = num_images()
    capacity = min(int(cfg.backend.frozen_cache_mib * MIB) // bytes_per_image(tokens, width, depth), n)
    sampler = StepBatchSampler(n, cfg.train.batch_size, cfg.train.seed, 0, steps)
    shares = cached_shares(sampler, steps, lambda s: planner.serves_cache(s, s / steps), capacity)
    return shares, depth, capacity * stored_bytes(tokens, width, depth)
