"""Train-step time of the torch and ort backends on the same model, data and budgets, alternating.

For each model and budget, both runtimes take one untimed warm-up step (for ort this exports the
graph and generates the artifact set, whose costs are reported separately), then ``--rounds``
timed steps each, alternating which backend goes first. Medians and the ort/torch ratio are
printed and written as JSON. FLOP counting is off in both (the torch backend's counter slows its
own steps); each runtime's ``step_time_s`` is used, which for ort includes the weight copy when the
trained-block set changes.

  OMP_NUM_THREADS=1 python benchmarks/ort_speed.py --models alast_demo_vit,vit_base_patch16_224 \
      --batch-size 8 --rounds 5 --out ort_speed.json

``--replay RUN_DIR`` times the steps a run took instead: each step's budget from its
``metrics.jsonl`` (keep ratios, trained blocks, embeddings), on runtimes built from its
``config.yaml`` (policy and backend settings; FLOP counting off; torch's thread count, which
``OMP_NUM_THREADS`` sets, for both), at its batch size, both runtimes
per step, alternating which goes first. Its first steps (the ort artifact sets' export and
generation) are reported apart:

  python benchmarks/ort_speed.py --replay RUN_DIR --out ort_replay.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from alast.models import create_model  # noqa: E402
from planners import Budget  # noqa: E402
from planners.rules import default_k_trained, sample_without_replacement, softmax, step_rng  # noqa: E402
from runtimes.ort_backend.runtime import OrtRuntime  # noqa: E402
from runtimes.torch_backend.runtime import TorchRuntime  # noqa: E402


def budgets(depth: int) -> dict[str, Budget]:
    """`full`, and the ALaST starting point (b = 0.9 everywhere, K of L blocks sampled)."""
    k = default_k_trained(depth)
    trained = set(sample_without_replacement(softmax([0.9] * depth), k, step_rng(0, 0)))
    return {"full": Budget((1.0,) * depth, (True,) * depth),
            "alast_b0.9": Budget((0.9,) * depth, tuple(i in trained for i in range(depth)), budgets=(0.9,) * depth)}


def bench_model(name: str, batch: int, rounds: int, threads: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 10)
    kw = dict(lr=1e-4, weight_decay=0.05, grad_clip=1.0, count_flops="off")
    runtimes = {"torch": TorchRuntime(copy.deepcopy(model), device="cpu", **kw),
                "ort": OrtRuntime(copy.deepcopy(model), device="cpu", threads=threads, **kw)}
    img = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img[0], img[1], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out: dict = {"model": name, "batch_size": batch, "params": sum(p.numel() for p in model.parameters()),
                 "budgets": {}}
    step = 0
    for bname, budget in budgets(len(model.blocks)).items():
        warm = {}
        for rname, rt in runtimes.items():
            t0 = time.perf_counter()
            rt.train_step(x, y, budget, 1e-4, step)
            warm[rname] = time.perf_counter() - t0
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for r in range(rounds):
            step += 1
            for rname in (("torch", "ort") if r % 2 == 0 else ("ort", "torch")):
                times[rname].append(runtimes[rname].train_step(x, y, budget, 1e-4, step).step_time_s)
        med = {k: statistics.median(v) for k, v in times.items()}
        out["budgets"][bname] = {"median_step_s": med, "ort_over_torch": med["ort"] / med["torch"],
                                 "steps_s": times, "first_step_s": warm}
        print(f"{name} b={batch} {bname:>11}: torch {med['torch'] * 1e3:8.1f} ms  ort {med['ort'] * 1e3:8.1f} ms"
              f"  ort/torch {med['ort'] / med['torch']:.3f}  (first step: torch {warm['torch']:.2f} s, "
              f"ort {warm['ort']:.2f} s)", flush=True)
    out["ort_artifacts"] = runtimes["ort"].artifact_stats
    return out


def replay(run_dir: Path, warmup: int, threads: int) -> dict:
    """Both runtimes through the budgets of the run in ``run_dir``, step by step, on ``threads``
    threads each (the run's own setting is not used: set the count with ``OMP_NUM_THREADS``)."""
    from alast.config import build_config, read_yaml
    from alast.training.build import create_runtime

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    data = read_yaml(run_dir / "config.yaml")
    data["backend"].update(count_flops="off", device="cpu", threads=threads)
    summary = run_dir / "summary.json"
    classes = json.loads(summary.read_text())["num_classes"] if summary.exists() else 10
    torch.manual_seed(0)  # the run's architecture, fresh weights (they do not change step time)
    model = create_model(data["model"]["name"], classes, pretrained=False, img_size=data["model"].get("img_size"),
                         drop_path_rate=float(data["model"].get("drop_path_rate") or 0.0))
    runtimes = {}
    for name in ("torch", "ort"):
        cfg = build_config({**data, "backend": {**data["backend"], "name": name}})
        runtimes[name] = create_runtime(cfg, copy.deepcopy(model))
    depth, batch = len(model.blocks), int(data["train"]["batch_size"])
    img = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img[0], img[1], generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    for i, rec in enumerate(records):
        trained = set(rec["trained_blocks"])
        budget = Budget(tuple(rec["keep_ratios"]), tuple(b in trained for b in range(depth)),
                        min_tokens=int(data["policy"]["min_tokens"]),
                        train_embeddings=bool(rec.get("embeddings_trained", True)))
        for name in (("torch", "ort") if i % 2 == 0 else ("ort", "torch")):
            res = runtimes[name].train_step(x, y, budget, 1e-4, i)
            assert res.kept_tokens == tuple(rec["kept_tokens"]), (name, i, res.kept_tokens, rec["kept_tokens"])
            times[name].append(res.step_time_s)
    timed = {k: v[warmup:] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in timed.items()}
    total = {k: sum(v) for k, v in timed.items()}
    print(f"{run_dir}: {len(records)} steps of {data['model']['name']} at batch {batch}; after {warmup} warm-up "
          f"steps: median torch {med['torch'] * 1e3:.1f} ms, ort {med['ort'] * 1e3:.1f} ms "
          f"(ort/torch {med['ort'] / med['torch']:.3f}); total {total['torch']:.2f} s against {total['ort']:.2f} s "
          f"({total['ort'] / total['torch']:.3f}); first {warmup} steps: torch {sum(times['torch'][:warmup]):.2f} s, "
          f"ort {sum(times['ort'][:warmup]):.2f} s", flush=True)
    return {"run_dir": str(run_dir), "model": data["model"]["name"], "batch_size": batch, "steps": len(records),
            "warmup_steps": warmup, "median_step_s": med, "ort_over_torch": med["ort"] / med["torch"],
            "timed_total_s": total, "ort_over_torch_total": total["ort"] / total["torch"], "steps_s": times,
            "ort_artifacts": runtimes["ort"].artifact_stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="alast_demo_vit,vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--replay", type=Path, default=None, help="a run directory: time the budgets of its steps")
    ap.add_argument("--warmup", type=int, default=5, help="with --replay: first steps not in the medians")
    ap.add_argument("--out", type=Path, default=Path("ort_speed.json"))
    args = ap.parse_args()
    threads = torch.get_num_threads()
    import onnxruntime

    result = {"machine": platform.platform(), "processor": platform.processor(), "torch_threads": threads,
              "ort_intra_op_threads": threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "rounds": args.rounds, "models": []}
    if args.replay is not None:
        result = {k: v for k, v in result.items() if k not in ("rounds", "models")}
        result["replay"] = replay(args.replay, args.warmup, threads)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    for name in args.models.split(","):
        result["models"].append(bench_model(name.strip(), args.batch_size, args.rounds, threads))
        for k, v in result["models"][-1]["ort_artifacts"].items():
            if k.startswith("mean_") or k == "export_s":
                print(f"  ort {k}: {v}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
