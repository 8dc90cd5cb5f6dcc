"""The planner's host time per training step under a FLOPs target: ``plan`` and ``observe``.

    python benchmarks/planner_time.py --models deit_small_patch16_224,alast_vit12 --targets 0.5,0.4

Where a GPU step is bound by the host launching kernels (small batches: [the H200 grid in
docs/benchmarks.md](../docs/benchmarks.md#gpu-speed-grid-one-h200-bf16)), every millisecond the
host spends between two launches is a millisecond of the step, and the planner runs there: each
step it projects the budgets onto the target, pricing a few dozen candidate shifts on the cost
model. This times it alone, as ``alast train --target-flops T`` builds it (today's defaults, the
knobs the target solver gives, the real model's cost model), over ``--steps`` steps of deltas that
drift as a run's do (a random walk in log space under batch noise), so the budgets move and the
projection meets new token counts. No model runs. Prints one row per model and target, writes JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alast.config import load_config  # noqa: E402
from alast.planning.plan import solve_target  # noqa: E402
from alast.training.build import build_planner  # noqa: E402
from planners import Observation  # noqa: E402


def drifting_deltas(steps: int, num_blocks: int, seed: int) -> list[list[float]]:
    """Per-block levels on a random walk in log space, under lognormal batch noise."""
    rng = random.Random(seed)
    logs = [rng.gauss(0.0, 1.0) for _ in range(num_blocks)]
    out = []
    for _ in range(steps):
        logs = [x + rng.gauss(0.0, 0.05) for x in logs]
        out.append([math.exp(x + rng.gauss(0.0, 0.3)) for x in logs])
    return out


def measure(model: str, target: float, steps: int, batch: int, rounds: int) -> dict[str, Any]:
    cfg = load_config(None, [f"model.name={model}", "model.pretrained=false", "data.spec=random:10",
                             f"train.steps={steps}", f"train.batch_size={batch}", "policy.name=alast",
                             f"policy.target_flops={target}"])
    knobs, _ = solve_target(cfg)
    num_blocks = knobs["cost_model"].num_blocks
    deltas = drifting_deltas(steps, num_blocks, seed=0)
    per_step, digest = [], None
    for _ in range(rounds):
        planner = build_planner(cfg, num_blocks, knobs, head_reads_prefix=knobs["cost_model"].head_reads_prefix)
        h = hashlib.sha256()
        t0 = time.perf_counter()
        for step in range(steps):
            budget = planner.plan(step, step / steps)
            planner.observe(Observation(step, step / steps, deltas[step]))
            h.update(repr((budget.keep_ratios, budget.trained)).encode())
        per_step.append((time.perf_counter() - t0) / steps)
        digest = h.hexdigest()[:16]
    return {"model": model, "target": target, "steps": steps, "batch_size": batch, "rounds": rounds,
            "ms_per_step": [round(t * 1e3, 4) for t in per_step],
            "median_ms_per_step": round(statistics.median(per_step) * 1e3, 4),
            "plans_sha256_16": digest}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="deit_small_patch16_224,alast_vit12")
    ap.add_argument("--targets", default="0.5,0.4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("planner_time.json"))
    args = ap.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            row = measure(model, target, args.steps, args.batch_size, args.rounds)
            rows.append(row)
            print(f"{model} at {target:g}x: {row['median_ms_per_step']:.3f} ms per step (plan + observe; "
                  f"rounds {', '.join(f'{t:.3f}' for t in row['ms_per_step'])}), plans {row['plans_sha256_16']}",
                  flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
