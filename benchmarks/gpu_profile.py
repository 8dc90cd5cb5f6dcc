"""Where one training step's time goes on a GPU: full fine-tuning against ALaST at a FLOPs target.

    python benchmarks/gpu_profile.py --model deit_small_patch16_224 --batch 64 --target 0.5
    python benchmarks/gpu_profile.py --device cpu --model alast_demo_vit --batch 8 --steps 3 --precision fp32

Per policy it builds the same runtime and planner as ``benchmarks/gpu_speed.py`` (random data, the
sync-free step), warms up, then over ``--steps`` steps records the host's time to launch each step
(``launch_step`` returns once the step is queued), the device's time per step (CUDA events), and a
``torch.profiler`` table of the ops with the most self time on the device and on the host. A step
whose launch takes longer than its device time is launch-bound: the GPU waits for the host.
Rows go to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_speed import build, policy_config, require_device, run_steps, write_rows

TOP = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--target", type=float, default=0.5, help="ALaST's FLOPs target (fraction of full fine-tuning)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--token-select", default=None, help="override policy.token_select (top, sample, random)")
    ap.add_argument("--out", type=Path, default=Path("gpu_profile.json"))
    args = ap.parse_args(argv)
    args.compile, args.token_multiple = "off", 1  # what gpu_speed.policy_config reads
    return args


def _ops(prof, key: str) -> list[dict[str, Any]]:
    """The ``TOP`` ops by ``key`` ('self_device_time_total' or 'self_cpu_time_total'), microseconds."""
    rows = [{"op": e.key, "calls": e.count, "self_device_us": getattr(e, "self_device_time_total", 0.0),
             "self_cpu_us": e.self_cpu_time_total} for e in prof.key_averages()]
    field = "self_device_us" if key == "self_device_time_total" else "self_cpu_us"
    return sorted(rows, key=lambda r: -r[field])[:TOP]


def measure(policy: str, target: float | None, args: argparse.Namespace) -> dict[str, Any]:
    cfg = policy_config(args.model, args.batch, policy, target, args)
    if args.token_select:
        cfg.policy.token_select = args.token_select
    rt, planner, x, y = build(cfg, policy, False, args, {})
    total = args.warmup + 2 * args.steps
    run_steps(rt, planner, x, y, 0, args.warmup, total)
    launch_s, results = [], []
    for step in range(args.warmup, args.warmup + args.steps):
        budget = planner.plan(step, step / total)
        t0 = time.perf_counter()
        pending = rt.launch_step(x, y, budget, 1e-4, step)
        launch_s.append(time.perf_counter() - t0)
        results.append(pending.resolve())  # waits: the next launch starts on an idle device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_steps(rt, planner, x, y, args.warmup + args.steps, args.steps, total)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
    row = {"model": args.model, "batch": args.batch, "precision": args.precision, "policy": policy, "target": target,
           "token_select": cfg.policy.token_select, "steps": args.steps,
           "host_launch_ms": 1000 * statistics.median(launch_s),
           "device_step_ms": 1000 * statistics.median(r.step_time_s for r in results),
           "kept_tokens": list(results[-1].kept_tokens),
           "top_device_ops": _ops(prof, "self_device_time_total"), "top_host_ops": _ops(prof, "self_cpu_time_total")}
    print(f"{policy:<10} launch {row['host_launch_ms']:.1f} ms (host)  step {row['device_step_ms']:.1f} ms (device)")
    for title, ops, field in (("device", row["top_device_ops"], "self_device_us"), ("host", row["top_host_ops"], "self_cpu_us")):
        print(f"  top {title} self time over {args.steps} steps:")
        for op in ops[:10]:
            print(f"    {op[field] / 1000:9.2f} ms  {op['calls']:6d}x  {op['op'][:70]}")
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    require_device(args.device, "use --device cpu for a smoke run")
    rows = [measure("full", None, args), measure(f"alast@{args.target:g}", args.target, args)]
    write_rows(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
