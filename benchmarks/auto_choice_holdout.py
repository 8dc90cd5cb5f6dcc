"""How optimistic is ``policy.eval_tokens: auto``? Choose on one half of the validation data, score on the other.

``auto`` deploys whichever of the token schedule and every token is more accurate on the validation
data, and reports that accuracy: the better of two measurements on the same images. For each run
given, this script splits the validation images in two halves (even and odd positions), chooses the
candidate on one half (the schedule on a tie, as ``auto`` does), scores it on the other, both ways
round, and prints the mean of the two held-out scores next to ``auto``'s figure.

    python benchmarks/auto_choice_holdout.py bench/digits_auto/runs/alast-t0.5-seed0 ... --out holdout.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alast.data import eval_batches  # noqa: E402
from alast.export import load_run, run_val_data  # noqa: E402
from runtimes.token_schedule import token_schedule  # noqa: E402


def correct(run, kept) -> torch.Tensor:
    """Per validation image, whether the run's model (on ``kept``, None: every token) is right."""
    out = []
    with torch.no_grad(), token_schedule(run.model, kept, run.fuse_tokens, run.token_score):
        for images, labels in eval_batches(run_val_data(run), run.config.train.eval_batch_size):
            out.append(run.model(images).argmax(-1) == labels)
    return torch.cat(out).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with a token schedule")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        kept = run.summary.get("token_schedule")
        if not kept:
            sys.exit(f"{run_dir} has no token schedule (a run that dropped tokens, eval_tokens auto or trained)")
        on_schedule, every = correct(run, kept), correct(run, None)
        halves = [torch.arange(len(every)) % 2 == h for h in (0, 1)]
        held_out = []
        for choose, score in (halves, halves[::-1]):
            pick = on_schedule if on_schedule[choose].mean() >= every[choose].mean() else every
            held_out.append(float(pick[score].mean()))
        row = {"run": str(run_dir), "auto": max(float(on_schedule.mean()), float(every.mean())),
               "schedule": float(on_schedule.mean()), "every_token": float(every.mean()),
               "held_out_choice": statistics.mean(held_out)}
        rows.append(row)
        print(f"{run_dir}: auto {100 * row['auto']:.2f}%, chosen on one half and scored on the other "
              f"{100 * row['held_out_choice']:.2f}% (schedule {100 * row['schedule']:.2f}%, every token "
              f"{100 * row['every_token']:.2f}%)")
    gap = [100 * (r["auto"] - r["held_out_choice"]) for r in rows]
    print(f"auto minus held-out choice: mean {statistics.mean(gap):+.2f} points, max {max(gap):+.2f} "
          f"({len(rows)} runs)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
