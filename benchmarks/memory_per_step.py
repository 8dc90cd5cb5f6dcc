"""Peak memory of every step, measured and predicted by the cost model.

Builds the run `alast train` would build from the same options (model, runtime, planner; under
``--target-flops`` the solved knobs), trains on random images (memory depends on the step's shape,
not on the pixels), measures each step's peak and sets it beside the plan's prediction for the
shape the step ran (``planners.simulate``: the replay `alast plan --trace` does). On the CPU the
peak is torch's MemTracker's (the runtime's own probe, on every step instead of the sampled ones);
with ``--device cuda``, ``torch.cuda.max_memory_allocated`` with the peak reset before each step
(``--precision bf16``: autocast, which the plan does not model). Step 0 is skipped, as the runtime
skips it: AdamW creates its state after that step's peak.

  OMP_NUM_THREADS=1 python benchmarks/memory_per_step.py --data letters --steps 40 --target-flops 0.5 \\
      --out memory_per_step.json
  OMP_NUM_THREADS=1 python benchmarks/memory_per_step.py --model alast_vit12 --data shapes --steps 40 \\
      --target-flops 0.5
  python benchmarks/memory_per_step.py --device cuda --model deit_small_patch16_224 --data random:512 \\
      --steps 8 --target-flops 0.5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alast.config import load_config
from alast.planning.plan import cost_models, solve_target
from alast.training.build import build_model, build_planner, create_runtime
from planners import Observation
from planners.simulate import RunAccumulator, StepShape, step_cost
from runtimes.token_schedule import head_reads_prefix

MIB = 2**20


def run(args) -> dict:
    sets = [f"model.name={args.model}", f"data.spec={args.data}", f"train.steps={args.steps}",
            f"train.batch_size={args.batch_size}", f"policy.name={args.policy}", "backend.threads=1",
            f"backend.device={args.device}", f"backend.precision={args.precision}"]
    if args.target_flops is not None:
        sets.append(f"policy.target_flops={args.target_flops}")
    cfg = load_config(None, sets + list(args.set))
    overrides = solve_target(cfg)[0] if cfg.policy.target_flops is not None else None
    _, pcm, _ = cost_models(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, pcm.num_classes)
    runtime = create_runtime(cfg, model)
    runtime._probes.probe = lambda step: step > 0  # measure every step but the first
    cuda = args.device.startswith("cuda")
    planner = build_planner(cfg, runtime.num_blocks, overrides, head_reads_prefix(model))
    acc = RunAccumulator(pcm, args.batch_size)
    size = pcm.img_size
    rows = []
    for step in range(args.steps):
        progress = step / args.steps
        budget = planner.plan(step, progress)
        x = torch.randn(args.batch_size, 3, size, size)
        y = torch.randint(0, pcm.num_classes, (args.batch_size,))
        runtime._peak_bytes = None  # this step's peak alone
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = runtime.train_step(x, y, budget, cfg.train.lr, step)
        if cuda:
            torch.cuda.synchronize()
        planner.observe(Observation(step, progress, result.deltas, result.loss))
        shape = StepShape(tuple(result.tokens_in), tuple(result.kept_tokens),
                          tuple(i in set(result.trained_blocks) for i in range(pcm.num_blocks)),
                          bool(result.embeddings_trained))
        acc.add(shape, step_cost(pcm, shape, args.batch_size))
        measured = runtime.peak_memory_bytes()
        if measured is not None and step > 0:  # step 0: AdamW creates its state after the peak
            rows.append({"step": step, "tokens_in": list(result.tokens_in), "kept_tokens": list(result.kept_tokens),
                         "trained_blocks": list(result.trained_blocks), "measured_mib": measured / MIB,
                         "predicted_mib": acc.step_peaks[-1] / MIB})
    errors = [r["predicted_mib"] - r["measured_mib"] for r in rows]
    return {"model": args.model, "data": args.data, "policy": args.policy, "target_flops": args.target_flops,
            "device": args.device, "precision": args.precision,
            "measured_by": "torch.cuda.max_memory_allocated" if cuda else "torch's MemTracker",
            "steps": args.steps, "batch_size": args.batch_size, "sets": list(args.set),
            "max_abs_error_mib": max(map(abs, errors)), "peak_measured_mib": max(r["measured_mib"] for r in rows),
            "peak_predicted_mib": max(r["predicted_mib"] for r in rows), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="alast_demo_vit")
    ap.add_argument("--data", default="letters")
    ap.add_argument("--policy", default="alast")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--target-flops", type=float, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as in alast train")
    ap.add_argument("--device", default="cpu", help="cpu (torch's MemTracker) or cuda (max_memory_allocated per step)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="bf16, fp16: CUDA autocast")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2: step 0 is not measured")
    out = run(args)
    for r in out["rows"]:
        print(f"step {r['step']:4d}  trained {r['trained_blocks']}  kept {r['kept_tokens']}  "
              f"measured {r['measured_mib']:8.1f} MiB  predicted {r['predicted_mib']:8.1f} MiB")
    print(f"peak: measured {out['peak_measured_mib']:.1f} MiB, predicted {out['peak_predicted_mib']:.1f} MiB; "
          f"largest per-step error {out['max_abs_error_mib']:.2f} MiB")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
