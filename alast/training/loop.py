"""The training loop: the only owner of the step counter. plan -> train_step -> observe.

Guarantees (tested): a run killed at any moment and resumed from its last checkpoint logs the
same losses as an uninterrupted one (weights, optimizer, planner, RNG states and run counters are
checkpointed; batches and the learning rate are pure functions of the step); SIGINT/SIGTERM stop
at the next step boundary after saving a checkpoint; a non-finite loss or a failed checkpoint
write stops the run and leaves the last good checkpoint in place. With several ranks, rank 0
alone writes files, and every rank learns of a failure on rank 0 instead of hanging.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from alast.config import AlastConfig, dump_config
from alast.data import StepBatchSampler, eval_batches, train_batches
from alast.training import checkpoint as ckpt
from alast.training.build import build_model, build_planner, create_runtime, load_data
from alast.training.report import MetricsWriter
from alast.training.rundir import CONFIG, Interrupted, prepare_run_dir
from alast.training.schedule import lr_at, total_steps
from alast.training.summary import run_summary, write_final
from planners import Observation, StepResult
from runtimes.protocol import NonFiniteLoss, check_budget


@dataclass
class Hooks:
    """Callbacks for the CLI's progress display (no rendering in the loop itself)."""

    on_start: Callable[[int, int, dict[str, Any]], None] = lambda start, total, info: None
    on_step: Callable[[int, StepResult, dict[str, Any]], None] = lambda step, result, record: None
    on_eval: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_end: Callable[[dict[str, Any]], None] = lambda summary: None


@dataclass
class Comm:
    """Rank info for the loop; ``extra`` is the communicator (runtimes.distributed.TorchComm)."""

    rank: int = 0
    world_size: int = 1
    extra: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _has(self, method: str) -> bool:
        return self.world_size > 1 and hasattr(self.extra, method)

    def any_true(self, flag: bool) -> bool:
        return self.extra.any_true(flag) if self._has("any_true") else flag

    def broadcast_object(self, obj: Any) -> Any:
        return self.extra.broadcast_object(obj) if self._has("broadcast_object") else obj


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


@dataclass
class _Tally:
    """Run counters the summary needs; checkpointed so a resumed run reports the whole run."""

    counted_flops: float = 0.0
    uncounted_steps: int = 0
    step_times: list[float] = field(default_factory=list)
    allreduce_bytes: list[int] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    def add(self, result: StepResult, allreduce_bytes: int | None) -> None:
        self.step_times.append(result.step_time_s)
        if result.train_flops is None:
            self.uncounted_steps += 1
        else:
            self.counted_flops += result.train_flops
        if allreduce_bytes is not None:
            self.allreduce_bytes.append(int(allreduce_bytes))

    def peak(self, runtime) -> int | None:
        now = runtime.peak_memory_bytes()
        both = [v for v in (self.peak_memory_bytes, now) if v is not None]
        return max(both) if both else None


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second one stops at once.

    Stopping between steps keeps the checkpoint consistent (an exception mid-step could land
    after the optimizer update but before the planner saw the step). Handlers are only installed
    from the main thread (Python's rule); elsewhere signals keep their default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _val_batches(data, cfg: AlastConfig):
    """Validation batches sized by ``train.eval_batch_size`` (default: for memory, not the train batch)."""
    return eval_batches(data.val, cfg.train.eval_batch_size, cfg.data.num_workers)


def _on_main(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result or raises its exception."""
    result, error = None, None
    if comm.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    if comm.world_size > 1:
        error = comm.broadcast_object(_portable(error))
        result = comm.broadcast_object(result if error is None else None)
    if error is not None:
        raise error
    return result


def _portable(exc: BaseException | None) -> BaseException | None:
    """``exc`` if it survives pickling (to send to the other ranks), else a same-message RuntimeError."""
    import pickle

    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - custom exception signatures do not always pickle
        return RuntimeError(str(exc))


def train(cfg: AlastConfig, run_dir: Path, *, resume: bool = False, hooks: Hooks | None = None,
          comm: Comm | None = None, planner_overrides: dict[str, Any] | None = None,
          plan_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``run_dir``; returns the summary (also written as summary.json)."""
    hooks = hooks or Hooks()
    comm = comm or Comm()
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    _on_main(comm, lambda: prepare_run_dir(run_dir, resume, cfg.output.force))
    if cfg.backend.threads:
        torch.set_num_threads(cfg.backend.threads)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    data, data_cfg = load_data(cfg)
    model = build_model(cfg, len(data.classes))
    runtime = create_runtime(cfg, model, comm=comm.extra)
    if comm.world_size > 1 and not runtime.capabilities.data_parallel:
        raise ValueError(f"the {runtime.name} runtime cannot train data parallel; use --backend torch or one process")
    if comm.is_main and hasattr(runtime, "bind_run_dir"):
        runtime.bind_run_dir(run_dir)  # the ort backend caches its artifact sets in the run dir
    planner = build_planner(cfg, runtime.num_blocks, planner_overrides)
    steps = total_steps(cfg, len(data.train))
    run = _Run(cfg, run_dir, comm, runtime, planner)
    start = run.restore() if resume else 0
    if not resume:
        _on_main(comm, lambda: ckpt.atomic_write_text(run_dir / CONFIG, dump_config(cfg)))

    hooks.on_start(start, steps, {"classes": len(data.classes), "train": len(data.train), "val": len(data.val),
                                  "blocks": runtime.num_blocks, "patches": runtime.num_patches})
    run.steps(data, start, steps, hooks, truncate=resume)
    # The training peak, read before evaluation and the full fine-tuning reference step allocate.
    run.tally.peak_memory_bytes = run.tally.peak(runtime)
    metrics = runtime.evaluate(_val_batches(data, cfg))
    hooks.on_eval(steps, metrics)
    run.save(steps)
    summary = run_summary(cfg, runtime, data, data_cfg, steps, metrics, run, time.perf_counter() - t_start,
                       plan_info)
    if comm.is_main:
        write_final(run_dir, runtime, summary, cfg)
    hooks.on_end(summary)
    return summary


class _Run:
    """The state of one run between steps, and what the loop does with it."""

    def __init__(self, cfg: AlastConfig, run_dir: Path, comm: Comm, runtime, planner) -> None:
        self.cfg, self.run_dir, self.comm, self.runtime, self.planner = cfg, run_dir, comm, runtime, planner
        self.tally = _Tally()
        self.last_ckpt: Path | None = None
        self.resumed_from: int | None = None

    def restore(self) -> int:
        """Load the newest readable checkpoint (every rank reads it); the step to continue from."""
        from alast.training.resume import check_compatible

        found = ckpt.latest_checkpoint(self.run_dir)
        if found is None:
            return 0
        self.last_ckpt, state = found
        check_compatible(state["config"], self.cfg, self.run_dir)
        self.runtime.load_state_dict(state["runtime"])
        self.planner.load_state_dict(state["planner"])
        set_rng_state(state["rng"])
        if "tally" in state:
            self.tally = _Tally(**state["tally"])
        self.resumed_from = int(state["step"])
        return self.resumed_from

    def save(self, step_done: int) -> Path | None:
        """Checkpoint after ``step_done`` steps (rank 0 writes; all ranks learn if it failed)."""
        def write() -> Path:
            payload = {"step": step_done, "runtime": self.runtime.state_dict(), "planner": self.planner.state_dict(),
                       "rng": rng_state(), "config": self.cfg.model_dump(mode="json"),
                       "tally": asdict(self.tally) | {"peak_memory_bytes": self.tally.peak(self.runtime)},
                       "world_size": self.comm.world_size}
            try:
                return ckpt.save_checkpoint(self.run_dir, step_done, payload, self.cfg.output.keep_last)
            except OSError as exc:
                kept = f"the last good checkpoint {self.last_ckpt} is intact" if self.last_ckpt else "no checkpoint kept"
                raise ckpt.CheckpointError(
                    f"cannot write the step-{step_done} checkpoint in {self.run_dir / ckpt.CKPT_DIR}: "
                    f"{exc.strerror or exc}; {kept}; free space and continue with --resume") from None

        self.last_ckpt = _on_main(self.comm, write) or self.last_ckpt
        return self.last_ckpt

    def steps(self, data, start: int, steps: int, hooks: Hooks, truncate: bool) -> None:
        cfg, comm = self.cfg, self.comm
        sampler = StepBatchSampler(len(data.train), cfg.train.batch_size, cfg.train.seed, start, steps,
                                   comm.rank, comm.world_size)
        writer = MetricsWriter(self.run_dir, truncate_after_step=start if truncate else None) if comm.is_main else None
        try:
            with _StopOnSignal() as stop:
                batches = train_batches(data.train, sampler, cfg.data.num_workers)
                for step, (images, labels) in zip(range(start, steps), batches):
                    record = self.step(images, labels, step, steps, hooks, writer)
                    done = record["step"] + 1
                    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
                        hooks.on_eval(done, self.runtime.evaluate(_val_batches(data, cfg)))
                    saved = cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0 and done < steps
                    if saved:
                        self.save(done)
                    if done < steps and comm.any_true(stop.requested):
                        raise Interrupted(done, self.last_ckpt if saved else self.save(done))
        except NonFiniteLoss as exc:
            kept = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
            exc.args = (f"{exc.args[0] if exc.args else exc}; stopped, {kept}",)
            raise
        finally:
            if writer:
                writer.close()

    def step(self, images, labels, step: int, steps: int, hooks: Hooks, writer) -> dict[str, Any]:
        """One plan -> train_step -> observe; returns the metrics record."""
        cfg, runtime = self.cfg, self.runtime
        progress = step / steps
        budget = self.planner.plan(step, progress)
        check_budget(runtime, budget)
        lr = lr_at(step, steps, cfg.train.lr, cfg.train.warmup_frac, cfg.train.min_lr_frac)
        result = runtime.train_step(images, labels, budget, lr, step)
        self.planner.observe(Observation(step, progress, result.deltas, result.loss))
        sent = getattr(self.comm.extra, "last_bytes", None) if self.comm.world_size > 1 else None
        self.tally.add(result, sent)
        record = {"step": step, "loss": result.loss, "lr": lr, "budgets": list(budget.budgets),
                  "keep_ratios": list(budget.keep_ratios), "tokens_in": list(result.tokens_in),
                  "kept_tokens": list(result.kept_tokens), "trained_blocks": list(result.trained_blocks),
                  "deltas": list(result.deltas), "batch_size": result.batch_size * self.comm.world_size,
                  "step_time_s": result.step_time_s, "train_flops": result.train_flops,
                  "memory_measured": result.memory_measured}
        if sent is not None:
            record["grad_allreduce_bytes"] = sent
        if writer:
            writer.write(record)
        hooks.on_step(step, result, record)
        return record

    def ranks_in_sync(self) -> bool | None:
        """Whether all ranks hold bit-identical weights (None with one rank)."""
        model = getattr(self.runtime, "model", None)
        if self.comm.world_size <= 1 or model is None or not hasattr(self.comm.extra, "all_equal"):
            return None
        from runtimes.distributed import weights_digest

        return self.comm.extra.all_equal(weights_digest(list(model.parameters())))
