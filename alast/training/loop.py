"""The training loop: the only owner of the step counter. plan -> train_step -> observe.

Guarantees (tested): a run killed at any moment and resumed from its last checkpoint logs the
same losses as an uninterrupted one (weights, optimizer, planner, RNG states and run counters are
checkpointed; batches and the learning rate are pure functions of the step); SIGINT/SIGTERM stop
at the next step boundary after saving a checkpoint; a non-finite loss or a failed checkpoint
write stops the run and leaves the last good checkpoint in place. With several ranks, rank 0
alone writes files, and every rank learns of a failure on rank 0 instead of hanging.
"""
from __future__ import annotations

import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from alast.config import AlastConfig, dump_config
from alast.data import DataBundle, DataError, StepBatchSampler, check_batch_size, eval_batches, train_batches
from alast.data.common import files_changed
from alast.models import run_initial_weights
from alast.training import checkpoint as ckpt
from alast.training.build import build_model, build_planner, create_runtime, data_workers, load_data
from alast.training.frozen import plan_frozen_cache, setup_frozen_cache
from alast.training.process import Comm, StopOnSignal, on_main, rng_state, seed_everything, set_rng_state
from alast.training.report import METRICS, MetricsWriter
from alast.training.rundir import (
    CONFIG,
    HEATMAP,
    Interrupted,
    check_outside_data,
    check_run_dir,
    check_weights_outside,
    prepare_run_dir,
    release_run_dir,
    resume_options,
)
from alast.training.schedule import lr_at, total_steps
from alast.training.summary import run_summary, write_final
from alast.training.tensorboard import TensorBoardLog
from alast.training.tensorboard import check_available as check_tensorboard
from planners import Observation, StepResult, schedule_from_steps, schedule_window
from runtimes import registry
from runtimes.protocol import LossScaleCollapse, NonFiniteLoss, RuntimeError_, check_budget
from runtimes.token_schedule import drops_tokens, head_reads_prefix, inference_flops
from runtimes.torch_backend.runtime import resolve_device

TIMED_AFTER_STEPS = 10  # output.checkpoint_minutes: the steps timed before the interval is fixed
SKIPPED_IN_A_ROW = 24  # fp16: overflowed steps in a row that stop a run (the scale fell 2**24-fold)


@dataclass
class Hooks:
    """Callbacks for the CLI's progress display (no rendering in the loop itself)."""

    on_start: Callable[[int, int, dict[str, Any]], None] = lambda start, total, info: None
    on_step: Callable[[int, StepResult, dict[str, Any]], None] = lambda step, result, record: None
    on_eval: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_end: Callable[[dict[str, Any]], None] = lambda summary: None


class OutOfMemory(RuntimeError_):
    """The device ran out of memory during a step (exit code 1, one line)."""


@dataclass
class _Tally:
    """Run counters the summary needs; checkpointed so a resumed run reports the whole run."""

    counted_flops: float = 0.0
    uncounted_steps: int = 0
    wall_time_s: float = 0.0  # the earlier sessions' wall time, up to the checkpoint this one resumed from
    step_times: list[float] = field(default_factory=list)
    data_wait_s: float = 0.0  # how long the loop waited for batches
    allreduce_bytes: list[int] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    schedule_window: int = 1
    recent_kept_tokens: list[list[int]] = field(default_factory=list)  # the last schedule_window steps
    skipped_updates: int = 0  # fp16 steps whose gradients overflowed (not applied)
    skipped_in_a_row: int = 0

    def add(self, result: StepResult, allreduce_bytes: int | None, data_wait_s: float = 0.0) -> None:
        recent = self.recent_kept_tokens  # updated in place: no copy of the window every step
        recent.append(list(result.kept_tokens))
        del recent[:-self.schedule_window]
        self.step_times.append(result.step_time_s)
        self.data_wait_s += data_wait_s
        if result.train_flops is None:
            self.uncounted_steps += 1
        else:
            self.counted_flops += result.train_flops
        if allreduce_bytes is not None:
            self.allreduce_bytes.append(int(allreduce_bytes))
        if result.update_skipped:
            self.skipped_updates += 1
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0

    def schedule(self, num_patches: int, trim_last: bool = False) -> tuple[int, ...] | None:
        """The token schedule of the recent steps (None when they kept every token); with
        ``trim_last`` the last block's trimmed count is not part of it."""
        kept = schedule_from_steps(self.recent_kept_tokens, num_patches if trim_last else None)
        return kept if drops_tokens(kept, num_patches) else None

    def peak(self, runtime) -> int | None:
        now = runtime.peak_memory_bytes()
        both = [v for v in (self.peak_memory_bytes, now) if v is not None]
        return max(both) if both else None


def _val_batches(data, cfg: AlastConfig, workers: int = 0, pin_memory: bool = False):
    """Validation batches sized by ``train.eval_batch_size`` (default: for memory, not the train batch)."""
    return eval_batches(data.val, cfg.train.eval_batch_size, workers, pin_memory)


def train(cfg: AlastConfig, run_dir: Path, *, resume: bool = False, hooks: Hooks | None = None,
          comm: Comm | None = None, planner_overrides: dict[str, Any] | None = None,
          plan_info: dict[str, Any] | None = None,
          solve: Callable[[int], tuple[dict[str, Any], dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``run_dir``; returns the summary (also written as summary.json).

    ``solve`` gives ``(planner_overrides, plan_info)`` for a FLOPs target; it runs once the data is
    loaded and the batch checked against it, so a batch the data cannot fill fails before the
    planner profiles the model, and before the run directory is made. It leaves the random
    generators as it found them."""
    hooks = hooks or Hooks()
    comm = comm or Comm()
    run_dir = Path(run_dir)
    t_start = time.perf_counter()  # this session's start: data loading and planning count as wall time
    try:
        return _train(cfg, run_dir, resume, hooks, comm, planner_overrides, plan_info, solve, t_start)
    finally:
        if comm.is_main:
            release_run_dir(run_dir)


def _train(cfg: AlastConfig, run_dir: Path, resume: bool, hooks: Hooks, comm: Comm,
           planner_overrides: dict[str, Any] | None, plan_info: dict[str, Any] | None,
           solve: Callable[[int], tuple[dict[str, Any], dict[str, Any]]] | None, t_start: float) -> dict[str, Any]:
    data, data_cfg, run, steps, plan_info = _start(cfg, run_dir, resume, comm, planner_overrides, plan_info, solve,
                                                   t_start)
    runtime = run.runtime
    start = run.restore() if resume else 0
    if start and run.frozen:  # the cache starts empty here: plan the rest of the run's reads from it
        run.frozen = plan_frozen_cache(cfg, runtime.frozen_cache, run.planner, len(data.train), steps, start)
    if resume and comm.is_main:
        run.say_where_it_resumes(start)
    if not resume:
        on_main(comm, lambda: ckpt.atomic_write_text(run_dir / CONFIG, dump_config(_as_recorded(cfg, run_dir))))

    hooks.on_start(start, steps, {"classes": len(data.classes), "train": len(data.train), "val": len(data.val),
                                  "scored": "tuning" if cfg.data.tune_fraction is not None else "val",
                                  "blocks": runtime.num_blocks, "patches": runtime.num_patches,
                                  "skipped": data.skipped_files, "frozen_cache": run.frozen,
                                  "weights": run_initial_weights(cfg.model)})
    if cfg.output.tensorboard and comm.is_main:
        run.open_tensorboard(start)
    try:
        run.steps(data, start, steps, hooks, truncate=resume)
        # The training peak, read before evaluation and the full fine-tuning reference step allocate.
        run.tally.peak_memory_bytes = run.tally.peak(runtime)
        # Checkpoint before the final evaluation: if it fails (an unreadable validation image, out
        # of memory), --resume redoes only the end, not the training.
        run.save(steps)
        metrics = run.final_evaluation(data)
        run.on_eval(hooks, steps, metrics)
        summary = run_summary(cfg, runtime, data, data_cfg, steps, metrics, run, run.wall_time(), plan_info)

        def write_results() -> None:  # through on_main: a stop signal waits for the files to be written
            write_final(run_dir, runtime, summary, cfg)
            if run.tb:
                run.tb.heatmap(run_dir / HEATMAP, steps)

        on_main(comm, write_results)
    finally:
        if run.tb:
            run.tb.close()
    hooks.on_end(summary)
    return summary


def _as_recorded(cfg: AlastConfig, run_dir: Path) -> AlastConfig:
    """``cfg`` as the run's config.yaml records it: its own folder, and never ``output.force``, so
    that the file, given back to ``alast train`` as a config, cannot replace a run unasked."""
    recorded = cfg.model_copy(deep=True)
    recorded.output.dir, recorded.output.force = run_dir, False
    return recorded


def _start(cfg: AlastConfig, run_dir: Path, resume: bool, comm: Comm, planner_overrides: dict[str, Any] | None,
           plan_info: dict[str, Any] | None, solve: Callable[[int], tuple[dict[str, Any], dict[str, Any]]] | None,
           t_start: float) -> tuple[DataBundle, dict[str, Any], _Run, int, dict[str, Any] | None]:
    """Everything before the first step: checks, seeding, data, the target's plan, the run dir, the
    model, runtime and planner. Returns the data and its config, the run, its length in steps, and
    the plan's description."""
    if cfg.output.tensorboard:
        on_main(comm, check_tensorboard)  # every rank gets the one error, not a peer's lost connection
    on_main(comm, lambda: check_run_dir(run_dir, resume, cfg.output.force))
    check_outside_data(run_dir, cfg.data.spec)
    check_weights_outside(run_dir, cfg.model.checkpoint, cfg.output.force and not resume)
    if cfg.backend.threads:
        torch.set_num_threads(cfg.backend.threads)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    resolve_device(cfg.backend.device)  # a device that is not there stops the run before any data download
    registry.check_runtime_config(cfg.backend.name, cfg)  # as early: what the backend would refuse

    workers = data_workers(cfg)
    data, data_cfg = load_data(cfg, workers)
    check_batch_size(len(data.train), cfg.train.batch_size, comm.world_size)
    steps = total_steps(cfg, len(data.train))
    if solve is not None:
        # profiling builds models from the seeded generators; whether it runs (or the cost model is
        # cached) must not change the run: the seeded state is put back
        seeded = rng_state()
        planner_overrides, plan_info = solve(steps)
        set_rng_state(seeded)
    # a resumed run's checkpoint holds every weight: the file it started from may be gone by now
    saved = any((run_dir / ckpt.CKPT_DIR).glob(f"step_*{ckpt.SUFFIX}")) if resume else False
    from_run = (saved and cfg.backend.name == "torch" and cfg.model.checkpoint is not None
                and not Path(cfg.model.checkpoint).exists())
    built = (cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": None, "pretrained": False})})
             if from_run else cfg)
    model = build_model(built, len(data.classes))
    runtime = create_runtime(cfg, model, comm=comm.extra)
    if comm.world_size > 1 and not runtime.capabilities.data_parallel:
        raise ValueError(f"the {runtime.name} runtime cannot train data parallel; use --backend torch or one process")
    planner = build_planner(cfg, runtime.num_blocks, planner_overrides, head_reads_prefix=head_reads_prefix(model),
                            world_size=comm.world_size)
    frozen = setup_frozen_cache(cfg, runtime, planner, len(data.train), steps, comm.world_size)
    # only now, with every check passed, is --out made (or an old run in it replaced with --force)
    on_main(comm, lambda: prepare_run_dir(run_dir, resume, cfg.output.force))
    if comm.is_main and hasattr(runtime, "bind_run_dir"):
        runtime.bind_run_dir(run_dir)  # the ort backend caches its artifact sets in the run dir
    run = _Run(cfg, run_dir, comm, runtime, planner, t_start, data.fingerprint, data.train_files, data.classes)
    run.workers = workers
    run.frozen = frozen
    run.weights_from_run = from_run
    run.tally.schedule_window = schedule_window(steps)
    return data, data_cfg, run, steps, plan_info


class _Run:
    """The state of one run between steps, and what the loop does with it."""

    def __init__(self, cfg: AlastConfig, run_dir: Path, comm: Comm, runtime, planner, t_start: float,
                 data_fingerprint: dict[str, Any] | None = None, train_files: dict[str, Any] | None = None,
                 classes: list[str] | None = None) -> None:
        self.cfg, self.run_dir, self.comm, self.runtime, self.planner = cfg, run_dir, comm, runtime, planner
        self.trim_last = bool(getattr(planner, "trim_last", False))
        self.tally = _Tally()
        self.last_ckpt: Path | None = None
        self.resumed_from: int | None = None
        self.data_fingerprint = data_fingerprint  # the image folder's files the split drew from (checkpointed)
        self.train_files = train_files  # a train/ folder's files, where a val/ folder beside it validates
        self.classes = classes  # the labels' names, in order (checkpointed: a resume must read them alike)
        self.weights_from_run = False  # the model was built without its starting weights: a checkpoint must hold them
        self.tb: TensorBoardLog | None = None
        self.pending: tuple | None = None  # a launched step not yet read back (sync-free runtimes)
        self.unobserved: Observation | None = None  # read back, not yet given to the planner
        self.current_step: int | None = None  # the step being run (for the out-of-memory message)
        self.t_start = t_start  # this session's start (perf_counter)
        self.workers = 0  # DataLoader workers (alast.training.build.data_workers: decided once, before the data)
        self.frozen: dict[str, Any] | None = None  # the frozen blocks' cache (alast.training.frozen), None: off

    def open_tensorboard(self, start: int) -> None:
        """Start the TensorBoard log (rank 0). Full fine-tuning's step FLOPs, the denominator of the
        running ratio, are counted here, before training, so that the reference step cannot raise
        the training peak the run reports (on CUDA the peak counter is reset after it)."""
        rt, ws = self.runtime, self.comm.world_size
        full = rt.full_ft_step_flops(self.cfg.train.batch_size // ws)
        full = None if full is None else full * ws  # the whole step, as the records count it
        device = getattr(rt, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.tb = TensorBoardLog(self.run_dir, start, full)
        counted_steps = len(self.tally.step_times) - self.tally.uncounted_steps
        self.tb.resume_counts(self.tally.counted_flops * ws, counted_steps)

    def on_eval(self, hooks: Hooks, step: int, metrics: dict[str, float]) -> None:
        hooks.on_eval(step, metrics)
        if self.tb:
            self.tb.evaluation(step, metrics)

    def eval_schedule(self) -> tuple[int, ...] | None:
        """The token schedule evaluation uses during training: the recent steps' with
        ``policy.eval_tokens: trained``, none (every token) with ``all`` and ``auto``."""
        if self.cfg.policy.eval_tokens != "trained":
            return None
        return self.tally.schedule(self.runtime.num_patches, self.trim_last)

    def evaluate(self, data) -> dict[str, Any]:
        return self.runtime.evaluate(_val_batches(data, self.cfg, self.workers, self.pin_memory), self.eval_schedule())

    def final_evaluation(self, data) -> dict[str, Any]:
        """The final metrics of the deployed model (``kept_tokens``: its token schedule, None for
        every token) and, when the run dropped tokens, both candidates with their inference costs."""
        mode = self.cfg.policy.eval_tokens
        kept = None if mode == "all" else self.tally.schedule(self.runtime.num_patches, self.trim_last)
        every = self.runtime.evaluate(_val_batches(data, self.cfg, self.workers, self.pin_memory))
        if kept is None:
            return {**every, "kept_tokens": None}
        scheduled = self.runtime.evaluate(_val_batches(data, self.cfg, self.workers, self.pin_memory), kept)
        use = mode == "trained" or scheduled["accuracy"] >= every["accuracy"]
        vit = getattr(self.runtime, "timm_model", None) or self.runtime.model
        return {**(scheduled if use else every), "kept_tokens": list(kept) if use else None,
                "all_tokens": {k: every[k] for k in ("accuracy", "loss")},
                "schedule": {"kept_tokens": list(kept), "accuracy": scheduled["accuracy"], "loss": scheduled["loss"],
                             "inference_flops_ratio": inference_flops(vit, kept, self.cfg.policy.fuse_tokens,
                                                                                self.cfg.policy.token_score)
                                                      / inference_flops(vit, None)}}

    def restore(self) -> int:
        """Load the newest readable checkpoint (every rank reads it); the step to continue from."""
        from alast.training.resume import check_compatible, check_world_size

        found = ckpt.latest_checkpoint(self.run_dir, warn=self._warn, set_aside=self.comm.is_main)
        if found is None and self.weights_from_run:  # none readable: the run would start from random weights
            from alast.models import ModelError

            raise ModelError(f"cannot resume {self.run_dir}: no checkpoint of it is readable, and the weights it "
                             f"started from ({self.cfg.model.checkpoint}) are gone; restore that file, or start a "
                             "new run")
        if found is None:
            return 0
        self.last_ckpt, state = found
        check_compatible(state["config"], self.cfg, self.run_dir)
        check_world_size(state.get("world_size", 1), self.comm.world_size, self.run_dir)
        self._check_same_data(state)
        self.runtime.load_state_dict(state["runtime"])
        self.planner.load_state_dict(state["planner"])
        set_rng_state(state["rng"])
        if state.get("rank_random"):  # each rank continues its own draws, not rank 0's
            self._set_random_state(state["rank_random"][self.comm.rank])
        if "tally" in state:
            self.tally = _Tally(**{**state["tally"], "schedule_window": self.tally.schedule_window})
        self.resumed_from = int(state["step"])
        if state.get("unobserved"):
            self.unobserved = Observation(**{**state["unobserved"], "deltas": tuple(state["unobserved"]["deltas"])})
        return self.resumed_from

    def _check_same_data(self, state: dict[str, Any]) -> None:
        """Refuse to resume on other data than the run started with: other classes (its outputs would be
        read as other labels), other training files (its batches would not be the run's), or other files
        to split (the split would move images between training and validation). Checkpoints from
        before a record was kept are not checked against it."""
        then = state.get("classes")
        if then is not None and self.classes is not None and list(then) != list(self.classes):
            gone, new = [c for c in then if c not in self.classes], [c for c in self.classes if c not in then]
            what = "; ".join(part for part in (f"gone: {', '.join(gone[:3])}" if gone else "",
                                               f"new: {', '.join(new[:3])}" if new else "") if part) or "reordered"
            raise DataError(f"cannot resume {self.run_dir}: the data's classes changed since the run started ({what}): "
                            "the model's outputs would be read as other classes; restore the data as it was, or "
                            "start a new run")
        changed = files_changed(state.get("train_files"), self.train_files,
                                gone="the data is no longer a training folder beside a validation folder")
        if changed is not None:
            raise DataError(f"cannot resume {self.run_dir}: the training files in {changed[0]} changed since the run "
                            f"started ({changed[1]}): the steps after the resume would not draw the run's batches; "
                            "restore the folder as it was, or start a new run")
        changed = files_changed(state.get("data_fingerprint"), self.data_fingerprint)
        if changed is not None:
            raise DataError(f"cannot resume {self.run_dir}: the files in {changed[0]} changed since the run started "
                            f"({changed[1]}): its split by data.val_fraction would move images between training "
                            "and validation; restore the folder as it was, or start a new run")

    def steps_per(self, minutes: float) -> int:
        """How many steps take about ``minutes``, from the median time of this session's steps."""
        recent = self.tally.step_times[-TIMED_AFTER_STEPS:]
        if not recent:
            return 0
        return max(1, round(minutes * 60 / max(statistics.median(recent), 1e-9)))

    def say_where_it_resumes(self, start: int) -> None:
        """One line: the checkpoint the run continues from, or that it has none and starts again."""
        if self.last_ckpt is not None:
            print(f"resuming from {self.last_ckpt} (step {start})", file=sys.stderr, flush=True)
            if not (self.run_dir / METRICS).exists():
                self._warn(f"{self.run_dir / METRICS} is missing: its log, and {HEATMAP}, start at step {start}")
        else:
            self._warn(f"no checkpoint in {self.run_dir / ckpt.CKPT_DIR}: the run starts again from step 0 "
                       "(a run writes one about every output.checkpoint_minutes, on Ctrl-C and at its end)")

    def _warn(self, message: str) -> None:
        if self.comm.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    @property
    def pin_memory(self) -> bool:
        """Whether batches come in page-locked memory: for a CUDA device, whose copies then do not wait."""
        device = getattr(self.runtime, "device", None)
        return device is not None and device.type == "cuda"

    def wall_time(self) -> float:
        """The run's wall time so far: the earlier sessions' and this one's."""
        return self.tally.wall_time_s + time.perf_counter() - self.t_start

    def _random_state(self) -> dict[str, Any]:
        """This rank's random generators: its own token draws (seeded per rank) and the global ones."""
        tokens = getattr(self.runtime, "token_rng", None)
        return {"rng": rng_state(), "token_rng": None if tokens is None else tokens.get_state()}

    def _set_random_state(self, state: dict[str, Any]) -> None:
        set_rng_state(state["rng"])
        if state["token_rng"] is not None:
            self.runtime.token_rng.set_state(state["token_rng"])

    def save(self, step_done: int) -> Path | None:
        """Checkpoint after ``step_done`` steps (rank 0 writes, with every rank's random state; all
        ranks learn if it failed)."""
        ranks = self.comm.all_gather_object(self._random_state()) if self.comm.world_size > 1 else None

        def write() -> Path:
            payload = {"step": step_done, "runtime": self.runtime.state_dict(), "planner": self.planner.state_dict(),
                       "rng": rng_state(), "config": self.cfg.model_dump(mode="json"),
                       "tally": asdict(self.tally) | {"peak_memory_bytes": self.tally.peak(self.runtime),
                                                      "wall_time_s": self.wall_time()},
                       "world_size": self.comm.world_size, "rank_random": ranks,
                       "unobserved": asdict(self.unobserved) if self.unobserved else None,
                       "data_fingerprint": self.data_fingerprint, "train_files": self.train_files,
                       "classes": self.classes}
            try:
                return ckpt.save_checkpoint(self.run_dir, step_done, payload, self.cfg.output.keep_last)
            except OSError as exc:
                kept = f"the last good checkpoint {self.last_ckpt} is intact" if self.last_ckpt else "no checkpoint kept"
                raise ckpt.CheckpointError(
                    f"cannot write the step-{step_done} checkpoint in {self.run_dir / ckpt.CKPT_DIR}: "
                    f"{exc.strerror or exc}; {kept}; free space and continue with "
                    f"{resume_options(self.comm.world_size, self.run_dir)}") from None

        self.last_ckpt = on_main(self.comm, write) or self.last_ckpt
        return self.last_ckpt

    def steps(self, data, start: int, steps: int, hooks: Hooks, truncate: bool) -> None:
        cfg, comm = self.cfg, self.comm
        sampler = StepBatchSampler(len(data.train), cfg.train.batch_size, cfg.train.seed, start, steps,
                                   comm.rank, comm.world_size)
        # the frozen blocks' cache keys each image by its index: a second sampler gives them, step by step
        keyed = (StepBatchSampler(len(data.train), cfg.train.batch_size, cfg.train.seed, start, steps, comm.rank,
                                  comm.world_size) if self.frozen else None)
        writer = MetricsWriter(self.run_dir, truncate_after_step=start if truncate else None) if comm.is_main else None
        timed_every = 0  # steps between timed checkpoints, once the first steps are timed
        try:
            with StopOnSignal() as stop:
                batches = iter(train_batches(data.train, sampler, self.workers, augment=cfg.data.augment,
                                             pin_memory=self.pin_memory))
                for step in range(start, steps):
                    asked = time.perf_counter()
                    images, labels = next(batches)
                    waited = time.perf_counter() - asked
                    keys = keyed.indices(step) if keyed is not None else None
                    done = self.step(images, labels, step, steps, hooks, writer, waited, keys) + 1
                    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
                        self.flush(hooks, writer)
                        self.on_eval(hooks, done, self.evaluate(data))
                    if done - start == TIMED_AFTER_STEPS and cfg.output.checkpoint_minutes:
                        timed_every = on_main(comm, lambda: self.steps_per(cfg.output.checkpoint_minutes))
                    saved = done < steps and (
                        cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0
                        or timed_every and (done - start) % timed_every == 0)
                    if saved:
                        self.flush(hooks, writer)
                        self.save(done)
                    if comm.any_true(stop.requested):  # at the last step too: the evaluation can take minutes
                        self.flush(hooks, writer)
                        raise Interrupted(done, self.last_ckpt if saved else self.save(done), self.comm.world_size,
                                          self.run_dir)
                self.flush(hooks, writer)
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message()) from None
        except NonFiniteLoss as exc:
            kept = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
            exc.args = (f"{exc.args[0] if exc.args else exc}; stopped, {kept}",)
            raise
        except RuntimeError as exc:  # the CPU allocator's failure is a plain RuntimeError (after NonFiniteLoss, one too)
            if "can't allocate memory" not in str(exc):
                raise
            raise OutOfMemory(self._oom_message(cpu_failure=str(exc))) from None
        finally:
            if writer:
                writer.close()

    def step(self, images, labels, step: int, steps: int, hooks: Hooks, writer, data_wait_s: float = 0.0,
             keys: list[int] | None = None) -> int:
        """One plan -> train_step -> observe; returns ``step``. ``data_wait_s``: how long the loop
        waited for this step's batch; ``keys``: its images' training indices, for the runtime's cache
        of the frozen blocks (None: no cache).

        A sync-free runtime (``observe_lag``) launches step i and only then reads back step i-1,
        which the planner observes after planning step i: budgets lag one step (docs/gpu.md).
        """
        cfg, runtime = self.cfg, self.runtime
        progress = step / steps
        budget = self.planner.plan(step, progress)
        check_budget(runtime, budget)
        lr = lr_at(step, steps, cfg.train.lr, cfg.train.warmup_frac, cfg.train.min_lr_frac)
        self.current_step = step
        cached = {} if keys is None else {"keys": keys}
        if not getattr(runtime, "observe_lag", False):
            result = runtime.train_step(images, labels, budget, lr, step, **cached)
            self.planner.observe(Observation(step, progress, result.deltas, result.loss))
            self._log(step, budget, lr, result, (self._sent_bytes(), data_wait_s), hooks, writer)
            return step
        launched = runtime.launch_step(images, labels, budget, lr, step, **cached)
        extra = (self._sent_bytes(), data_wait_s)
        self.flush(hooks, writer)
        if self.unobserved is not None:
            self.planner.observe(self.unobserved)
            self.unobserved = None
        self.pending = (launched, budget, lr, progress, extra)
        return step

    def flush(self, hooks: Hooks, writer) -> None:
        """Read back the launched step and log it; its observation waits for the next launch, so
        flushing at a checkpoint, an evaluation or the end never changes what the planner sees."""
        if self.pending is None:
            return
        launched, budget, lr, progress, extra = self.pending
        self.pending = None
        result = launched.resolve()
        self.unobserved = Observation(launched.step, progress, result.deltas, result.loss)
        self._log(launched.step, budget, lr, result, extra, hooks, writer)

    def _sent_bytes(self) -> int | None:
        return getattr(self.comm.extra, "last_bytes", None) if self.comm.world_size > 1 else None

    def _log(self, step: int, budget, lr: float, result: StepResult, extra: tuple[int | None, float], hooks: Hooks,
             writer) -> None:
        """Log a read-back step; ``extra``: the bytes its gradients' all-reduce sent (None: one
        process) and the seconds the loop waited for its batch."""
        sent, data_wait_s = extra
        self.tally.add(result, sent, data_wait_s)
        record = {"step": step, "loss": result.loss, "lr": lr, "budgets": list(budget.budgets),
                  "keep_ratios": list(budget.keep_ratios), "tokens_in": list(result.tokens_in),
                  "kept_tokens": list(result.kept_tokens), "trained_blocks": list(result.trained_blocks),
                  "deltas": list(result.deltas), "batch_size": result.batch_size * self.comm.world_size,
                  "step_time_s": result.step_time_s, "data_wait_s": data_wait_s,
                  # the whole step's FLOPs, over every process's share
                  "train_flops": None if result.train_flops is None else result.train_flops * self.comm.world_size,
                  "memory_measured": result.memory_measured}
        if not result.embeddings_trained:
            record["embeddings_trained"] = False
        if self.frozen:
            record["cached_images"] = result.cached_images
        if result.compile_time_s:
            record["compile_time_s"] = result.compile_time_s
        if result.loss_scale is not None:
            record["loss_scale"] = result.loss_scale
            record["update_skipped"] = result.update_skipped
        if sent is not None:
            record["grad_allreduce_bytes"] = sent
        if writer:
            writer.write(record)
        if self.tb:
            self.tb.step(record)
        hooks.on_step(step, result, record)
        if self.tally.skipped_in_a_row >= SKIPPED_IN_A_ROW:
            raise LossScaleCollapse(step, self.tally.skipped_in_a_row, result.loss_scale)

    def _oom_message(self, cpu_failure: str | None = None) -> str:
        """One line: where it ran out, how to see the predicted peak, what to lower. ``cpu_failure``:
        the CPU allocator's message (it names the size it could not get)."""
        batch, micro = self.cfg.train.batch_size, self.cfg.train.micro_batch_size
        kept = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
        passes = f" in passes of {micro}" if micro is not None and micro < batch else ""
        plan = f"`alast plan --batch-size {batch}" + (f" --micro-batch-size {micro}`" if passes else "`")
        smaller = ("a lower --micro-batch-size" if passes else "--micro-batch-size (the same steps in smaller "
                   "passes, gradients accumulated; --resume takes it)") + ", a lower --batch-size"
        if cpu_failure is None:
            cache = getattr(self.runtime, "frozen_cache", None)
            held = (f" (the frozen blocks' cache holds {cache.nbytes / 2**20:.0f} MiB of it: a lower "
                    "backend.frozen_cache_mib, or backend.frozen_cache=off)") if cache is not None and \
                cache.device.type == "cuda" else ""
            return (f"out of GPU memory at step {self.current_step} with batch size {batch}{passes}{held}; {plan} "
                    f"predicts the peak; use {smaller}, backend.precision=bf16 (fp16 on a GPU without bf16) or a "
                    f"lower --target-flops; {kept}")
        size = re.search(r"allocate (\d+) bytes", cpu_failure)
        asked = f" (a tensor of {int(size.group(1)) / 2**30:.2f} GiB did not fit)" if size else ""
        px = f" at {self.cfg.model.img_size} px" if self.cfg.model.img_size else ""
        return (f"out of memory at step {self.current_step} with batch size {batch}{passes}{px}{asked}; {plan} "
                f"predicts the peak; use {smaller} or --img-size (model.img_size); {kept}")

    def ranks_in_sync(self) -> bool | None:
        """Whether all ranks hold bit-identical weights (None with one rank)."""
        model = getattr(self.runtime, "model", None)
        if self.comm.world_size <= 1 or model is None or not hasattr(self.comm.extra, "all_equal"):
            return None
        from runtimes.distributed import weights_digest

        return self.comm.extra.all_equal(weights_digest(list(model.parameters())))
