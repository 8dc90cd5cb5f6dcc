"""Audit solved FLOP counts on real architectures: every step the torch runtime does not count
(its block shapes solved from counted ones, planners.countfit) is counted afresh and compared.

Random budgets (keep ratios in [--low, 1], about 60% of blocks trained, the embeddings trained on
about half the steps) on randomly initialised timm models; each model's steps run on one runtime,
and each solved step once more on a second runtime that counts every step. Prints, per model, the
steps counted and solved and the largest difference (0 when the solved counts are exact), and
full fine-tuning's reference step (the FLOP ratio's denominator) counted on fake tensors against
a real step counted, with the time of each; writes JSON. Exits 1 on any difference.

  python benchmarks/flop_solve_audit.py --models vit_base_patch16_224,deit_small_patch16_224 \\
      --steps 30 --batch-size 2 --out audit.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alast.models import create_model
from planners import Budget, kept_token_counts
from runtimes.torch_backend.flops import StepFlopCache
from runtimes.torch_backend.runtime import TorchRuntime


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_base_patch16_224,deit_small_patch16_224,vit_small_patch14_reg4_dinov2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--low", type=float, default=0.5, help="the lowest keep ratio drawn")
    ap.add_argument("--img-size", type=int, default=None, help="input size (default: each model's own)")
    ap.add_argument("--reference-batch", type=int, default=16, help="batch of full fine-tuning's reference step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.out is not None and args.out.exists():
        ap.error(f"--out {args.out} exists; name a new file")
    return args


def audit(name: str, args: argparse.Namespace) -> dict:
    def build() -> TorchRuntime:
        torch.manual_seed(args.seed)
        model = create_model(name, 10, pretrained=False, img_size=args.img_size)
        return TorchRuntime(model, lr=1e-4, weight_decay=0.05, grad_clip=1.0, device="cpu",
                            memory_probe_steps=lambda s: False)

    rt, fresh = build(), build()
    size = args.img_size or rt.timm_model.patch_embed.img_size[0]
    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, 10, (args.batch_size,))
    rng = random.Random(args.seed)
    counted, solved, worst = 0, 0, 0.0
    for step in range(args.steps):
        budget = Budget(tuple(rng.uniform(args.low, 1.0) for _ in range(rt.num_blocks)),
                        tuple(rng.random() < 0.6 for _ in range(rt.num_blocks)), train_embeddings=rng.random() < 0.5)
        keys = rt._flops.keys(args.batch_size, *kept_token_counts(budget.keep_ratios, rt.num_patches), budget.trained,
                              budget.train_embeddings and bool(rt.embed_params))
        known = rt._flops.lookup(keys) is not None
        got = rt.train_step(x, y, budget, 1e-4, step).train_flops
        if not known:
            counted += 1
            continue
        fresh._flops = StepFlopCache(fresh._flops.block_names)  # counts this step
        expected = fresh.train_step(x, y, budget, 1e-4, step).train_flops
        solved += 1
        worst = max(worst, abs(got - expected) / expected)
    # Full fine-tuning's reference step: counted on fake tensors, against a real step counted
    # (what the reference cost before it was counted on fake tensors).
    b = args.reference_batch
    t0 = time.perf_counter()
    reference = rt.full_ft_step_flops(b)
    fake_s = time.perf_counter() - t0
    fresh._flops = StepFlopCache(fresh._flops.block_names)
    xb, yb = torch.randn(b, 3, size, size), torch.randint(0, 10, (b,))
    t0 = time.perf_counter()
    every = Budget((1.0,) * rt.num_blocks, (True,) * rt.num_blocks)
    real = fresh.train_step(xb, yb, every, 1e-4, args.steps).train_flops
    real_s = time.perf_counter() - t0
    row = {"model": name, "steps": args.steps, "counted": counted, "solved": solved, "max_rel_difference": worst,
           "num_patches": rt.num_patches, "num_blocks": rt.num_blocks, "reference_batch": b,
           "reference_flops": reference, "real_step_flops": real, "reference_count_s": fake_s, "real_step_s": real_s}
    print(f"{name}: {counted} steps counted, {solved} solved, largest difference {worst:.1e}; full fine-tuning's "
          f"step at batch {b}: {reference:.4g} FLOPs on fake tensors in {fake_s:.2f} s, {real:.4g} counted on a real "
          f"step in {real_s:.2f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = [audit(m, args) for m in args.models.split(",")]
    if args.out is not None:
        command = ["python", "benchmarks/flop_solve_audit.py", *(sys.argv[1:] if argv is None else argv)]
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    if any(r["max_rel_difference"] > 0 or r["reference_flops"] != r["real_step_flops"] for r in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
