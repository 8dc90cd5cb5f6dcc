"""From a validated config to the objects a run needs: data, model, runtime, planner."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from alast.config import AlastConfig
from alast.data import DataBundle, build_data
from alast.data.cache import cache_bundle
from alast.data.datasets import LOADER_PREFETCH, describe_spec, resolve_workers
from alast.models import SHIPPED_MODELS, ModelError, create_model
from planners import Planner, create_planner
from runtimes import registry
from runtimes.torch_backend.params import timm_model
from runtimes.torch_backend.patch import position_kind


def model_data_config(name: str, img_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing for model ``name`` without building it."""
    from timm.data import resolve_data_config

    if name in SHIPPED_MODELS:
        cfg = dict(SHIPPED_MODELS[name].pretrained_cfg)
    else:
        import timm

        if not timm.is_model(name):
            create_model(name, 1)  # raises ModelError with suggestions
        pcfg = timm.models.get_pretrained_cfg(name)
        if pcfg is None:
            raise ModelError(f"timm has no preprocessing config for {name!r}")
        cfg = pcfg.to_dict()
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
        cfg.pop("test_input_size", None)
    return resolve_data_config({}, pretrained_cfg=cfg)


def load_data(cfg: AlastConfig, workers: int | None = None) -> tuple[DataBundle, dict[str, Any]]:
    """The run's data and its timm data config. ``workers``: the run's DataLoader workers
    (:func:`data_workers`), and the data behind the decoded-image cache where ``data.cache`` says so
    (a run that reads its images more than once); None: no cache (counting, planning)."""
    data_cfg = model_data_config(cfg.model.name, cfg.model.img_size)
    d = cfg.data
    bundle = build_data(d.spec, data_cfg, data_dir=d.data_dir, download=d.download, val_fraction=d.val_fraction,
                        seed=cfg.train.seed, augment=d.augment, skip_bad_images=d.skip_bad_images,
                        train_split=d.train_split, val_split=d.val_split, subset=d.subset,
                        tune_fraction=d.tune_fraction, tune_outside_seeds=d.tune_outside_seeds)
    if workers is not None and describe_spec(d.spec)[0] != "random":  # random images are drawn, not decoded
        # the workers' batches pass through shared memory too: the cache may have what they leave
        in_flight = workers * LOADER_PREFETCH * batch_bytes(cfg, data_cfg) * local_processes()
        bundle = cache_bundle(bundle, d.cache, d.augment, workers, data_cfg, local_processes(), in_flight,
                              key=data_key(cfg, data_cfg, bundle))
    return bundle, data_cfg


def data_key(cfg: AlastConfig, data_cfg: dict[str, Any], bundle: DataBundle) -> str:
    """Everything :func:`load_data` makes the data sets from, and the image files it found where it
    lists them (``bundle``'s fingerprints: a file added, removed or renamed changes them): two runs
    with the same key read the same images in the same order (``alast bench``'s runs share their
    decoded images by it)."""
    d = cfg.data
    return json.dumps([d.spec, str(d.data_dir), d.val_fraction, cfg.train.seed, d.augment, d.skip_bad_images,
                       d.train_split, d.val_split, d.subset, d.tune_fraction, d.tune_outside_seeds, data_cfg, bundle.fingerprint,
                       bundle.train_files],
                      sort_keys=True, default=str)


def local_processes() -> int:
    """The training processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def batch_bytes(cfg: AlastConfig, data_cfg: dict[str, Any] | None = None) -> int:
    """The bytes of one process's training batch of float32 images (``data_cfg``: the model's timm
    data config, where the caller has it)."""
    shape = (data_cfg or model_data_config(cfg.model.name, cfg.model.img_size))["input_size"]
    return 4 * max(1, cfg.train.batch_size // local_processes()) * int(torch.Size(shape).numel())


def data_workers(cfg: AlastConfig) -> int:
    """The DataLoader workers of a run: ``data.num_workers`` for the device its backend trains on
    (``resolve_workers``), within the shared memory its training batches pass through. Decided once
    per run, before the data are loaded (the decoded-image cache takes what they leave)."""
    from alast.data.cache import shared_memory_free

    if cfg.backend.name == "ort":  # trains on the CPU where its onnxruntime build has no CUDA provider
        from runtimes.ort_backend.runtime import _resolve_device

        device = _resolve_device(cfg.backend.device)
    else:
        from runtimes.torch_backend.runtime import resolve_device

        device = resolve_device(cfg.backend.device).type
    if cfg.data.num_workers != "auto" or device != "cuda":
        return resolve_workers(cfg.data.num_workers, device)
    return resolve_workers("auto", device, local_processes(), batch_bytes=batch_bytes(cfg),
                           shm_free=shared_memory_free())


def build_model(cfg: AlastConfig, num_classes: int):
    m = cfg.model
    return create_model(m.name, num_classes, pretrained=m.pretrained, checkpoint=m.checkpoint,
                        img_size=m.img_size, drop_path_rate=m.drop_path_rate, checkpoint_ema=m.checkpoint_ema)


def create_runtime(cfg: AlastConfig, model: Any, comm: Any = None) -> Any:
    """The backend ``cfg.backend.name`` for ``model`` (see :mod:`runtimes.registry`)."""
    check_positions(cfg, position_kind(timm_model(model)))
    return registry.create_runtime(cfg.backend.name, cfg, model, comm=comm)


POSITION_KINDS = {"rotary": "rotary position embeddings (timm's Eva)",
                  "relative": "relative position biases (timm's Beit)"}


def check_positions(cfg: AlastConfig, kind: str | None) -> None:
    """Refuse, in one line, what a model whose blocks take the positions of their tokens
    (:func:`~runtimes.torch_backend.patch.position_kind` ``kind``) cannot run: fused dropped tokens."""
    if kind is not None and cfg.policy.fuse_tokens:
        raise ValueError(f"{cfg.model.name} has {POSITION_KINDS[kind]}: a fused token has no position; set "
                         "policy.fuse_tokens=false")


def policy_options(cfg: AlastConfig, head_reads_prefix: bool = False, world_size: int = 1) -> dict[str, Any]:
    """The planner options from the policy section (only those the policy takes).
    ``head_reads_prefix``: whether the model's head reads only the prefix tokens (``policy.trim_last``
    applies only then); ``world_size``: the processes ``train.batch_size`` is split over."""
    from planners import planner_options

    p = cfg.policy
    values = dict(alpha=p.alpha if p.alpha is not None else cfg.train.lr, b_init=p.b_init, b_min=p.b_min,
                  b_max=p.b_max, k_trained=p.k_trained, freeze_mode=p.freeze_mode,
                  delta_reduction=p.delta_reduction, min_tokens=p.min_tokens, keep_ratio=p.keep_ratio,
                  dense_final_frac=p.dense_final_frac, dense_final_blocks=p.dense_final_blocks,
                  dense_final_interleave=p.dense_final_interleave, rule=p.rule,
                  gain=p.gain, ema=p.ema, spare_first=p.spare_first, early_frac=p.early_phase,
                  token_multiple=cfg.backend.token_multiple, trim_last=p.trim_last and head_reads_prefix,
                  batch_size=max(1, cfg.train.batch_size // world_size), seed=cfg.train.seed)
    accepted = set(planner_options(p.planner))
    return {k: v for k, v in values.items() if k in accepted}


def build_planner(cfg: AlastConfig, num_blocks: int, overrides: dict[str, Any] | None = None,
                  head_reads_prefix: bool = False, world_size: int = 1) -> Planner:
    options = {**policy_options(cfg, head_reads_prefix, world_size), **(overrides or {})}
    return create_planner(cfg.policy.planner, num_blocks, **options)
