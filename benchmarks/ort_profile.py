"""Where the ort step's time goes against the torch step's: one budget, both profiled, op by op.

Both runtimes are built from the default configuration (``--set key=value`` as for ``alast
train``; FLOP counting off) and run the same ALaST budget on the same batch: by default the bottom
blocks the default freezes keep every token, the trained ones keep ``--keep`` of the tokens they
receive and the embeddings stay frozen; ``--from-run RUN_DIR --step N`` takes the budget of step N
(the ``step`` field of its ``metrics.jsonl``) of a run instead, with the run's token floor and
rounding, and checks that the torch runtime keeps the run's tokens. Each runtime takes
``--warmup`` untimed steps, then ``--steps`` profiled ones: for ort, ONNX Runtime's own profiler
(``SessionOptions.enable_profiling``, the kernel time of every node) and ``torch.profiler`` for the
torch ops of its step (the AdamW update on ORT's buffers); for torch, ``torch.profiler`` (the self
time of every ATen op). Ops are grouped into the same families on both sides (matrix products and
attention, layer norm and its gradient, GELU and its gradient, token gathers and their gradients,
...), per step, with the calls per step, so a family's per-call cost can be compared where both run
the same number of calls. ONNX Runtime's profiler inflates some kernels (the gradient of a
``Gather``, whose every element takes a lock: ``docs/backends.md``); time steps with
``ort_speed.py``, not with this.

``--gemm`` also times the model's linear layers alone (a forward matrix product at each token count
of the step, on the benchmark's threads), ONNX Runtime's MLAS against torch's BLAS.

  alast train --data shapes --steps 300 --target-flops 0.5 --seed 0 --set backend.threads=1 --out RUN
  OMP_NUM_THREADS=1 python benchmarks/ort_profile.py --from-run RUN --step 199 --gemm \\
      --out docs/results/ort_profile_demo_b64.json
  OMP_NUM_THREADS=1 python benchmarks/ort_profile.py --model vit_base_patch16_224 --batch-size 8 \\
      --warmup 1 --steps 3 --gemm --out docs/results/ort_profile_vitb_b8.json
"""
from __future__ import annotations

import argparse
import collections
import copy
import functools
import gc
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from alast.config import apply_overrides, build_config, read_yaml
from alast.models import create_model
from alast.training.build import create_runtime
from planners import Budget
from planners.rules import default_k_trained, memory_probe_step

# (family, ONNX Runtime op types, ATen op names); ORT's plain Gather reads shapes and the class token
FAMILIES = [
    ("matrix products and attention",
     {"MatMul", "FusedMatMul", "Gemm", "Softmax", "SoftmaxGrad", "SoftmaxGrad_13"},
     {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
      "aten::_scaled_dot_product_flash_attention_for_cpu",
      "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_softmax",
      "aten::_softmax_backward_data"}),
    ("layer norm", {"LayerNormalization"}, {"aten::native_layer_norm"}),
    ("layer norm gradient", {"LayerNormalizationGrad"}, {"aten::native_layer_norm_backward"}),
    ("GELU", {"Gelu", "BiasGelu", "FastGelu"}, {"aten::gelu"}),
    ("GELU gradient", {"GeluGrad", "BiasGeluGrad_dX", "FastGeluGrad"}, {"aten::gelu_backward"}),
    ("token gathers", {"GatherND", "GatherElements"}, {"aten::gather", "aten::index_select"}),
    ("token gathers' gradients", {"GatherGrad", "GatherElementsGrad", "GatherNDGrad"},
     {"aten::scatter_", "aten::scatter", "aten::scatter_add_", "aten::index_add_", "aten::index_put_",
      "aten::_index_put_impl_"}),
    ("copies and transposes", {"Transpose", "Concat", "ConcatTraining", "Split", "Expand", "Tile"},
     {"aten::copy_", "aten::cat", "aten::clone", "aten::split_with_sizes_copy"}),
    ("elementwise arithmetic and sums",
     {"Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Neg", "Where", "Erf", "Sum", "ReduceSum", "ReduceMean",
      "ReduceSumTraining"},
     {"aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
      "aten::sqrt", "aten::neg", "aten::where", "aten::fill_", "aten::zero_", "aten::addcmul_",
      "aten::addcdiv_", "aten::lerp_", "aten::sqrt_", "aten::sum", "aten::mean"}),
]
OTHER = "other"
# step numbers the torch runtime never probes for memory (MemTracker slows a probed step ~2x)
STEP_NUMBERS = [s for s in range(1001, 2000) if not memory_probe_step(s)]


class OpTimes:
    """Time (ms) and calls of each op over ``steps`` profiled steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.ms: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def add(self, op: str, ms: float, calls: int) -> None:
        self.ms[op] += ms
        self.calls[op] += calls

    def add_torch(self, prof) -> None:
        """Every ATen op's self time from a ``torch.profiler`` profile (wrappers add their own only)."""
        for ev in prof.key_averages():
            if ev.key.startswith("aten::"):
                self.add(ev.key, ev.self_cpu_time_total / 1e3, ev.count)

    def per_step(self) -> dict[str, dict[str, float]]:
        return {op: {"ms": self.ms[op] / self.steps, "calls": self.calls[op] / self.steps} for op in sorted(self.ms)}

    def by_family(self) -> dict[str, dict[str, float]]:
        """Per step, summed by family (``OTHER`` for an op in none)."""
        out = {name: {"ms": 0.0, "calls": 0.0} for name, _, _ in FAMILIES}
        out[OTHER] = {"ms": 0.0, "calls": 0.0}
        for op, row in self.per_step().items():
            fam = out[family_of(op)]
            fam["ms"] += row["ms"]
            fam["calls"] += row["calls"]
        return out


def family_of(op: str) -> str:
    """The family an ONNX Runtime op type or ATen op belongs to."""
    for name, ort_ops, aten_ops in FAMILIES:
        if op in ort_ops or op in aten_ops:
            return name
    return OTHER


def runtime_config(backend: str, model_name: str, threads: int, overrides: list[str]):
    """The default configuration for ``backend`` on the CPU, FLOP counting off, ``threads`` threads."""
    data = apply_overrides({}, [f"model.name={model_name}", f"backend.name={backend}", "backend.device=cpu",
                                "backend.count_flops=off", f"backend.threads={threads}", *overrides])
    return build_config(data)


def default_budget(depth: int, keep: float) -> Budget:
    """The default's bottom blocks frozen on every token, the others trained keeping ``keep``."""
    trained_k = default_k_trained(depth, "last")
    trained = tuple(b >= depth - trained_k for b in range(depth))
    ratios = tuple(keep if t else 1.0 for t in trained)
    return Budget(ratios, trained, budgets=ratios, train_embeddings=False)


def run_budget(run_dir: Path, step: int, depth: int) -> tuple[Budget, tuple[int, ...]]:
    """The budget step ``step`` of a run took (its ``metrics.jsonl`` record with that ``step``), with
    the run's token floor and rounding, and the tokens it kept."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    matches = [r for r in records if r.get("step") == step]
    if not matches:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no step {step}")
    rec, cfg = matches[0], read_yaml(run_dir / "config.yaml")
    trained = set(rec["trained_blocks"])
    budget = Budget(tuple(rec["keep_ratios"]), tuple(b in trained for b in range(depth)),
                    min_tokens=int(cfg["policy"]["min_tokens"]),
                    token_multiple=int(cfg["backend"].get("token_multiple") or 1),
                    budgets=tuple(rec.get("budgets") or rec["keep_ratios"]),
                    train_embeddings=bool(rec.get("embeddings_trained", True)))
    return budget, tuple(rec["kept_tokens"])


def profiled_steps(rt, x, y, budget, warmup: int, steps: int) -> tuple[OpTimes, list[float]]:
    """``warmup`` untimed steps, then ``steps`` under ``torch.profiler``: the self time of every
    torch op they ran, and each step's seconds."""
    numbers = iter(STEP_NUMBERS)
    for _ in range(warmup):
        rt.train_step(x, y, budget, 1e-4, next(numbers))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_s = [rt.train_step(x, y, budget, 1e-4, next(numbers)).step_time_s for _ in range(steps)]
    ops = OpTimes(steps)
    ops.add_torch(prof)
    return ops, step_s


def profile_ort(rt, x, y, budget, warmup: int, steps: int, trace_dir: Path) -> tuple[OpTimes, list[float]]:
    """:func:`profiled_steps` on the ort runtime (its torch ops: the AdamW update on ORT's buffers),
    plus the kernel times from ONNX Runtime's profile of the same steps (one artifact set)."""
    ops, step_s = profiled_steps(rt, x, y, budget, warmup, steps)
    for ts in list(rt.cache._live.values()):  # ORT writes the profile when a session ends
        ts.module = None
        ts.state = None
    rt.cache._live.clear()
    gc.collect()
    runs = 0
    for path in sorted(trace_dir.glob("ort_profile*.json")):
        events = json.loads(path.read_text())
        starts = sorted(ev["ts"] for ev in events if ev.get("name") == "model_run")
        runs += len(starts)
        cutoff = starts[warmup] if len(starts) > warmup else float("inf")  # the warm-up steps' runs come first
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] >= cutoff:
                ops.add(ev["args"].get("op_name", "?"), ev["dur"] / 1e3, 1)
    if runs != warmup + steps:
        raise SystemExit(f"expected {warmup + steps} profiled ONNX Runtime runs in one session, found {runs}")
    return ops, step_s


def matmul_times(model, tokens_per_block: list[int], batch: int, reps: int = 10) -> list[dict]:
    """A forward matrix product of each distinct linear shape, ORT (MLAS) against torch, on torch's
    thread count."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    blk = model.blocks[-1]
    shapes = {(batch * n, lin.in_features, lin.out_features)
              for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2) for n in set(tokens_per_block)}
    rows = []
    for m, k, n in sorted(shapes):
        a, b = torch.randn(m, k), torch.randn(k, n)
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
                                   helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        model_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)]).SerializeToString()
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        feed = {"a": a.numpy(), "b": b.numpy()}
        ms = {}
        for side, fn in (("torch", functools.partial(torch.matmul, a, b)),
                         ("ort", functools.partial(sess.run, None, feed))):
            fn(), fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            ms[side] = (time.perf_counter() - t0) / reps * 1e3
        rows.append({"m": m, "k": k, "n": n, "torch_ms": ms["torch"], "ort_ms": ms["ort"],
                     "ort_over_torch": ms["ort"] / ms["torch"]})
        print(f"  matmul [{m} x {k}] @ [{k} x {n}]: torch {ms['torch']:7.2f} ms, ort {ms['ort']:7.2f} ms, "
              f"ort/torch {ms['ort'] / ms['torch']:.2f}", flush=True)
    return rows


def profile_both(args, model, budget, x, y, threads: int):
    """Both runtimes' profiles (ORT's profiler switched on for this call only) and the tokens kept."""
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
        ort_rt = create_runtime(runtime_config("ort", args.model, threads, args.overrides), copy.deepcopy(model))
        torch_rt = create_runtime(runtime_config("torch", args.model, threads, args.overrides), copy.deepcopy(model))
        torch_prof = profiled_steps(torch_rt, x, y, budget, args.warmup, args.steps)
        kept = torch_rt.train_step(x, y, budget, 1e-4, STEP_NUMBERS[args.warmup + args.steps]).kept_tokens
        ort_prof = profile_ort(ort_rt, x, y, budget, args.warmup, args.steps, trace_dir)
    finally:
        artifacts.ArtifactCache._session_options = make_options
        shutil.rmtree(trace_dir, ignore_errors=True)
    return torch_prof, ort_prof, list(kept)


def report(torch_ops: OpTimes, ort_ops: OpTimes) -> list[dict]:
    """Print and return the per-family rows (ms and calls per step, both runtimes)."""
    torch_families, ort_families = torch_ops.by_family(), ort_ops.by_family()
    print(f"{'family':34s} {'torch ms':>9s} {'calls':>6s} {'ort ms':>9s} {'calls':>6s} {'ort-torch':>10s}")
    rows = []
    for fam in torch_families:
        t, o = torch_families[fam], ort_families[fam]
        rows.append({"family": fam, "torch_ms": t["ms"], "torch_calls": t["calls"], "ort_ms": o["ms"],
                     "ort_calls": o["calls"]})
        print(f"{fam:34s} {t['ms']:9.2f} {t['calls']:6.0f} {o['ms']:9.2f} {o['calls']:6.0f} "
              f"{o['ms'] - t['ms']:+10.2f}")
    torch_ms, ort_ms = sum(r["torch_ms"] for r in rows), sum(r["ort_ms"] for r in rows)
    print(f"{'total (op self / kernel time)':34s} {torch_ms:9.2f} {'':6s} {ort_ms:9.2f} {'':6s} "
          f"{ort_ms - torch_ms:+10.2f}")
    return rows


def versions() -> dict[str, str]:
    import onnxruntime

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "commit": commit,
            "machine": platform.platform()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alast_demo_vit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.85, help="keep ratio of each trained block")
    ap.add_argument("--classes", type=int, default=25)
    ap.add_argument("--from-run", type=Path, default=None, metavar="RUN_DIR",
                    help="the budget of one of this run's steps (--step) instead of --keep")
    ap.add_argument("--step", type=int, default=199, help="with --from-run: the step's number in metrics.jsonl")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gemm", action="store_true", help="also time the linear layers' matrix products alone")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("ort_profile.json"))
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the first step sets up each runtime)")
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    model = create_model(args.model, args.classes, pretrained=False)
    depth = len(model.blocks)
    budget, run_kept = (default_budget(depth, args.keep), None) if args.from_run is None else \
        run_budget(args.from_run, args.step, depth)
    img = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, img[0], img[1], generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)

    (torch_ops, torch_step_s), (ort_ops, ort_step_s), kept = profile_both(args, model, budget, x, y, threads)
    if run_kept is not None and tuple(kept) != run_kept:
        raise SystemExit(f"the torch runtime kept {kept} tokens where the run kept {list(run_kept)}")
    torch_median, ort_median = statistics.median(torch_step_s), statistics.median(ort_step_s)
    print(f"{args.model}, batch {args.batch_size}, {threads} thread(s), trained blocks "
          f"{[b for b, t in enumerate(budget.trained) if t]}, tokens kept per block {kept}")
    print(f"median step (profilers on): torch {torch_median * 1e3:.1f} ms, ort {ort_median * 1e3:.1f} ms "
          f"(ort/torch {ort_median / torch_median:.2f})")
    rows = report(torch_ops, ort_ops)
    command = ["python benchmarks/ort_profile.py", *(sys.argv[1:] if argv is None else argv)]
    out = {"command": " ".join(command), **versions(), "model": args.model, "batch_size": args.batch_size,
           "threads": threads, "keep": None if args.from_run else args.keep,
           "from_run": None if args.from_run is None else {"run_dir": str(args.from_run), "step": args.step},
           "trained": list(budget.trained), "kept_tokens": kept,
           "median_step_ms": {"torch": torch_median * 1e3, "ort": ort_median * 1e3}, "families": rows,
           "torch_ops": torch_ops.per_step(), "ort_ops": ort_ops.per_step()}
    if args.gemm:
        prefix = int(model.num_prefix_tokens)
        tokens = [int(model.patch_embed.num_patches) + prefix] + [k + prefix for k in kept]
        out["gemm"] = matmul_times(model, tokens, args.batch_size)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
