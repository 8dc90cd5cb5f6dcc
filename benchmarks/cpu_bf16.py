"""bf16 autocast on the CPU against fp32: training-step time of full fine-tuning and ALaST.

    python benchmarks/cpu_bf16.py                 # four models, fp32 and bf16, full and ALaST at 0.5x and 0.4x
    python benchmarks/cpu_bf16.py --attention     # torch's CPU flash attention alone, in bf16 and in fp32
    python benchmarks/cpu_bf16.py --models alast_demo_vit:4 --rounds 1 --steps 1 --warmup 1   # a smoke run

Needs a CPU with bf16 matrix instructions (AVX-512 BF16 or AMX); elsewhere the torch runtime
refuses ``backend.precision=bf16``. Per model (``name:batch``) and round, every (precision,
policy) pair runs through the real torch runtime as ``benchmarks/gpu_speed.py`` builds it
(random weights and data, sparse steps at the target, no early or dense final phase): ``--warmup``
steps, then ``--steps`` timed ones. Pairs alternate within a round and rounds repeat, so drift on a
shared machine hits all alike; a row's time is the median over rounds of each round's median
step. FLOPs are counted once per row, after the first round. Each row gives its speed-up over full
fine-tuning in fp32 and in its own precision.

``--attention`` times ``F.scaled_dot_product_attention`` on bf16 queries, keys and values laid out
as a timm block has them (views of one qkv projection), called in bf16 or cast to fp32 and back,
forward alone and forward with backward, with every query and with 60% of them (a block that drops
tokens): why the runtime runs differentiated attention in fp32 under CPU autocast
(``runtimes/torch_backend/precision.py``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_speed import build, count_flops_ratio, grid_policies, policy_config, run_steps, write_rows
from runtimes.torch_backend.precision import cpu_has_native_bf16

ATTENTION_SHAPES = ((16, 6, 197, 64), (8, 12, 197, 64), (64, 4, 197, 32), (64, 4, 65, 32))  # B, heads, N, d


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="deit_small_patch16_224:16,vit_base_patch16_224:8,alast_vit12:64,"
                    "alast_demo_vit:64", help="comma-separated name:batch")
    ap.add_argument("--targets", default="0.5,0.4", help="ALaST FLOPs targets (fractions of full fine-tuning)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--attention", action="store_true", help="time the attention kernel alone instead")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows (default docs/results/cpu_bf16[_attention].json)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(f"docs/results/cpu_bf16{'_attention' if args.attention else ''}.json")
    return args


def _median_ms(fn, reps: int = 9, skip: int = 2) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[skip:])


def attention_ms(b: int, heads: int, n: int, d: int, queries: int, backward: bool, in_fp32: bool) -> float:
    """Median time of one attention call (and its backward) on bf16 inputs, in bf16 or in fp32."""
    qkv = torch.randn(b, n, 3, heads, d, dtype=torch.bfloat16, requires_grad=backward)

    def call() -> None:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = q[:, :, :queries]
        if in_fp32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.sum().backward()

    with torch.set_grad_enabled(backward):
        return _median_ms(call)


def attention_rows() -> list[dict[str, Any]]:
    rows = []
    for b, heads, n, d in ATTENTION_SHAPES:
        for queries in (n, int(0.6 * n)):
            for backward in (False, True):
                bf16 = attention_ms(b, heads, n, d, queries, backward, False)
                fp32 = attention_ms(b, heads, n, d, queries, backward, True)
                rows.append({"batch": b, "heads": heads, "keys": n, "head_dim": d, "queries": queries,
                             "pass": "forward and backward" if backward else "forward", "bf16_ms": bf16,
                             "fp32_ms": fp32, "bf16_over_fp32": bf16 / fp32})
                print(f"B{b} H{heads} N{n} d{d} q{queries} {rows[-1]['pass']:<21} bf16 {bf16:7.1f} ms  "
                      f"fp32 {fp32:7.1f} ms  bf16/fp32 {bf16 / fp32:.2f}", flush=True)
    return rows


def _time_row(model: str, batch: int, precision: str, policy: str, target: float | None, args, solved: dict,
              count: bool) -> tuple[float, float | None]:
    """One round of one row: the median step in ms, and (``count``) the counted FLOPs over full's."""
    opts = argparse.Namespace(device="cpu", precision=precision, token_multiple=1, compile="off")
    rt, planner, x, y = build(policy_config(model, batch, policy, target, opts), policy, False, opts, solved)
    total = args.warmup + args.steps
    run_steps(rt, planner, x, y, 0, args.warmup, total)
    timed = run_steps(rt, planner, x, y, args.warmup, args.steps, total)
    ms = 1000 * statistics.median(r.step_time_s for r, _ in timed)
    ratio = count_flops_ratio(rt, [b for _, b in timed], x, y, batch) if count else None
    return ms, ratio


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    policies = [p for p in grid_policies(args.targets) if p[0] != "alast@1.0"]
    rows: dict[tuple, dict[str, Any]] = {}
    solved: dict = {}
    for rnd in range(args.rounds):
        for spec in args.models.split(","):
            model, batch = spec.rsplit(":", 1)
            for policy, target in policies:
                for precision in ("fp32", "bf16"):
                    key = (model, int(batch), precision, policy)
                    row = rows.setdefault(key, {"model": model, "batch": int(batch), "precision": precision,
                                                "policy": policy, "target": target, "round_ms": []})
                    ms, ratio = _time_row(model, int(batch), precision, policy, target, args, solved, rnd == 0)
                    row["round_ms"].append(ms)
                    if ratio is not None:
                        row["flops_ratio"] = ratio
                    print(f"  round {rnd} {model} b{batch} {precision} {policy}: {ms:.1f} ms", file=sys.stderr,
                          flush=True)
    out = list(rows.values())
    for row in out:
        row["step_ms"] = statistics.median(row["round_ms"])
    for row in out:
        same = {k: row[k] for k in ("model", "batch")}
        full = {p: next(r for r in out if r["policy"] == "full" and r["precision"] == p and
                        all(r[k] == v for k, v in same.items())) for p in ("fp32", "bf16")}
        row["speedup_vs_full_fp32"] = full["fp32"]["step_ms"] / row["step_ms"]
        row["speedup_vs_full_same_precision"] = full[row["precision"]]["step_ms"] / row["step_ms"]
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<24}{'batch':>6}  {'precision':<10}{'policy':<11}{'ms':>9}{'flops':>7}"
            f"{'vs fp32 full':>14}{'vs own full':>13}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["model"], r["precision"] != "fp32", r["policy"] != "full", r["policy"])):
        lines.append(f"{r['model']:<24}{r['batch']:>6}  {r['precision']:<10}{r['policy']:<11}{r['step_ms']:>9.1f}"
                     f"{r['flops_ratio']:>7.2f}{r['speedup_vs_full_fp32']:>13.2f}x"
                     f"{r['speedup_vs_full_same_precision']:>12.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if not cpu_has_native_bf16():
        sys.exit("error: this CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX); bf16 would be emulated")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        sys.exit("error: --rounds and --steps must be >= 1 and --warmup >= 0")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.attention:
        rows = [{**meta, **r} for r in attention_rows()]
    else:
        rows = [{**meta, **r} for r in step_rows(args)]
        print(table(rows))
    write_rows(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
