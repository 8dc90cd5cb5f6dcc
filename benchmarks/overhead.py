"""Cost of the ALaST machinery, and alast vs full, per training step on real architectures.

Times, alternating in rounds (medians):
  plain  - the unpatched timm model, full fine-tuning step
  patched- the patched model at full budget (CLS deltas recorded, no dropping): the overhead
  full   - TorchRuntime with the `full` policy (what `alast train --policy full` runs)
  alast  - TorchRuntime with the `alast` policy at its defaults (b=0.9, 9 of 12 blocks trained)
and counts each one's FLOPs with torch.utils.flop_counter, and peak memory (CUDA allocator or
MemTracker on CPU). Writes JSON to --out.

  python benchmarks/overhead.py --model vit_base_patch16_224 --batch-size 8 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alast.models import create_model  # noqa: E402
from planners import create_planner  # noqa: E402
from runtimes.torch_backend.flops import counter  # noqa: E402
from runtimes.torch_backend.runtime import TorchRuntime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--policy-kw", default="{}", help="JSON options for the alast planner")
    ap.add_argument("--out", type=Path, default=Path("overhead.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)

    def fresh():
        return create_model(args.model, 10).to(dev)

    size = fresh().patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.precision == "bf16" else None

    plain = fresh()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        if amp:
            with amp():
                loss = F.cross_entropy(plain(x).float(), y)
        else:
            loss = F.cross_entropy(plain(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()

    runtimes, planners = {}, {}
    for name in ("full", "alast"):
        runtimes[name] = TorchRuntime(fresh(), lr=1e-4, weight_decay=0.05, grad_clip=1.0, device=args.device,
                                      precision=args.precision, count_flops="off",
                                      memory_probe_steps=lambda s: False)
        kw = json.loads(args.policy_kw) if name == "alast" else {}
        planners[name] = create_planner(name, runtimes[name].num_blocks, **kw)
    steps = {"full": 0, "alast": 0}

    def rt_step(name: str) -> None:
        budget = planners[name].plan(steps[name], 0.0)
        r = runtimes[name].train_step(x, y, budget, 1e-4, steps[name])
        steps[name] += 1
        planners[name].observe(__import__("planners").Observation(steps[name], 0.0, r.deltas))

    def patched_step() -> None:
        rt = runtimes["full"]
        budget = planners["full"].plan(0, 0.0)
        rt.train_step(x, y, budget, 1e-4, 0)

    fns = {"plain": plain_step, "patched": patched_step, "full": lambda: rt_step("full"),
           "alast": lambda: rt_step("alast")}
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warm-up
        fn(), fn()
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for k in order:
            sync()
            t = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t)
    flops = {}
    for k in ("full", "alast"):
        runtimes[k].count_flops = "every"
        budget = planners[k].plan(steps[k], 0.0)
        flops[k] = runtimes[k].train_step(x, y, budget, 1e-4, steps[k]).train_flops
    with counter() as c:
        plain_step()
    flops["plain"] = c.get_total_flops()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "batch_size": args.batch_size, "device": str(dev), "precision": args.precision,
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "median_step_s": med, "overhead_patched_vs_plain": med["patched"] / med["plain"] - 1,
        "flops": flops, "flops_ratio_alast_vs_full": flops["alast"] / flops["full"],
        "speedup_alast_vs_full": med["full"] / med["alast"],
    }
    if dev.type == "cuda":
        mem = {}
        for k in ("full", "alast"):
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                rt_step(k)
            mem[k] = torch.cuda.max_memory_allocated()
        result["peak_memory_bytes"] = mem
        result["memory_ratio_alast_vs_full"] = mem["alast"] / mem["full"]
    else:
        mem = {}
        for k in ("full", "alast"):
            rt = runtimes[k]
            rt._probe = lambda s: True
            rt._peak_bytes = None
            rt_step(k)
            mem[k] = rt.peak_memory_bytes()
        result["peak_memory_bytes"] = mem
        result["memory_ratio_alast_vs_full"] = mem["alast"] / mem["full"]
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
