"""Ops one training step dispatches, full fine-tuning against ALaST: what a GPU launches per step.

    python benchmarks/op_count.py                                   # DeiT-S and ViT-B/16, batch 2, on the CPU
    python benchmarks/op_count.py --models alast_demo_vit --targets 0.5 --out /tmp/ops.json

At small batches a GPU step is bound by the host launching kernels, not by the device
(docs/benchmarks.md, "GPU speed grid"), so the number of kernels a step launches sets its pace
there. This counts, on any device, the ATen ops a step dispatches that are not views (a view
launches no kernel), split into the forward and backward pass (with the deltas ALaST records) and
the optimizer step, and the forward and backward pass's reads of a tensor's value on the host
(``_local_scalar_dense``, a sync on a GPU). Per model it builds the same runtime and planner as ``benchmarks/gpu_speed.py`` (random data,
sync-free steps, no early phase or dense final phase): ``full``, ``alast@1.0`` (the machinery at
full budget) and ALaST at each ``--targets`` fraction of full fine-tuning FLOPs, warms the planner
up for ``--warmup`` steps and counts the next step. On the CPU the optimizer is per-parameter
AdamW; on CUDA it is fused, so compare optimizer ops only on one device. Counts do not depend on
the batch size, so a batch of 2 serves. Rows go to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_speed import build, grid_policies, policy_config, require_device, run_steps, write_rows

HOST_READ = "_local_scalar_dense"
ALIASES = {"_unsafe_view"}  # not a view in its schema, but it launches no kernel either


class OpCounter(TorchDispatchMode):
    """Counts the non-view ATen ops dispatched under it, by op name, in the phase named by ``phase``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "step"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ALIASES:
            self.counts[self.phase][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="deit_small_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--targets", default="0.5,0.4", help="ALaST FLOPs targets (fractions of full fine-tuning)")
    ap.add_argument("--warmup", type=int, default=3, help="steps the planner sees before the counted one")
    ap.add_argument("--out", type=Path, default=Path("docs/results/op_count.json"))
    args = ap.parse_args(argv)
    args.compile, args.token_multiple = "off", 1  # what gpu_speed.policy_config reads
    return args


def count(model_name: str, policy: str, target: float | None, args: argparse.Namespace) -> dict[str, Any]:
    """One row: the ops of one step of ``policy``, after ``args.warmup`` planned steps."""
    rt, planner, x, y = build(policy_config(model_name, args.batch, policy, target, args), policy, False, args, {})
    total = args.warmup + 1
    run_steps(rt, planner, x, y, 0, args.warmup, total)
    budget = planner.plan(args.warmup, args.warmup / total)
    counter = OpCounter()
    update = rt._update

    def counted_update(b) -> None:
        counter.phase = "optimizer"
        try:
            update(b)
        finally:
            counter.phase = "step"

    rt._update = counted_update
    with counter:
        result = rt.launch_step(x, y, budget, 1e-4, args.warmup).resolve()
    step, opt = counter.counts["step"], counter.counts["optimizer"]
    return {"model": model_name, "batch": args.batch, "device": str(rt.device), "precision": args.precision,
            "torch": torch.__version__, "policy": policy, "target": target,
            "kept_tokens": list(result.kept_tokens), "trained_blocks": list(result.trained_blocks),
            "step_ops": sum(step.values()) - step[HOST_READ], "optimizer_ops": sum(opt.values()) - opt[HOST_READ],
            "step_host_reads": step[HOST_READ], "step_ops_by_name": dict(step.most_common())}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<26}{'policy':<12}{'step ops':>10}{'vs full':>9}{'optimizer':>11}{'host reads':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        full = next(f for f in rows if f["model"] == r["model"] and f["policy"] == "full")
        lines.append(f"{r['model']:<26}{r['policy']:<12}{r['step_ops']:>10}{r['step_ops'] / full['step_ops']:>8.2f}x"
                     f"{r['optimizer_ops']:>11}{r['step_host_reads']:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    require_device(args.device, "use --device cpu")
    if args.batch < 1 or args.warmup < 0:
        sys.exit("error: --batch must be >= 1 and --warmup >= 0")
    torch.manual_seed(0)
    rows = [count(m, p, t, args) for m in args.models.split(",") for p, t in grid_policies(args.targets)]
    write_rows(rows, args.out)
    print(f"{table(rows)}\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
