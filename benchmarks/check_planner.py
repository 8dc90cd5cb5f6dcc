"""Planner vs reality: predicted and measured training FLOPs, peak memory and step time.

For each policy it runs a real short training run (``alast.training.loop.train``, the same code path as
``alast train``) and compares:
  * FLOPs: the a-priori plan (exact for deterministic policies, expected for alast) and the replay
    of the run's trace, against the FLOPs the runtime counted with torch.utils.flop_counter;
  * peak memory: predicted over the steps the runtime samples (CPU MemTracker: steps 1, 2, every
    50th; CUDA: all steps) against what it measured;
  * step time: the calibrated time model (real timed steps of this machine, taken before the runs)
    against the run's median step time over steps the runtime did not memory-probe (probing slows
    a step down several times);
  * the run's time in training steps (``train_time_s``): the plan's ``time_s``, which adds what the
    steps do beside training (the first step, FLOP-counted and memory-measured steps), a priori
    and replayed from the run's trace.

  OMP_NUM_THREADS=1 python benchmarks/check_planner.py --steps 20 --batch-size 32 --out planner.json
  OMP_NUM_THREADS=1 python benchmarks/check_planner.py --model vit_base_patch16_224 --batch-size 4 \
      --steps 4 --policies full,tokens,alast --data random:16 --calibrate-reps 1
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alast.config import load_config  # noqa: E402
from alast.planning.calibrate import calibrate_time  # noqa: E402
from alast.planning.plan import cost_models, cpu_memory_sampled, first_budget, solve_target, training_device  # noqa: E402
from alast.training.build import policy_options  # noqa: E402
from alast.training.loop import train  # noqa: E402
from alast.training.report import read_metrics  # noqa: E402
from planners.simulate import replay, simulate  # noqa: E402

POLICIES = "full,freeze,tokens,random,alast,alast+lora,alast@0.5"


def _config(args, policy: str):
    name, _, target = policy.partition("@")
    sets = [f"model.name={args.model}", f"data.spec={args.data}", f"policy.name={name}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "output.force=true"]
    if target:
        sets.append(f"policy.target_flops={target}")
    if name == "tokens":
        sets.append("policy.keep_ratio=0.7")
    if name == "freeze":
        sets.append("policy.k_trained=2")
    return load_config(None, sets)


def _unprobed_median(records, device: str) -> float | None:
    times = [r["step_time_s"] for r in records if r["step"] > 0 and not (device == "cpu" and cpu_memory_sampled(r["step"]))]
    return statistics.median(times) if times else None


def _peak_before_reference_step() -> dict:
    """On CUDA the loop reads ``max_memory_allocated`` after its full fine-tuning reference step
    (``full_ft_step_flops``), which then sets every policy's peak; record the peak just before it."""
    from runtimes.torch_backend.runtime import TorchRuntime

    seen: dict = {}
    original = TorchRuntime.full_ft_step_flops

    def wrapped(self, batch_size):
        seen["peak"] = self.peak_memory_bytes()
        return original(self, batch_size)

    TorchRuntime.full_ft_step_flops = wrapped
    return seen


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rel(pred, meas):
    return pred / meas - 1 if pred is not None and meas else None


def check(args) -> dict:
    out: dict = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "policies": {}}
    time_models = {}
    root = Path(tempfile.mkdtemp(prefix="check_planner-"))
    peak_seen = _peak_before_reference_step()
    for policy in args.policies.split(","):
        _release()
        cfg = _config(args, policy)
        device = training_device(cfg)
        plain, pcm, _ = cost_models(cfg)
        overrides, info = solve_target(cfg) if cfg.policy.target_flops else (None, None)
        options = {**policy_options(cfg, pcm.head_reads_prefix), **(overrides or {})}
        # calibrate as `alast plan --calibrate` does: standard shapes plus the policy's first step
        t0 = time.perf_counter()
        time_models[policy] = calibrate_time(pcm, cfg.model.name, batch_size=args.batch_size, device=device,
                                             count_flops=cfg.backend.count_flops, lora=pcm.lora,
                                             reps=args.calibrate_reps,
                                             extra={"policy": first_budget(pcm, cfg.policy.planner, options)})
        calib_s = time.perf_counter() - t0
        pcm = pcm.with_time(time_models[policy])
        planned = simulate(pcm, cfg.policy.planner, options, args.steps, args.batch_size, policy=policy)
        run_dir = root / policy.replace("+", "-").replace("@", "-at-")
        summary = train(cfg, run_dir, planner_overrides=overrides, plan_info=info)
        records = read_metrics(run_dir / "metrics.jsonl")
        sampled = cpu_memory_sampled if device == "cpu" else None
        traced = replay(pcm, records, policy=policy, memory_sampled=sampled, trim_last=options.get("trim_last", False))
        mem_pred = traced.peak_memory_sampled_bytes if sampled else traced.peak_memory_bytes
        mem_meas = summary["peak_memory_bytes"] if sampled else peak_seen.get("peak", summary["peak_memory_bytes"])
        measured_time = _unprobed_median(records, device)
        out["policies"][policy] = {
            "counted_train_flops": summary["train_flops"],
            "counted_ratio_vs_full": summary["flops_ratio_vs_full"],
            "planned_train_flops": planned.train_flops, "planned_rel_error": _rel(planned.train_flops, summary["train_flops"]),
            "planned_range": planned.train_flops_range,
            "replayed_train_flops": traced.train_flops, "replayed_rel_error": _rel(traced.train_flops, summary["train_flops"]),
            "target": cfg.policy.target_flops, "knobs": info["knobs"] if info else None,
            "measured_peak_memory_bytes": mem_meas, "predicted_peak_memory_bytes": mem_pred,
            "memory_rel_error": _rel(mem_pred, mem_meas),
            "measured_step_time_s": measured_time, "predicted_step_time_s": traced.step_time_s,
            "time_rel_error": _rel(traced.step_time_s, measured_time),
            "measured_median_step_time_all_steps_s": summary["median_step_time_s"], "calibration_s": calib_s,
            # the run's time in training steps (what `alast plan` predicts as time_s): a priori and replayed
            "measured_train_time_s": summary["train_time_s"], "planned_time_s": planned.time_s,
            "planned_time_rel_error": _rel(planned.time_s, summary["train_time_s"]),
            "replayed_time_s": traced.time_s, "replayed_time_rel_error": _rel(traced.time_s, summary["train_time_s"]),
        }
        print(_line(policy, out["policies"][policy]), flush=True)
    out["time_models"] = {k: v.coefficients for k, v in time_models.items()}
    out["device"] = device
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)  # checkpoints of large models take gigabytes
    else:
        out["runs_dir"] = str(root)
    return out


def _line(policy: str, r: dict) -> str:
    pct = lambda x: f"{x:+.2%}" if x is not None else "n/a"  # noqa: E731
    return (f"{policy:12s} FLOPs counted {r['counted_train_flops']:.4g} ({r['counted_ratio_vs_full']:.3f}x full) "
            f"plan {pct(r['planned_rel_error'])} replay {pct(r['replayed_rel_error'])} | memory "
            f"{r['measured_peak_memory_bytes'] / 2**20:.1f} MiB pred {pct(r['memory_rel_error'])} | step "
            f"{(r['measured_step_time_s'] or 0) * 1e3:.0f} ms pred {pct(r['time_rel_error'])} | run "
            f"{r['measured_train_time_s']:.2f} s plan {pct(r['planned_time_rel_error'])} "
            f"replay {pct(r['replayed_time_rel_error'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="alast_demo_vit")
    ap.add_argument("--data", default="random:256", help="data spec (random:N is fastest)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--policies", default=POLICIES, help="comma list; policy@R runs with --target-flops R")
    ap.add_argument("--calibrate-reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep-runs", action="store_true", help="keep the run directories (default: deleted)")
    args = ap.parse_args()
    result = check(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
