"""The GPU speed grid in one command: ALaST vs full fine-tuning, eager and compiled.

    python benchmarks/gpu_speed.py                      # the full grid on CUDA (bf16), ~6-8 min on an H200
    python benchmarks/gpu_speed.py --device cpu --models alast_demo_vit --batches 4 --steps 2 \\
        --warmup 1 --precision fp32 --compile off       # a smoke run on the CPU

Per (model, batch, compile) it runs, on random data through the real torch runtime (sync-free
step, fused AdamW on CUDA): ``full`` fine-tuning; ``alast@1.0`` (the ALaST machinery with every
keep ratio 1 and every block trained: its overhead over ``full``); and ALaST at each
``--targets`` fraction of full fine-tuning FLOPs, its knobs set by ``alast.planning.plan.solve_target``
exactly as ``alast train --target-flops`` does, without the dense final phase (its steps run every
token through few trained blocks; the grid times the steps that drop tokens). Warm-up steps
(compilation included) come first, then ``--steps`` timed steps with ``torch.cuda.synchronize``
around the window. FLOPs are counted afterwards, once per distinct step shape, outside the timed
window. Rows go to ``--out`` as JSON
(see docs/gpu.md for the fields and how the run time was estimated).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alast.config import load_config  # noqa: E402
from alast.models import create_model  # noqa: E402
from alast.training.build import build_planner  # noqa: E402
from planners import Observation  # noqa: E402
from runtimes.torch_backend.runtime import TorchRuntime  # noqa: E402

CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="vit_base_patch16_224,deit_small_patch16_224")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--compile", default="both", choices=["both", "on", "off"])
    ap.add_argument("--targets", default="0.5,0.4", help="ALaST FLOPs targets (fractions of full fine-tuning)")
    ap.add_argument("--warmup", type=int, default=6, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    ap.add_argument("--token-multiple", type=int, default=1, help="backend.token_multiple for the ALaST rows "
                    "(8 suits tensor cores; the planner solves the targets with the same rounding)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/gpu_speed.json"))
    return ap.parse_args(argv)


def policy_config(model: str, batch: int, policy: str, target: float | None, args) -> Any:
    sets = [f"model.name={model}", "model.pretrained=false", f"data.spec=random:{CLASSES}",
            f"train.batch_size={batch}", f"backend.device={args.device}", f"backend.precision={args.precision}",
            "train.lr=1e-4", f"policy.name={'full' if policy == 'full' else 'alast'}",
            "policy.dense_final_frac=0", "policy.early_frac=0"]  # every timed step is a sparse step at the target
    if target is not None:
        sets.append(f"policy.target_flops={target}")
    if policy.startswith("alast"):  # the planner rounds (and solves the target) as the runtime does
        sets.append(f"backend.token_multiple={args.token_multiple}")
    return load_config(None, sets)


def planner_for(cfg, num_blocks: int, policy: str, solved: dict[tuple, dict]):
    """The planner of a row: full, ALaST pinned at full budget, or ALaST solved for a target."""
    if policy == "alast@1.0":
        return build_planner(cfg, num_blocks, {"b_init": 1.0, "b_min": 1.0, "b_max": 1.0, "k_trained": num_blocks})
    if cfg.policy.target_flops is None:
        return build_planner(cfg, num_blocks)
    key = (cfg.model.name, cfg.policy.target_flops)
    if key not in solved:
        from alast.planning.plan import solve_target

        solved[key] = solve_target(cfg)[0]
    return build_planner(cfg, num_blocks, solved[key])


def require_device(device: str, hint: str) -> None:
    """Exit with one line where ``--device cuda`` was asked for and no CUDA device is visible."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: no CUDA device visible; {hint}")


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    """Write a benchmark's rows to ``out`` as JSON (its folder made where missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


def grid_policies(targets: str) -> list[tuple[str, float | None]]:
    """The rows of a grid, ``(policy, target)``: full fine-tuning, the ALaST machinery at full budget,
    and ALaST at each of the comma-separated ``targets``."""
    fractions = [float(t) for t in targets.split(",") if t]
    return [("full", None), ("alast@1.0", None)] + [(f"alast@{t:g}", t) for t in fractions]


def run_steps(rt: TorchRuntime, planner, x, y, first: int, n: int, total: int) -> list[Any]:
    """``n`` sync-free steps (plan -> launch -> read back the previous one -> observe)."""
    pending, results = None, []
    for step in range(first, first + n):
        budget = planner.plan(step, step / total)
        launched = rt.launch_step(x, y, budget, 1e-4, step)
        if pending is not None:
            results.append(_settle(pending, planner, total))
        pending = (launched, budget)
    if pending is not None:  # n = 0 (no warm-up) launches nothing
        results.append(_settle(pending, planner, total))
    return results


def _settle(pending, planner, total: int):
    launched, budget = pending
    res = launched.resolve()
    planner.observe(Observation(launched.step, launched.step / total, res.deltas, res.loss))
    return res, budget


def count_flops_ratio(rt: TorchRuntime, budgets: list, x, y, batch: int) -> float:
    """Counted FLOPs of the timed steps' shapes over full fine-tuning's (each shape counted once)."""
    rt.count_flops = "every"
    total = 0.0
    for step, budget in enumerate(budgets):
        total += rt.launch_step(x, y, budget, 0.0, step).resolve().train_flops
    full = rt.full_ft_step_flops(batch)
    return total / (full * len(budgets))


def syncs_while_launching(rt: TorchRuntime, planner, x, y, total: int) -> int | None:
    """Host syncs CUDA reports while two steps are launched (0: the step never waits)."""
    if rt.device.type != "cuda":
        return None
    budget = planner.plan(total, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            launched = [rt.launch_step(x, y, budget, 1e-4, total + i) for i in range(2)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for p in launched:
        p.resolve()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def build(cfg, policy: str, compiled: bool, args, solved: dict) -> tuple[TorchRuntime, Any, torch.Tensor, torch.Tensor]:
    """A row's runtime (random weights), planner, and one fixed random batch (pinned on CUDA)."""
    batch = cfg.train.batch_size
    multiple = args.token_multiple if policy.startswith("alast") else 1
    rt = TorchRuntime(create_model(cfg.model.name, CLASSES, pretrained=False), lr=1e-4, weight_decay=0.05,
                      grad_clip=1.0, device=args.device, precision=args.precision, count_flops="off", compile=compiled,
                      token_multiple=multiple, sync_free="on", memory_probe_steps=lambda s: False,
                      freeze_embeddings=cfg.policy.embeddings_frozen and policy != "alast@1.0",
                      token_select=cfg.policy.token_select, token_score=cfg.policy.token_score)
    planner = planner_for(cfg, rt.num_blocks, policy, solved)
    img = rt.timm_model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img[0], img[1], generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    if rt.device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return rt, planner, x, y


def measure(model_name: str, batch: int, compiled: bool, policy: str, target: float | None, args,
            solved: dict) -> dict[str, Any]:
    rt, planner, x, y = build(policy_config(model_name, batch, policy, target, args), policy, compiled, args, solved)
    total = args.warmup + args.steps
    run_steps(rt, planner, x, y, 0, args.warmup, total)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    timed = run_steps(rt, planner, x, y, args.warmup, args.steps, total)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    window = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated()) if rt.device.type == "cuda" else None
    syncs = syncs_while_launching(rt, planner, x, y, total)
    ratio = count_flops_ratio(rt, [b for _, b in timed], x, y, batch)
    row = {"device": torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu",
           "torch": torch.__version__, "model": model_name, "batch": batch, "precision": args.precision,
           "compile": compiled, "policy": policy, "target": target, "token_multiple": rt.token_multiple,
           "steps": args.steps, "warmup": args.warmup,
           "median_step_ms": 1000 * statistics.median(r.step_time_s for r, _ in timed),
           "window_step_ms": 1000 * window / args.steps, "images_per_s": batch * args.steps / window,
           "peak_memory_bytes": peak, "flops_ratio": ratio, "compile_time_s": rt.compile_time_s,
           "host_syncs_launching_2_steps": syncs,
           "mean_kept_tokens_last_block": statistics.mean(r.kept_tokens[-1] for r, _ in timed)}
    del rt, planner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up over full fine-tuning with the same model, batch, precision and compile setting, and
    the share of the FLOP bound it reaches: speed-up / (1 / flops_ratio)."""
    for row in rows:
        ref = next(r for r in rows if r["policy"] == "full" and all(
            r[k] == row[k] for k in ("model", "batch", "precision", "compile")))
        row["speedup_vs_full"] = ref["window_step_ms"] / row["window_step_ms"]
        bound = ref["flops_ratio"] / row["flops_ratio"]
        row["share_of_flop_bound"] = row["speedup_vs_full"] / bound


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<24}{'batch':>6}{'comp':>6}  {'policy':<10}{'ms':>9}{'img/s':>9}{'GiB':>7}{'flops':>7}{'speedup':>9}{'bound%':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        gib = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "-"
        lines.append(f"{r['model']:<24}{r['batch']:>6}{'y' if r['compile'] else 'n':>6}  {r['policy']:<10}"
                     f"{r['window_step_ms']:>9.1f}{r['images_per_s']:>9.0f}{gib:>7}{r['flops_ratio']:>7.2f}"
                     f"{r['speedup_vs_full']:>8.2f}x{100 * r['share_of_flop_bound']:>7.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    require_device(args.device, "use --device cpu with tiny settings for a smoke run")
    if args.steps < 1 or args.warmup < 0:
        sys.exit("error: --steps must be >= 1 and --warmup >= 0")
    compiles = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    policies = grid_policies(args.targets)
    rows, solved = [], {}
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for compiled in compiles:
                for policy, target in policies:
                    rows.append(measure(model, batch, compiled, policy, target, args, solved))
                    print(f"  {model} b{batch} compile={compiled} {policy}: "
                          f"{rows[-1]['window_step_ms']:.1f} ms", file=sys.stderr, flush=True)
                    add_ratios(rows)  # rewritten after every row: a grid stopped part-way keeps its rows
                    write_rows(rows, args.out)
    print(table(rows))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
