"""Gradient bytes all-reduced per step with 2 data-parallel ranks: alast vs full fine-tuning.

Runs ``alast train --nproc 2`` (torchrun, gloo on CPU) once per policy and reads the per-step
``grad_allreduce_bytes`` that rank 0 logs in metrics.jsonl. Only the parameters trained in a step
are reduced, so alast (K of L blocks trained) sends less than full fine-tuning; stock DDP would
send the full-fine-tuning volume every step whatever the policy (it reduces every bucket).

    OMP_NUM_THREADS=1 python benchmarks/ddp_bytes.py [--model alast_demo_vit] [--steps 6] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_policy(policy: str, args: argparse.Namespace, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "alast_cli", "train", "--nproc", str(args.nproc), "--policy", policy,
           "--model", args.model, "--data", args.data, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--set", 'backend.count_flops="off"', "--out", str(out)]
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{policy}: alast train failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="alast_demo_vit")
    p.add_argument("--data", default="digits")
    p.add_argument("--policies", default="alast,full")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="alast-ddp-bytes-") as tmp:
        for policy in args.policies.split(","):
            records = run_policy(policy, args, Path(tmp) / policy.replace("+", "-"))
            sent = [r["grad_allreduce_bytes"] for r in records]
            rows[policy] = {"bytes_per_step_mean": statistics.mean(sent), "bytes_per_step_min": min(sent),
                            "bytes_per_step_max": max(sent), "steps": len(sent),
                            "trained_blocks_per_step": statistics.mean(len(r["trained_blocks"]) for r in records),
                            "blocks": len(records[0]["budgets"])}
    full = rows.get("full", {}).get("bytes_per_step_mean")
    for row in rows.values():
        row["ratio_vs_full"] = row["bytes_per_step_mean"] / full if full else None
    if args.json:
        print(json.dumps({"model": args.model, "world_size": args.nproc, "policies": rows}))
        return
    print(f"gradient all-reduce per step, {args.model}, {args.nproc} ranks, {args.steps} steps "
          f"(stock DDP: the 'full' volume for every policy)")
    print(f"{'policy':<12}{'trained blocks':>16}{'mean bytes':>14}{'min':>12}{'max':>12}{'vs full':>10}")
    for policy, r in rows.items():
        ratio = f"{r['ratio_vs_full']:.3f}" if r["ratio_vs_full"] is not None else "n/a"
        print(f"{policy:<12}{r['trained_blocks_per_step']:>9.1f} / {r['blocks']:<4}{r['bytes_per_step_mean']:>14,.0f}"
              f"{r['bytes_per_step_min']:>12,}{r['bytes_per_step_max']:>12,}{ratio:>10}")


if __name__ == "__main__":
    main()
