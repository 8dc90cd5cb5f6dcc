"""Where the ort step's time goes against the torch step's: one budget, both profiled, op by op.

Both runtimes are built from the default configuration (``--set key=value`` as for ``alast
train``; FLOP counting off) and run the same ALaST budget on the same batch: the bottom blocks the
default freezes keep every token, the trained ones keep ``--keep`` of the tokens they receive, and
the embeddings stay frozen (a sparse step of ``alast train --target-flops 0.5`` on the demo keeps
about 0.85 per trained block; ``--from-run RUN_DIR --step N`` takes a run's own step instead).
Each runtime takes ``--warmup`` untimed steps, then ``--steps`` profiled ones: for ort, ONNX
Runtime's own profiler (``SessionOptions.enable_profiling``, the kernel time of every node) and
``torch.profiler`` for the torch ops of its step (the AdamW update on ORT's buffers); for torch,
``torch.profiler`` (the self time of every ATen op). Ops are grouped into the same families on
both sides (matrix products and attention, layer norm and its gradient, GELU and its gradient,
token gathers and their gradients, ...), per step, with the calls per step, so a family's per-call
cost can be compared where both run the same number of calls. ONNX Runtime's profiler inflates
some kernels: the gradient of a ``Gather`` (a lock per element) read 25.6 ms of a demo step at
batch 64 with it and cost 1.5-3% of the step without it; time steps with ``ort_speed.py``.

``--gemm`` also times the model's linear layers alone (a forward matrix product at the step's
token count, one thread), ONNX Runtime's MLAS against torch's BLAS.

  OMP_NUM_THREADS=1 python benchmarks/ort_profile.py --model alast_demo_vit --batch-size 64 --gemm \\
      --out docs/results/ort_profile_demo_b64.json
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from alast.config import apply_overrides, build_config
from alast.models import create_model
from alast.training.build import create_runtime
from planners import Budget
from planners.rules import default_k_trained

# (family, ONNX Runtime op types, ATen op names)
FAMILIES = [
    ("matrix products and attention",
     {"MatMul", "FusedMatMul", "Gemm", "Softmax", "SoftmaxGrad", "SoftmaxGrad_13"},
     {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm",
      "aten::_scaled_dot_product_flash_attention_for_cpu",
      "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_softmax",
      "aten::_softmax_backward_data"}),
    ("layer norm", {"LayerNormalization"}, {"aten::native_layer_norm"}),
    ("layer norm gradient", {"LayerNormalizationGrad"}, {"aten::native_layer_norm_backward"}),
    ("GELU", {"Gelu", "BiasGelu", "FastGelu"}, {"aten::gelu"}),
    ("GELU gradient", {"GeluGrad", "BiasGeluGrad_dX", "FastGeluGrad"}, {"aten::gelu_backward"}),
    ("token gathers", {"Gather", "GatherElements", "GatherND"}, {"aten::gather", "aten::index_select", "aten::index"}),
    ("token gathers' gradients", {"GatherGrad", "GatherElementsGrad", "GatherNDGrad"},
     {"aten::scatter_", "aten::scatter", "aten::scatter_add_", "aten::index_add_", "aten::index_put_",
      "aten::_index_put_impl_"}),
    ("copies and transposes", {"Transpose", "Concat", "ConcatTraining", "Split", "Expand", "Tile"},
     {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::split_with_sizes_copy"}),
    ("elementwise arithmetic", {"Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Neg", "Where", "Erf", "Sum"},
     {"aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
      "aten::sqrt", "aten::neg", "aten::where", "aten::fill_", "aten::zero_", "aten::addcmul_",
      "aten::addcdiv_", "aten::lerp_", "aten::sqrt_", "aten::sum"}),
]


def family_of(op: str) -> str:
    for name, ort_ops, aten_ops in FAMILIES:
        if op in ort_ops or op in aten_ops:
            return name
    return "other"


def runtime_config(backend: str, model_name: str, threads: int, overrides: list[str]):
    data = apply_overrides({}, [f"model.name={model_name}", f"backend.name={backend}", "backend.device=cpu",
                                "backend.count_flops=off", f"backend.threads={threads}", *overrides])
    return build_config(data)


FIRST_STEP = 1001  # step numbers clear of the torch runtime's memory probes (steps 1, 2, every 50th)


def the_budget(depth: int, keep: float) -> Budget:
    """The default's bottom blocks frozen on every token, the others trained keeping ``keep``."""
    trained_k = default_k_trained(depth, "last")
    trained = tuple(b >= depth - trained_k for b in range(depth))
    ratios = tuple(keep if t else 1.0 for t in trained)
    return Budget(ratios, trained, budgets=ratios, train_embeddings=False)


def run_budget(run_dir: Path, step: int, depth: int) -> Budget:
    """The budget step ``step`` (1-based) of a run took, from its ``metrics.jsonl``."""
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rec = json.loads(lines[step - 1])
    trained = set(rec["trained_blocks"])
    return Budget(tuple(rec["keep_ratios"]), tuple(b in trained for b in range(depth)),
                  budgets=tuple(rec.get("budgets") or rec["keep_ratios"]),
                  train_embeddings=bool(rec.get("embeddings_trained", True)))


def add_aten_ops(ops: dict, prof, steps: int) -> None:
    """Each ATen op's self time (ms) and calls per step, from a ``torch.profiler`` profile."""
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") and ev.self_cpu_time_total > 0:
            ops[ev.key][0] += ev.self_cpu_time_total / 1e3 / steps  # us -> ms per step
            ops[ev.key][1] += ev.count / steps


def profile_torch(rt, x, y, budget, warmup: int, steps: int) -> tuple[dict, list[float]]:
    for i in range(warmup):
        rt.train_step(x, y, budget, 1e-4, FIRST_STEP + i)
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            times.append(rt.train_step(x, y, budget, 1e-4, FIRST_STEP + warmup + i).step_time_s)
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    add_aten_ops(ops, prof, steps)
    return dict(ops), times


def profile_ort(rt, x, y, budget, warmup: int, steps: int, trace_dir: Path) -> tuple[dict, list[float]]:
    """Kernel times from ONNX Runtime's profile of the steps after ``warmup`` (one artifact set), and
    the self times of the torch ops the same steps run (the AdamW update on ORT's buffers)."""
    for i in range(warmup):
        rt.train_step(x, y, budget, 1e-4, FIRST_STEP + i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the step's own torch ops: AdamW, the inputs
        times = [rt.train_step(x, y, budget, 1e-4, FIRST_STEP + warmup + i).step_time_s for i in range(steps)]
    for ts in list(rt.cache._live.values()):  # ORT writes the profile when a session ends
        ts.module = None
        ts.state = None
    rt.cache._live.clear()
    gc.collect()
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    files = sorted(trace_dir.glob("ort_profile*.json"))
    runs = 0
    for f in files:
        events = json.loads(f.read_text())
        starts = sorted(ev["ts"] for ev in events if ev.get("name") == "model_run")
        runs += len(starts)
        cutoff = starts[warmup] if len(starts) > warmup else float("inf")  # the warm-up steps' runs come first
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] >= cutoff:
                op = ev["args"].get("op_name", "?")
                ops[op][0] += ev["dur"] / 1e3 / steps
                ops[op][1] += 1 / steps
    add_aten_ops(ops, prof, steps)
    if runs != warmup + steps:
        raise SystemExit(f"expected {warmup + steps} profiled ONNX Runtime runs in one session, found {runs}")
    return dict(ops), times


def by_family(ops: dict) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for op, (ms, calls) in ops.items():
        fam = out.setdefault(family_of(op), {"ms": 0.0, "calls": 0.0})
        fam["ms"] += ms
        fam["calls"] += calls
    return out


def gemm_times(model, tokens_per_block: list[int], batch: int, reps: int = 10) -> list[dict]:
    """A forward matrix product of each distinct linear shape, ORT (MLAS) against torch."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    shapes = []
    blk = model.blocks[-1]
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        for n in sorted(set(tokens_per_block)):
            shapes.append((batch * n, lin.in_features, lin.out_features))
    rows = []
    for m, k, n in sorted(set(shapes)):
        a = torch.randn(m, k)
        b = torch.randn(k, n)
        for _ in range(2):
            a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        t_torch = (time.perf_counter() - t0) / reps
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
                                   helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
                                    .SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {"a": a.numpy(), "b": b.numpy().astype(np.float32)}
        for _ in range(2):
            sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(reps):
            sess.run(None, feed)
        t_ort = (time.perf_counter() - t0) / reps
        rows.append({"m": m, "k": k, "n": n, "torch_ms": t_torch * 1e3, "ort_ms": t_ort * 1e3,
                     "ort_over_torch": t_ort / t_torch})
        print(f"  matmul [{m} x {k}] @ [{k} x {n}]: torch {t_torch * 1e3:7.2f} ms, ort {t_ort * 1e3:7.2f} ms, "
              f"ort/torch {t_ort / t_torch:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alast_demo_vit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.85, help="keep ratio of each trained block")
    ap.add_argument("--classes", type=int, default=25)
    ap.add_argument("--from-run", type=Path, default=None, metavar="RUN_DIR",
                    help="take the budget of a step of this run (--step) instead of --keep")
    ap.add_argument("--step", type=int, default=200, help="with --from-run: which step's budget")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gemm", action="store_true", help="also time the linear layers' matrix products alone")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("ort_profile.json"))
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    model = create_model(args.model, args.classes, pretrained=False)
    depth = len(model.blocks)
    budget = the_budget(depth, args.keep) if args.from_run is None else run_budget(args.from_run, args.step, depth)
    img = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, img[0], img[1], generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)

    from runtimes.ort_backend import artifacts

    trace_dir = Path(tempfile.mkdtemp(prefix="alast-ort-profile-"))
    make_options = artifacts.ArtifactCache._session_options

    def profiled(self):
        opts = make_options(self)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(trace_dir / "ort_profile")
        return opts

    artifacts.ArtifactCache._session_options = profiled
    try:
        rt_ort = create_runtime(runtime_config("ort", args.model, threads, args.overrides), copy.deepcopy(model))
        rt_torch = create_runtime(runtime_config("torch", args.model, threads, args.overrides),
                                  copy.deepcopy(model))
        torch_ops, torch_times = profile_torch(rt_torch, x, y, budget, args.warmup, args.steps)
        kept = list(rt_torch.train_step(x, y, budget, 1e-4, FIRST_STEP + 40).kept_tokens)
        ort_ops, ort_times = profile_ort(rt_ort, x, y, budget, args.warmup, args.steps, trace_dir)
    finally:
        artifacts.ArtifactCache._session_options = make_options
        shutil.rmtree(trace_dir, ignore_errors=True)

    fam_t, fam_o = by_family(torch_ops), by_family(ort_ops)
    med_t, med_o = statistics.median(torch_times), statistics.median(ort_times)
    print(f"{args.model}, batch {args.batch_size}, {threads} thread(s), trained blocks "
          f"{[b for b, t in enumerate(budget.trained) if t]}, tokens kept per block {kept}")
    print(f"median step (profilers on): torch {med_t * 1e3:.1f} ms, ort {med_o * 1e3:.1f} ms "
          f"(ort/torch {med_o / med_t:.2f})")
    print(f"{'family':32s} {'torch ms':>9s} {'calls':>6s} {'ort ms':>9s} {'calls':>6s} {'ort-torch':>10s}")
    rows = []
    names = [f[0] for f in FAMILIES] + ["other"]
    for fam in names:
        t, o = fam_t.get(fam, {"ms": 0.0, "calls": 0.0}), fam_o.get(fam, {"ms": 0.0, "calls": 0.0})
        rows.append({"family": fam, "torch_ms": t["ms"], "torch_calls": t["calls"], "ort_ms": o["ms"],
                     "ort_calls": o["calls"]})
        print(f"{fam:32s} {t['ms']:9.2f} {t['calls']:6.0f} {o['ms']:9.2f} {o['calls']:6.0f} {o['ms'] - t['ms']:+10.2f}")
    tot_t, tot_o = sum(r["torch_ms"] for r in rows), sum(r["ort_ms"] for r in rows)
    print(f"{'total (op self / kernel time)':32s} {tot_t:9.2f} {'':6s} {tot_o:9.2f} {'':6s} {tot_o - tot_t:+10.2f}")
    command = ["python benchmarks/ort_profile.py", *(sys.argv[1:] if argv is None else argv)]
    out = {"command": " ".join(command), "model": args.model, "batch_size": args.batch_size, "threads": threads,
           "keep": None if args.from_run else args.keep,
           "from_run": None if args.from_run is None else {"run_dir": str(args.from_run), "step": args.step}, "trained": list(budget.trained), "kept_tokens": kept,
           "median_step_ms": {"torch": med_t * 1e3, "ort": med_o * 1e3}, "families": rows,
           "torch_ops": {k: {"ms": v[0], "calls": v[1]} for k, v in sorted(torch_ops.items())},
           "ort_ops": {k: {"ms": v[0], "calls": v[1]} for k, v in sorted(ort_ops.items())},
           "machine": platform.processor() or platform.machine()}
    if args.gemm:
        prefix = int(model.num_prefix_tokens)
        tokens = [int(model.patch_embed.num_patches) + prefix] + [k + prefix for k in kept]
        out["gemm"] = gemm_times(model, tokens, args.batch_size)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
