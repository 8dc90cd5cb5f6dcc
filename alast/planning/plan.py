"""From a run config to the planner: cost models, FLOPs targets, plans, and trace replay.

The planner itself (``planners.simulate``, ``planners.target``) works on plain numbers; this module
builds or loads the cost model a config needs (profiling the model, and its LoRA variant when the
policy uses LoRA), and puts the answers in the shape the CLI prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alast.config import AlastConfig, load_run_config
from alast.models import model_position_kind
from alast.planning.calibrate import calibrate_time
from alast.planning.profile import profile_with_source
from alast.training.build import check_positions, model_data_config, policy_options
from alast.training.report import METRICS, read_metrics
from planners.costmodel import COST_MODEL_VERSION, CostModel, TimeModel, load_cost_model
from planners.simulate import Prediction, inference_flops, replay, simulate
from planners.target import check_target
from planners.target import solve_target as _solve

FLOPS_CONVENTION = ("torch.utils.flop_counter convention: 2 FLOPs per multiply-add, matrix products only "
                    "(linear, attention, patch conv), forward + backward, whole batch, all steps")


def cpu_memory_sampled(step: int) -> bool:
    """Steps on which the torch runtime measures CPU memory by default (TorchRuntime's probe)."""
    from runtimes.torch_backend.memory import default_memory_probe

    return default_memory_probe(step)


class TraceError(ValueError):
    """A run directory cannot be replayed (missing, or without metrics)."""


_warned: set[str] = set()


def warn(message: str) -> None:
    """``warning: message`` on stderr, once per process (a run reads its cost model more than once)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def model_img_size(cfg: AlastConfig) -> int:
    return int(model_data_config(cfg.model.name, cfg.model.img_size)["input_size"][-1])


def training_device(cfg: AlastConfig) -> str:
    import torch

    if cfg.backend.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.backend.device


# (classes, training images) of the torchvision datasets the example configs use, so a plan needs
# neither the data nor a download.
KNOWN_DATASETS = {"CIFAR10": (10, 50000), "CIFAR100": (100, 50000), "Flowers102": (102, 1020),
                  "Food101": (101, 75750)}


def num_classes_for(cfg: AlastConfig) -> tuple[int | None, str]:
    """Classes of the config's data without loading it where that is cheap; (None, why) if unknown."""
    from alast.data import describe_spec

    kind, arg = describe_spec(cfg.data.spec)
    if kind == "torchvision" and arg in KNOWN_DATASETS and cfg.data.tune_fraction is None:
        return KNOWN_DATASETS[arg][0], arg
    if kind in ("digits", "random"):
        return 10, kind
    if kind == "shapes":
        from alast.data import synthetic

        return synthetic.num_classes("shapes"), kind
    if kind == "letters":
        from alast.data.letters import LETTERS

        return len(LETTERS), kind
    if kind == "imagefolder":
        if not Path(arg).expanduser().is_dir():  # as train refuses it: a plan for data that is not there
            from alast.data import DataError

            what = "is a file, not a folder" if Path(arg).expanduser().exists() else "not found"
            raise DataError(f"image folder {what}: {arg}; pass imagefolder:PATH to a directory of class folders")
        root = Path(arg) / "train" if (Path(arg) / "train").is_dir() else Path(arg)
        if root.is_dir():
            return sum(1 for p in root.iterdir() if p.is_dir()), "class folders"
    return None, f"unknown for {cfg.data.spec} without loading it; the profiled head is used"


def _for_device(cm: CostModel, device: str) -> CostModel:
    cuda = device.startswith("cuda")
    mem = dataclasses.replace(cm.memory, optimizer_temp="all_trained" if cuda else "largest_param",
                              input_bytes_per_sample=3 * cm.img_size * cm.img_size * 4 if cuda else 0)
    return dataclasses.replace(cm, memory=mem)


def load_cost_model_for(cfg: AlastConfig, path: Path) -> CostModel:
    """The cost model in ``path`` (from `alast profile`), refused unless it is of ``cfg``'s model at its
    image size; a warning where it was profiled with other libraries or an older cost-model version
    than these (the disk cache would measure afresh; a named file is taken as it is)."""
    from alast.planning.profile_cache import library_versions

    cm = load_cost_model(Path(path), model=cfg.model.name, img_size=model_img_size(cfg), lora=None)
    ours = {**library_versions(), "cost-model version": str(COST_MODEL_VERSION)}
    theirs = {**{k: str(v) for k, v in cm.provenance.items()}, "cost-model version": str(cm.version)}
    changed = [k for k in ours if k in theirs and theirs[k] != ours[k]]
    if changed:
        warn(f"cost model {path} was profiled with {', '.join(f'{k} {theirs[k]}' for k in changed)}, not "
             f"{', '.join(f'{k} {ours[k]}' for k in changed)} as here: its costs may be off; re-profile with "
             f"`alast profile {cm.model} --img-size {cm.img_size} --out {path} --force`")
    return cm


def cost_models(cfg: AlastConfig, cost_model_path: Path | None = None) -> tuple[CostModel, CostModel, str]:
    """(plain model's cost model, the policy's (LoRA variant if any), where they came from)."""
    img = model_img_size(cfg)
    classes, _ = num_classes_for(cfg)
    device = training_device(cfg)
    lora = cfg.policy.lora.model_dump() if cfg.policy.lora is not None else None
    if cost_model_path is not None:
        plain = load_cost_model_for(cfg, cost_model_path)
        source = f"file {cost_model_path}"
    else:
        plain, source = profile_with_source(cfg.model.name, img_size=img, num_classes=classes, device=device)
    if classes:
        plain = plain.with_num_classes(classes)
    plain = _for_device(plain, device)
    if lora is None:
        return plain, _policy_runtime(plain, cfg), source
    pcm, lora_source = profile_with_source(cfg.model.name, img_size=img, num_classes=plain.num_classes, lora=lora,
                                           device=device)
    return plain, _policy_runtime(_for_device(pcm, device), cfg), f"{source}; LoRA variant {lora_source}"


def _policy_runtime(cm: CostModel, cfg: AlastConfig) -> CostModel:
    """``cm`` as the configured policy and backend run it: the embeddings frozen where the policy
    freezes them, and every block run whole before it drops tokens with token fusion, and on the
    ``ort`` backend unless every block selects inside (its graph selects inside all blocks or none;
    the torch runtime selects inside each of timm's standard blocks, eager or compiled)."""
    cm = _policy_embeddings(cm, cfg)
    every_block_inside = all(b.drop is not None for b in cm.blocks)
    if cfg.policy.fuse_tokens or (cfg.backend.name == "ort" and not every_block_inside):
        cm = cm.selecting_after_blocks()
    return cm


def _deployed_inference(cfg: AlastConfig, plain: CostModel, pred: Prediction) -> None:
    """Set ``pred``'s inference FLOPs on its token schedule as the deployed model runs it, whatever
    the training backend: its blocks select inside, but with fused tokens (whole blocks, then the
    selection)."""
    if pred.eval_kept_tokens is None:
        return
    cm = plain.selecting_after_blocks() if cfg.policy.fuse_tokens else plain
    pred.inference_flops_ratio = inference_flops(cm, pred.eval_kept_tokens) / inference_flops(cm)


def _policy_embeddings(cm: CostModel, cfg: AlastConfig) -> CostModel:
    """``cm`` with the embeddings frozen when the policy freezes them (``policy.freeze_embeddings``):
    no gradient, no optimizer state, and no backward below the lowest trained block."""
    if not cfg.policy.embeddings_frozen or not cm.embed.trainable:
        return cm
    embed = dataclasses.replace(cm.embed, trainable=False, trainable_bytes=0, largest_trainable_bytes=0)
    return dataclasses.replace(cm, embed=embed)


def solve_target(cfg: AlastConfig, cost_model_path: Path | None = None, world_size: int = 1,
                 steps: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Planner options that put ``cfg``'s policy at ``policy.target_flops`` x full fine-tuning FLOPs, and
    the solution's description. The options include the cost model itself (``cost_model``): the alast
    planner projects every step's budgets onto the target with it. ``world_size``: the processes
    ``train.batch_size`` is split over (the early phase caps each device's peak). ``steps``: the
    run's (None: :func:`planned_steps`, which loads the data for ``train.epochs``)."""
    if cfg.policy.target_flops is None:
        raise ValueError("no FLOPs target: set --target-flops or policy.target_flops")
    check_target(cfg.policy.target_flops)
    plain, pcm, _ = cost_models(cfg, cost_model_path)
    steps = planned_steps(cfg) if steps is None else steps  # the phases' exact shares, as `alast plan` has them
    options = {**policy_options(cfg, pcm.head_reads_prefix, world_size), "steps": steps}
    sol = _solve(pcm, cfg.policy.planner, cfg.policy.target_flops, options, full_cm=plain, policy=cfg.policy.name)
    return {**sol.knobs, "cost_model": pcm}, sol.info()


def planned_steps(cfg: AlastConfig) -> int:
    """``train.steps``, or the steps of ``train.epochs`` over the training set (loaded unless its
    size is known), refused as the run would refuse it where the batch exceeds that set."""
    if cfg.train.epochs is None:
        return int(cfg.train.steps)
    from alast.data import check_batch_size
    from alast.training.schedule import total_steps

    n = train_images(cfg)
    check_batch_size(n, cfg.train.batch_size)
    return total_steps(cfg, n)


def train_images(cfg: AlastConfig) -> int:
    """The training split's size: known for the torchvision sets in :data:`KNOWN_DATASETS`, else
    the data is loaded."""
    kind, _, arg = cfg.data.spec.partition(":")
    if kind == "torchvision" and arg in KNOWN_DATASETS and cfg.data.tune_fraction is None:
        return KNOWN_DATASETS[arg][1]
    from alast.training.build import load_data

    return len(load_data(cfg)[0].train)


def check_backend(cfg: AlastConfig, calibrate: bool) -> None:
    """Refuse a plan of what the run's backend would refuse, and ``--calibrate`` for the ort backend
    (it times the torch runtime's steps, not ONNX Runtime's, which also builds training graphs)."""
    check_positions(cfg, model_position_kind(cfg.model.name))
    if cfg.backend.name != "ort":
        return
    from runtimes.ort_backend.runtime import check_config

    check_config(cfg)
    if calibrate:
        raise ValueError("--calibrate times the torch runtime's steps, not the ort backend's; plan it with "
                         "--throughput FLOP/s, or without a time")


def _time_models(cfg: AlastConfig, plain: CostModel, pcm: CostModel, calibrate: bool, throughput: float | None,
                 batch: int, budget: Any = None) -> tuple[CostModel, CostModel]:
    """Attach time models: a given throughput, or a calibration (timing ``budget``, the policy's
    own step, beside the standard shapes), or whatever a loaded cost model carries. A calibration
    times the plain model, so it is fitted on ``plain``'s features and applied to ``pcm``'s (the
    policy's frozen embeddings, its backend's selection)."""
    if throughput is not None:
        tm = TimeModel.from_throughput(throughput)
        return plain.with_time(tm), pcm.with_time(tm)
    if not calibrate:
        if plain.time is not None and (_time_model_differs(cfg, plain, batch) or _torch_timed_for_ort(cfg, plain)):
            return plain.with_time(None), pcm.with_time(None)
        return plain, pcm
    timed = {"batch_size": batch, "device": training_device(cfg), "count_flops": cfg.backend.count_flops,
             "precision": cfg.backend.precision}
    extra = {"policy": budget} if budget is not None else None
    with _torch_threads(cfg.backend.threads):
        if pcm.lora is None:
            tm = calibrate_time(plain, cfg.model.name, extra=extra, **timed)
            return plain.with_time(tm), pcm.with_time(tm)
        plain = plain.with_time(calibrate_time(plain, cfg.model.name, **timed))
        return plain, pcm.with_time(calibrate_time(pcm, cfg.model.name, lora=pcm.lora, extra=extra, **timed))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``backend.threads`` meanwhile (as the run sets them), if given."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_model_differs(cfg: AlastConfig, cm: CostModel, batch: int) -> bool:
    """Whether ``cm``'s calibrated time model (from a cost model file) was timed at another batch size,
    device, FLOP counting, precision or thread count than the planned run's; if so, warns that it is
    left out."""
    import torch

    tm = cm.time
    if tm is None or tm.method != "calibrated":
        return False
    device = training_device(cfg).split(":")[0]
    ours = {"batch": batch, "device": device, "FLOP counting": cfg.backend.count_flops,
            "precision": cfg.backend.precision,
            "threads": (cfg.backend.threads or torch.get_num_threads()) if device == "cpu" else None}
    theirs = {"batch": tm.batch_size, "device": tm.device.split(":")[0], "FLOP counting": tm.count_flops,
              "precision": tm.precision, "threads": tm.threads}
    changed = [k for k in ours if theirs[k] not in (None, "") and ours[k] is not None and theirs[k] != ours[k]]
    if not changed:
        return False
    why = "fixed per-step costs weigh more in small batches" if "batch" in changed else "it was timed on other steps"
    fix = "pass --calibrate"
    if "FLOP counting" not in changed:  # the rest are `alast profile --calibrate` options
        options = {"device": f" --device {device}", "precision": f" --precision {ours['precision']}",
                   "threads": f" --threads {ours['threads']}"}
        fix += (f", or re-profile with `alast profile {cm.model} --img-size {cm.img_size} --calibrate --batch-size "
                f"{batch}" + "".join(options[k] for k in changed if k in options) + " --out FILE`")
    calibrated, planned = (", ".join(f"{k} {d[k]}" for k in changed) for d in (theirs, ours))
    warn(f"no time predicted: the cost model's time model was calibrated at {calibrated}, this run has {planned}, "
         f"and step time does not carry over ({why}); {fix}")
    return True


def _torch_timed_for_ort(cfg: AlastConfig, cm: CostModel) -> bool:
    """Whether ``cm``'s calibrated time model (the torch runtime's steps) would be applied to an ort
    run; if so, warns that it is left out."""
    if cfg.backend.name != "ort" or cm.time is None or cm.time.method != "calibrated":
        return False
    warn("no time predicted: the cost model's time model timed the torch runtime's steps, not the ort backend's; "
         "pass --throughput FLOP/s for a time")
    return True


def first_budget(cm: CostModel, planner: str, options: dict[str, Any]) -> Any:
    """The policy's step-0 budget (a representative step shape); a ``target_flops`` option without
    a ``cost_model`` projects on ``cm``, as :func:`planners.simulate.planner_shapes` does."""
    from planners import create_planner

    if options.get("target_flops") is not None and options.get("cost_model") is None:
        options = {**options, "cost_model": cm}
    return create_planner(planner, cm.num_blocks, **options).plan(0, 0.0)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _entry(pred: Prediction, full: Prediction, eval_tokens: str) -> dict[str, Any]:
    d = pred.to_dict()
    if eval_tokens == "all":  # the run evaluates and exports on every token
        d["eval_kept_tokens"] = d["inference_flops_ratio"] = None
    d["ratio_to_full"] = {"train_flops": _ratio(pred.train_flops, full.train_flops),
                          "peak_memory_bytes": _ratio(pred.peak_memory_bytes, full.peak_memory_bytes),
                          "time_s": _ratio(pred.time_s, full.time_s)}
    return d


def _result(cfg: AlastConfig, plain: CostModel, source: str, preds: dict[str, Prediction], steps: int,
            target: dict[str, Any] | None) -> dict[str, Any]:
    full = preds["full"]
    tm = next((p.time_method for p in preds.values()), "")
    return {
        "model": cfg.model.name, "img_size": plain.img_size, "num_classes": plain.num_classes, "steps": steps,
        "batch_size": cfg.train.batch_size, "micro_batch_size": cfg.train.micro_batch_size,
        "device": training_device(cfg), "flops_convention": FLOPS_CONVENTION,
        "cost_model": {"source": source, "version": plain.version, "fit_max_rel_error": plain.fit_max_rel_error},
        "time_method": tm, "target": target, "eval_tokens": cfg.policy.eval_tokens,
        "dense_final": _dense_final(cfg, plain.num_blocks),
        "early_phase": _early_phase(cfg, plain.num_blocks, target),
        "policies": {name: _entry(p, full, cfg.policy.eval_tokens) for name, p in preds.items()},
    }


def _dense_final(cfg: AlastConfig, num_blocks: int) -> dict[str, Any] | None:
    """ALaST's dense final phase, or None: its share of the steps and the top blocks it trains (None:
    the blocks drawn as in the other steps, with the embeddings)."""
    from planners.rules import dense_final_top

    p = cfg.policy
    if p.planner != "alast" or not p.dense_final_frac:
        return None
    return {"policy": p.name, "frac": p.dense_final_frac,
            "top_blocks": dense_final_top(num_blocks, p.dense_final_blocks), "num_blocks": num_blocks,
            "interleave": p.dense_final_interleave}


def _early_phase(cfg: AlastConfig, num_blocks: int, target: dict[str, Any] | None) -> dict[str, Any] | None:
    """ALaST's early phase (``policy.early_frac``), or None: its share of the steps and the blocks it trains."""
    from planners.rules import default_k_trained

    p = cfg.policy
    if p.planner != "alast" or not p.early_phase:
        return None
    k = (target or {}).get("knobs", {}).get("k_trained") or p.k_trained or default_k_trained(num_blocks, p.freeze_mode)
    if k >= num_blocks:
        return None  # every block trains in every step: the phase has no block to add
    return {"policy": p.name, "frac": p.early_phase, "trained": k + 1, "num_blocks": num_blocks}


def _note_precision(cfg: AlastConfig) -> None:
    """Warn where the run's activations are not the cost model's fp32 ones (bf16 or fp16 autocast)."""
    if cfg.backend.precision != "fp32":
        warn("peak memory is priced for fp32 activations, as the cost model measured them on the CPU; under "
             f"{cfg.backend.precision} autocast most saved activations take half the bytes, so the run peaks "
             "lower (not modelled)")


def _note_passes(cfg: AlastConfig, timed: bool) -> None:
    """Warn where a step runs in passes (``train.micro_batch_size``) and the plan times it: the time
    model prices one pass of the whole batch."""
    micro, batch = cfg.train.micro_batch_size, cfg.train.batch_size
    if timed and micro is not None and micro < batch:
        warn(f"step time is priced as one pass of the batch of {batch}; passes of {micro} add each pass's fixed "
             "costs (kernel launches, the host's work), which the time model does not price")


def plan(cfg: AlastConfig, *, cost_model_path: Path | None = None, calibrate: bool = False,
         throughput: float | None = None) -> dict[str, Any]:
    """Predict ``cfg``'s policy and full fine-tuning over the same steps; see the CLI contract."""
    check_backend(cfg, calibrate)
    steps, batch = planned_steps(cfg), cfg.train.batch_size
    plain, pcm, source = cost_models(cfg, cost_model_path)
    _note_precision(cfg)
    options, target = policy_options(cfg, pcm.head_reads_prefix), None
    if cfg.policy.target_flops is not None:
        check_target(cfg.policy.target_flops)
        sol = _solve(pcm, cfg.policy.planner, cfg.policy.target_flops, {**options, "steps": steps}, full_cm=plain,
                     policy=cfg.policy.name)
        options, target = {**options, **sol.knobs}, sol.info()
    budget = first_budget(pcm, cfg.policy.planner, options) if calibrate else None
    plain, pcm = _time_models(cfg, plain, pcm, calibrate, throughput, batch, budget)
    _note_passes(cfg, pcm.time is not None)
    micro = cfg.train.micro_batch_size
    cached, on_gpu = _planned_cache(cfg, pcm, options, steps), training_device(cfg).startswith("cuda")
    preds = {cfg.policy.name: simulate(pcm, cfg.policy.planner, options, steps, batch, policy=cfg.policy.name,
                                       micro_batch=micro, cached=cached and cached[:2])}
    if cached is not None and on_gpu:
        _resident(preds[cfg.policy.name], cached[2])
    preds[cfg.policy.name].knobs = {k: v for k, v in options.items() if k not in ("seed",)}
    _deployed_inference(cfg, plain, preds[cfg.policy.name])
    if cfg.policy.name != "full":
        preds["full"] = simulate(plain, "full", {}, steps, batch, micro_batch=micro)
    out = _result(cfg, plain, source, preds, steps, target)
    left_off = cached is None and cfg.backend.frozen_cache == "auto" and on_gpu
    shown = _gpu_cache_offer(cfg, pcm, options, steps) if left_off else cached
    if shown is not None:
        out["frozen_cache"] = {"policy": cfg.policy.name, "blocks": shown[1], "bytes": shown[2],
                               "device": "cuda" if on_gpu else "cpu",
                               "planned_share": sum(shown[0]) / len(shown[0]) if shown[0] else 0.0,
                               **({"left_off": True} if left_off else {})}
    return out


def _gpu_cache_offer(cfg: AlastConfig, cm: CostModel, options: dict[str, Any], steps: int
                     ) -> tuple[list[float], int, int] | None:
    """What ``backend.frozen_cache=on`` would cache in a run on a GPU, where ``auto`` leaves it off (the
    plan above is the run's, without it); None where it would not apply either."""
    on = cfg.model_copy(update={"backend": cfg.backend.model_copy(update={"frozen_cache": "on"})})
    try:
        return _planned_cache(on, cm, options, steps)
    except ValueError:
        return None


def _resident(pred: Prediction, nbytes: float) -> None:
    """Add memory held all run long on the device (the frozen blocks' cache on a GPU) to ``pred``'s peaks."""
    pred.peak_memory_bytes += nbytes
    if pred.peak_memory_sampled_bytes is not None:
        pred.peak_memory_sampled_bytes += nbytes
    if pred.peak_memory_range is not None:
        pred.peak_memory_range = tuple(b + nbytes for b in pred.peak_memory_range)


def _planned_cache(cfg: AlastConfig, cm: CostModel, options: dict[str, Any], steps: int
                   ) -> tuple[list[float], int, int] | None:
    """The shares of each step's images the run's cache of its frozen blocks will read, the blocks, and
    its bytes (:func:`alast.training.frozen.planned_cache`); None where the run will not cache them."""
    from alast.training.frozen import planned_cache
    from planners import create_planner

    opts = {**options, "cost_model": cm} if options.get("target_flops") is not None else options
    planner = create_planner(cfg.policy.planner, cm.num_blocks, **opts)
    return planned_cache(cfg, planner, lambda: train_images(cfg), steps, cm.num_prefix_tokens + cm.num_patches,
                         cm.embed_dim, model_position_kind(cfg.model.name), training_device(cfg))


def replay_run(run_dir: Path, *, cost_model_path: Path | None = None, calibrate: bool = False,
               throughput: float | None = None) -> dict[str, Any]:
    """Predict what a logged run cost from its ``metrics.jsonl`` and compare with what it counted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraceError(f"trace run dir {'is a file' if run_dir.exists() else 'not found'}: {run_dir}; pass the "
                         "folder of a run `alast train` wrote")
    if not (run_dir / METRICS).is_file():
        raise TraceError(f"{run_dir} has no {METRICS}; --trace needs a run directory written by `alast train`")
    records = sorted(read_metrics(run_dir / METRICS), key=lambda r: r["step"])
    if not records:
        raise TraceError(f"{run_dir / METRICS} has no steps to replay")
    if not (run_dir / "config.yaml").is_file():
        raise TraceError(f"{run_dir} has no config.yaml; --trace needs a run directory written by `alast train`")
    cfg = load_run_config(run_dir / "config.yaml")
    check_backend(cfg, calibrate)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    world = int(summary.get("world_size", 1) or 1)
    batch = int(records[0].get("batch_size", cfg.train.batch_size))
    plain, pcm, source = cost_models(cfg, cost_model_path)
    _note_precision(cfg)
    budget = _logged_budget(records[len(records) // 2], pcm, cfg) if calibrate else None
    plain, pcm = _time_models(cfg, plain, pcm, calibrate, throughput, batch // world, budget)
    sampled = cpu_memory_sampled if str(summary.get("device", "cpu")).startswith("cpu") else None
    trim = policy_options(cfg, pcm.head_reads_prefix).get("trim_last", False)
    depth = int((summary.get("frozen_cache") or {}).get("blocks", 0))
    preds = {cfg.policy.name: replay(pcm, records, policy=cfg.policy.name, world_size=world, memory_sampled=sampled,
                                     trim_last=trim, micro_batch=cfg.train.micro_batch_size, cached_depth=depth)}
    if (summary.get("frozen_cache") or {}).get("device") == "cuda":
        _resident(preds[cfg.policy.name], summary["frozen_cache"]["bytes"])
    _deployed_inference(cfg, plain, preds[cfg.policy.name])
    if cfg.policy.name != "full":
        preds["full"] = simulate(plain, "full", {}, len(records), batch, micro_batch=cfg.train.micro_batch_size)
    cfg.train.batch_size = batch
    out = _result(cfg, plain, source, preds, len(records), None)
    out["early_phase"] = _early_phase(cfg, plain.num_blocks, _run_plan(cfg, summary, records))
    pred = preds[cfg.policy.name]
    counted = [r.get("train_flops") for r in records]
    counted_total = sum(counted) if all(c is not None for c in counted) else None
    out["trace"] = {
        "run_dir": str(run_dir), "steps": len(records),
        "predicted_train_flops": pred.train_flops, "counted_train_flops": counted_total,
        "train_flops_rel_error": _ratio(pred.train_flops, counted_total) - 1 if counted_total else None,
        "predicted_peak_memory_bytes": pred.peak_memory_bytes,
        "predicted_peak_memory_sampled_steps_bytes": pred.peak_memory_sampled_bytes,
        "measured_peak_memory_bytes": summary.get("peak_memory_bytes"),
        "memory_note": ("the runtime measures CPU memory on sampled steps (1, 2, every 50th, and any heavier "
                        "than those measured; metrics.jsonl marks them); the sampled prediction covers the same "
                        "steps") if sampled else "measured over all steps",
        "predicted_step_time_s": pred.step_time_s, "measured_median_step_time_s": summary.get("median_step_time_s"),
        "counted_full_ft_train_flops": summary.get("full_ft_train_flops"),
        "predicted_inference_flops_ratio": out["policies"][cfg.policy.name]["inference_flops_ratio"],
        "counted_inference_flops_ratio": summary.get("inference_flops_ratio"),
        # what the finished run deployed (None: every token; absent: the run has not finished)
        **({"deployed_kept_tokens": summary.get("eval_kept_tokens")} if "val_accuracy" in summary else {}),
    }
    return out


def _run_plan(cfg: AlastConfig, summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a run's FLOPs target chose (summary.json's ``plan``), whose ``k_trained`` sets the early
    phase, not the default; for a targeted run without a summary yet, ``k_trained`` read from its
    first logged step, an early step, which trains one block more (or every block)."""
    if summary.get("plan") or cfg.policy.target_flops is None:
        return summary.get("plan")
    return {"knobs": {"k_trained": len(records[0]["trained_blocks"]) - 1}}


def _logged_budget(rec: dict[str, Any], cm: CostModel, cfg: AlastConfig) -> Any:
    """The budget a logged step ran with (to time that shape when calibrating)."""
    from planners import Budget

    trained = set(int(i) for i in rec["trained_blocks"])
    ratios = tuple(float(r) for r in rec.get("keep_ratios") or [1.0] * cm.num_blocks)
    return Budget(ratios, tuple(i in trained for i in range(cm.num_blocks)), cfg.policy.min_tokens)


def plot_file(path: Path) -> Path:
    """The file :func:`plot_plan` writes for ``path``: matplotlib adds ``.png`` to a name without a
    suffix."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name.rstrip(".") + ".png")


def plot_plan(result: dict[str, Any], path: Path) -> Path:
    """Per-block cost split (policy vs full) and the predicted tokens / trained share per block, in
    :func:`plot_file` of ``path``; returns that file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pols = result["policies"]
    name = next((k for k in pols if k != "full"), "full")
    pb, full = pols[name]["per_block"], pols["full"]["per_block"]
    x = np.arange(len(pb["fwd_flops"]))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    a1.bar(x - 0.2, full["fwd_flops"], 0.4, label="full: forward", color="#9ab")
    a1.bar(x - 0.2, full["bwd_flops"], 0.4, bottom=full["fwd_flops"], label="full: backward", color="#567")
    a1.bar(x + 0.2, pb["fwd_flops"], 0.4, label=f"{name}: forward", color="#fb6")
    bottom = np.add(pb["fwd_flops"], pb["select_flops"])
    a1.bar(x + 0.2, pb["select_flops"], 0.4, bottom=pb["fwd_flops"], label=f"{name}: token scores", color="#d33")
    a1.bar(x + 0.2, pb["bwd_flops"], 0.4, bottom=bottom, label=f"{name}: backward", color="#c70")
    a1.set_ylabel("FLOPs per step")
    a1.set_title(f"{result['model']}: predicted cost per block ({result['steps']} steps, batch {result['batch_size']})")
    a1.legend(fontsize=8)
    a2.plot(x, full["tokens_in"], "o-", label="full: patch tokens in")
    a2.plot(x, pb["tokens_in"], "o-", label=f"{name}: patch tokens in (mean)")
    a2.set_ylabel("patch tokens")
    a2.set_xlabel("block")
    t = a2.twinx()
    t.bar(x, pb["trained"], 0.3, alpha=0.3, color="g", label="share of steps trained")
    t.set_ylim(0, 1.05)
    t.set_ylabel("share of steps trained")
    a2.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = plot_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
