"""Evaluate fine-tuned runs on another run's token schedule.

The question it answers: is a model fine-tuned with token dropping better, at the same inference
cost, than a fully fine-tuned model whose tokens are dropped only at inference? For each pair
``FULL_RUN:SCHEDULE_RUN`` it evaluates FULL_RUN's model on every token and on SCHEDULE_RUN's
token schedule (``token_schedule`` in its summary, deployed or not), and prints SCHEDULE_RUN's own
accuracy on it.

    python benchmarks/schedule_transfer.py \
        bench/digits_auto/runs/full-steps-t1-seed0:bench/digits_auto/runs/alast-t0.5-seed0 \
        ... --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alast.export import evaluate_model, load_run  # noqa: E402


def evaluate(run, kept) -> float:
    return evaluate_model(run, kept)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="FULL_RUN:SCHEDULE_RUN")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for pair in args.pairs:
        full_dir, sched_dir = pair.split(":")
        full, sched = load_run(Path(full_dir)), load_run(Path(sched_dir))
        s = sched.summary
        kept = s.get("token_schedule") or sched.kept_tokens  # the candidate, deployed or not
        if not kept:
            sys.exit(f"{sched_dir} has no token schedule")
        row = {"full_run": full_dir, "schedule_run": sched_dir, "kept_tokens": list(kept),
               "full_all_tokens": evaluate(full, None), "full_on_schedule": evaluate(full, kept),
               "schedule_run_accuracy": s.get("val_accuracy_token_schedule") or s["val_accuracy"],
               "inference_flops_ratio": (s.get("token_schedule_inference_flops_ratio")
                                         or s.get("inference_flops_ratio"))}
        rows.append(row)
        print(f"{full_dir}: every token {100 * row['full_all_tokens']:.2f}%, on {sched_dir}'s schedule {list(kept)} "
              f"{100 * row['full_on_schedule']:.2f}%; {sched_dir} itself {100 * row['schedule_run_accuracy']:.2f}%")
    for key in ("full_all_tokens", "full_on_schedule", "schedule_run_accuracy"):
        vals = [100 * r[key] for r in rows]
        spread = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        print(f"mean {key}: {statistics.mean(vals):.2f}{spread}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
