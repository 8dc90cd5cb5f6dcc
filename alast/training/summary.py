"""The end of a run: ``summary.json``, the final weights and the budget heatmap."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from alast.config import AlastConfig
from alast.data.cache import DecodedCache
from alast.models import run_initial_weights
from alast.training import checkpoint as ckpt
from alast.training.report import METRICS, budget_heatmap, read_metrics
from alast.training.rundir import FINAL_WEIGHTS, HEATMAP, SUMMARY


def run_summary(cfg, runtime, data, data_cfg, steps, metrics, run: Any, wall, plan_info) -> dict[str, Any]:
    ws, tally = run.comm.world_size, run.tally
    counted_all = tally.uncounted_steps == 0 and cfg.backend.count_flops != "off"
    full_step = runtime.full_ft_step_flops(cfg.train.batch_size // ws)
    train_flops = tally.counted_flops * ws if counted_all else None
    full = full_step * steps * ws if full_step is not None and counted_all else None
    every_token = _optional(runtime, "every_token_step_flops", cfg.train.batch_size // ws) if counted_all else None
    sent = tally.allreduce_bytes
    return {
        "policy": cfg.policy.name, "backend": runtime.name, "model": cfg.model.name, "data": cfg.data.spec,
        "initial_weights": run_initial_weights(cfg.model),
        "steps": steps, "batch_size": cfg.train.batch_size, "micro_batch_size": cfg.train.micro_batch_size,
        "world_size": ws,
        "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"], "val_samples": metrics["samples"],
        # data.tune_fraction: the scores are of images held out of the training split, not the validation split's
        "scored_on": "tuning" if cfg.data.tune_fraction is not None else "validation",
        **_deployment(cfg, metrics),
        "train_flops": train_flops, "full_ft_train_flops": full,
        "every_token_step_flops": every_token * ws if every_token is not None else None,
        "flops_ratio_vs_full": (train_flops / full) if train_flops and full else None,
        "flops_method": ("torch.utils.flop_counter, every executed step (forward+backward, 2 flops per "
                         "multiply-add, CPU fused attention registered) as the sum of its blocks' counts and "
                         "the rest of the model's, each counted once per shape (torch: a block shape never "
                         "counted is solved exactly from counted ones of its kind); full fine-tuning counted "
                         "on one step of the same batch shape x steps") if counted_all else "not counted",
        "parameters": _optional(runtime, "parameter_counts"),
        "peak_memory_bytes": tally.peak_memory_bytes,
        "peak_memory_method": _memory_method(runtime, tally.peak_memory_bytes),
        "wall_time_s": wall, "train_time_s": float(sum(tally.step_times)), "data_wait_s": tally.data_wait_s,
        "data_workers": run.workers, "cached_images": _cached_images(data),
        "frozen_cache": _frozen_cache(runtime, run.frozen),
        "median_step_time_s": statistics.median(tally.step_times) if tally.step_times else None,
        "compile_time_s": getattr(runtime, "compile_time_s", None),  # torch.compile, not in step times
        # fp16: the steps whose gradients overflowed, left unapplied by the loss scaler
        "skipped_updates": tally.skipped_updates if cfg.backend.precision == "fp16" else None,
        "grad_allreduce_bytes_per_step": statistics.mean(sent) if sent else None,
        "ranks_in_sync": run.ranks_in_sync(), "resumed_from_step": run.resumed_from,
        "num_classes": len(data.classes), "classes": data.classes, "skipped_files": data.skipped_files,
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()},
        "data_fingerprint": getattr(data, "fingerprint", None),  # the files an image folder's split drew from
        "device": str(getattr(runtime, "device", "cpu")), "plan": plan_info,
    }


def _frozen_cache(runtime, planned: dict[str, Any] | None) -> dict[str, Any] | None:
    """The frozen blocks' cache: its size, the share of the steps' images the plan expected it to
    hold and the share it held (over this session's steps: a resumed run's cache starts empty), and
    how often it was emptied."""
    cache = getattr(runtime, "frozen_cache", None)
    if planned is None or cache is None:
        return None
    stats = cache.stats()
    return {**planned, "held_images": stats["held_images"],
            "read_share": stats["hits"] / stats["images"] if stats["images"] else 0.0, "cleared": stats["cleared"]}


def _cached_images(data) -> int | None:
    """How many images the decoded-image cache holds at the end (None: no cache)."""
    caches = [ds for ds in (data.train, data.val) if isinstance(ds, DecodedCache)]  # two caches, never one
    return sum(c.stored for c in caches) if caches else None


def _optional(runtime, method: str, *args: Any) -> Any:
    """``runtime.method(*args)``, or None on a runtime without it: ``every_token_step_flops`` (the ort
    backend, which takes no LoRA, has none) and ``parameter_counts``."""
    fn = getattr(runtime, method, None)
    return fn(*args) if fn is not None else None


def _memory_method(runtime, peak: float | None) -> str | None:
    """How the peak was measured; None where it was not (the ort backend measures no memory)."""
    if peak is None:
        return None
    if getattr(runtime, "device", None) is not None and runtime.device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "torch MemTracker (params, grads, optimizer state, activations) on sampled steps"


def target_miss(summary: dict[str, Any], target: float | None, tolerance: float = 0.03) -> float | None:
    """How far (relative) the run's counted FLOPs landed from ``target`` x full fine-tuning's, where
    beyond ``tolerance``; None where within it, or nothing was counted or targeted."""
    ratio = summary.get("flops_ratio_vs_full")
    if target is None or ratio is None:
        return None
    miss = ratio / target - 1.0
    return miss if abs(miss) > tolerance else None


def _deployment(cfg, metrics: dict[str, Any]) -> dict[str, Any]:
    """How the model is evaluated and exported (``eval_kept_tokens``: its token schedule, None for
    every token), and both candidates when the run dropped tokens."""
    every, sched = metrics.get("all_tokens"), metrics.get("schedule")
    deployed = metrics.get("kept_tokens")
    return {
        "eval_tokens": cfg.policy.eval_tokens, "eval_kept_tokens": deployed,
        "inference_flops_ratio": sched["inference_flops_ratio"] if deployed else None,
        "val_accuracy_all_tokens": every["accuracy"] if every else metrics["accuracy"],
        "val_loss_all_tokens": every["loss"] if every else metrics["loss"],
        "token_schedule": sched["kept_tokens"] if sched else None,
        "val_accuracy_token_schedule": sched["accuracy"] if sched else None,
        "val_loss_token_schedule": sched["loss"] if sched else None,
        "token_schedule_inference_flops_ratio": sched["inference_flops_ratio"] if sched else None,
    }


def write_final(run_dir: Path, runtime, summary: dict[str, Any], cfg: AlastConfig) -> None:
    from safetensors.torch import save

    model = runtime.export_model()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    ckpt.atomic_write_bytes(run_dir / FINAL_WEIGHTS, save(state))  # whole or absent; the umask's mode
    ckpt.atomic_write_json(run_dir / SUMMARY, summary)
    records = read_metrics(run_dir / METRICS)
    budget_heatmap(records, run_dir / HEATMAP, f"{cfg.policy.name}: {cfg.model.name} on {cfg.data.spec}")
