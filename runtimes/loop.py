"""The training loop: the only owner of the step counter. plan -> train_step -> observe."""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from planners import Observation, StepResult

from . import checkpoint as ckpt
from .config import AlastConfig, dump_config
from .data import StepBatchSampler, eval_batches, train_batches
from .pipeline import build_model, build_planner, create_runtime, load_data
from .protocol import check_budget
from .report import METRICS, MetricsWriter, budget_heatmap, read_metrics
from .schedule import lr_at

SUMMARY = "summary.json"
CONFIG = "config.yaml"
FINAL_WEIGHTS = "final_model.safetensors"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, missing, or incompatible)."""


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was written first."""

    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {path}")
        self.step, self.path = step, path


@dataclass
class Hooks:
    """Callbacks for the CLI's progress display (no rendering in the loop itself)."""

    on_start: Callable[[int, int, dict[str, Any]], None] = lambda start, total, info: None
    on_step: Callable[[int, StepResult, dict[str, Any]], None] = lambda step, result, record: None
    on_eval: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_end: Callable[[dict[str, Any]], None] = lambda summary: None


@dataclass
class Comm:
    """Rank info for the loop; the distributed module supplies a real one."""

    rank: int = 0
    world_size: int = 1
    extra: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def total_steps(cfg: AlastConfig, n_train: int) -> int:
    t = cfg.train
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * (n_train // t.batch_size)))
    return int(t.steps)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    if resume:
        if not (run_dir / CONFIG).exists():
            raise RunDirError(f"cannot resume {run_dir}: no {CONFIG} there; start a new run instead")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise RunDirError(f"run dir {run_dir} exists and is not empty; pass --resume to continue it, "
                          "--force to write into it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)


def train(cfg: AlastConfig, run_dir: Path, *, resume: bool = False, hooks: Hooks | None = None,
          comm: Comm | None = None, planner_overrides: dict[str, Any] | None = None,
          plan_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``run_dir``; returns the summary (also written as summary.json)."""
    hooks = hooks or Hooks()
    comm = comm or Comm()
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    if comm.is_main:
        prepare_run_dir(run_dir, resume, cfg.output.force)
    if cfg.backend.threads:
        torch.set_num_threads(cfg.backend.threads)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    data, data_cfg = load_data(cfg)
    model = build_model(cfg, len(data.classes))
    runtime = create_runtime(cfg, model, comm=comm.extra)
    planner = build_planner(cfg, runtime.num_blocks, planner_overrides)
    steps = total_steps(cfg, len(data.train))

    start = 0
    if resume:
        found = ckpt.latest_checkpoint(run_dir)
        if found is not None:
            _, state = found
            runtime.load_state_dict(state["runtime"])
            planner.load_state_dict(state["planner"])
            set_rng_state(state["rng"])
            start = int(state["step"])
    if comm.is_main and not resume:
        ckpt.atomic_write_text(run_dir / CONFIG, dump_config(cfg))

    sampler = StepBatchSampler(len(data.train), cfg.train.batch_size, cfg.train.seed, start, steps,
                               comm.rank, comm.world_size)
    writer = MetricsWriter(run_dir, truncate_after_step=start if resume else None) if comm.is_main else None
    hooks.on_start(start, steps, {"classes": len(data.classes), "train": len(data.train), "val": len(data.val),
                                  "blocks": runtime.num_blocks, "patches": runtime.num_patches})

    step_times: list[float] = []
    counted_flops = 0.0
    uncounted_steps = 0
    last_ckpt: Path | None = None
    step = start

    def save(step_done: int) -> Path | None:
        if not comm.is_main:
            return None
        payload = {"step": step_done, "runtime": runtime.state_dict(), "planner": planner.state_dict(),
                   "rng": rng_state(), "config": cfg.model_dump(mode="json"), "counted_flops": counted_flops,
                   "uncounted_steps": uncounted_steps}
        return ckpt.save_checkpoint(run_dir, step_done, payload, cfg.output.keep_last)

    if resume and start > 0:
        prev = [r for r in read_metrics(run_dir / METRICS) if r["step"] < start] if comm.is_main else []
        counted_flops = sum(r.get("train_flops") or 0.0 for r in prev)
        uncounted_steps = sum(1 for r in prev if r.get("train_flops") is None)
        step_times = [r["step_time_s"] for r in prev]

    try:
        batches = train_batches(data.train, sampler, cfg.data.num_workers)
        for step, (images, labels) in zip(range(start, steps), batches):
            progress = step / steps
            budget = planner.plan(step, progress)
            check_budget(runtime, budget)
            lr = lr_at(step, steps, cfg.train.lr, cfg.train.warmup_frac, cfg.train.min_lr_frac)
            result = runtime.train_step(images, labels, budget, lr, step)
            planner.observe(Observation(step, progress, result.deltas, result.loss))
            step_times.append(result.step_time_s)
            if result.train_flops is None:
                uncounted_steps += 1
            else:
                counted_flops += result.train_flops
            record = {"step": step, "loss": result.loss, "lr": lr, "budgets": list(budget.budgets),
                      "keep_ratios": list(budget.keep_ratios), "tokens_in": list(result.tokens_in),
                      "kept_tokens": list(result.kept_tokens), "trained_blocks": list(result.trained_blocks),
                      "deltas": list(result.deltas), "batch_size": result.batch_size * comm.world_size,
                      "step_time_s": result.step_time_s, "train_flops": result.train_flops}
            if writer:
                writer.write(record)
            hooks.on_step(step, result, record)
            done = step + 1
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
                hooks.on_eval(done, runtime.evaluate(eval_batches(data.val, cfg.train.batch_size)))
            if cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0 and done < steps:
                last_ckpt = save(done)
    except KeyboardInterrupt:
        path = save(step)
        raise Interrupted(step, path) from None
    finally:
        if writer:
            writer.close()

    metrics = runtime.evaluate(eval_batches(data.val, cfg.train.batch_size))
    hooks.on_eval(steps, metrics)
    last_ckpt = save(steps)
    full_step = runtime.full_ft_step_flops(cfg.train.batch_size // comm.world_size)
    summary = _summary(cfg, run_dir, runtime, data, data_cfg, steps, metrics, counted_flops, uncounted_steps,
                       full_step, step_times, time.perf_counter() - t_start, comm, plan_info)
    if comm.is_main:
        _write_final(run_dir, runtime, summary, cfg)
    hooks.on_end(summary)
    return summary


def _summary(cfg, run_dir, runtime, data, data_cfg, steps, metrics, counted_flops, uncounted_steps, full_step,
             step_times, wall, comm, plan_info) -> dict[str, Any]:
    ws = comm.world_size
    counted_all = uncounted_steps == 0 and cfg.backend.count_flops != "off"
    train_flops = counted_flops * ws if counted_all else None
    full = full_step * steps * ws if full_step is not None and counted_all else None
    return {
        "policy": cfg.policy.name, "backend": runtime.name, "model": cfg.model.name, "data": cfg.data.spec,
        "steps": steps, "batch_size": cfg.train.batch_size, "world_size": ws,
        "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"], "val_samples": metrics["samples"],
        "train_flops": train_flops, "full_ft_train_flops": full,
        "flops_ratio_vs_full": (train_flops / full) if train_flops and full else None,
        "flops_method": ("torch.utils.flop_counter on every executed step (forward+backward, 2 flops per "
                         "multiply-add, CPU fused attention registered); full fine-tuning counted on one "
                         "step of the same batch shape x steps") if counted_all else "not counted",
        "peak_memory_bytes": runtime.peak_memory_bytes(),
        "peak_memory_method": ("torch.cuda.max_memory_allocated" if getattr(runtime, "device", None) is not None
                               and runtime.device.type == "cuda" else
                               "torch MemTracker (params, grads, optimizer state, activations) on sampled steps"),
        "wall_time_s": wall, "train_time_s": float(sum(step_times)),
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "num_classes": len(data.classes), "classes": data.classes, "skipped_files": data.skipped_files,
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()},
        "device": str(getattr(runtime, "device", "cpu")), "plan": plan_info,
    }


def _write_final(run_dir: Path, runtime, summary: dict[str, Any], cfg: AlastConfig) -> None:
    from safetensors.torch import save_file

    model = runtime.export_model()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / (FINAL_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(run_dir / FINAL_WEIGHTS)
    ckpt.atomic_write_json(run_dir / SUMMARY, summary)
    records = read_metrics(run_dir / METRICS)
    budget_heatmap(records, run_dir / "budgets.png", f"{cfg.policy.name}: {cfg.model.name} on {cfg.data.spec}")
