"""What counting FLOPs costs a training run: steps run under the counter, and training-step time.

Runs one `alast train` command as separate processes, alternating in rounds: with FLOP counting
(`backend.count_flops=every`, the default), without it (`off`: the floor), and, with ``--base
DIR``, with counting in another checkout of this project (to compare code). Each run reports how
many of its steps ran under `torch.utils.flop_counter`, its training-step time (`train_time_s`)
and wall time, and its counted FLOPs (which every counting variant must agree on). Writes JSON.

  python benchmarks/flop_counting.py --rounds 2 --out flop_counting.json -- \\
      --model alast_vit12 --data shapes --steps 60 --target-flops 0.5 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Counts the steps a run counts (StepFlopCache.record is called once per counted step), then runs
# the CLI with the given arguments; the count goes to the file named by ALAST_BENCH_COUNTED.
DRIVER = """
import atexit, os, sys
from runtimes.torch_backend import flops
calls = [0]
record = flops.StepFlopCache.record
def counting(self, fc, keys):
    calls[0] += 1
    return record(self, fc, keys)
flops.StepFlopCache.record = counting
atexit.register(lambda: open(os.environ["ALAST_BENCH_COUNTED"], "w").write(str(calls[0])))
from alast_cli.main import main
sys.argv = ["alast", *sys.argv[1:]]
main()
"""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--base", type=Path, default=None, help="another checkout of this project to compare with")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        ap.error("give the `alast train` arguments after --")
    cut = argv.index("--")
    args = ap.parse_args(argv[:cut])
    if args.rounds < 1:
        ap.error("--rounds must be 1 or more")
    if args.base is not None and not (args.base / "runtimes" / "torch_backend" / "flops.py").is_file():
        ap.error(f"--base {args.base} is not a checkout of this project")
    if args.out is not None and args.out.exists():
        ap.error(f"--out {args.out} exists; name a new file")
    return args, argv[cut + 1:]


def run_once(train_args: list[str], code: Path, extra: list[str], work: Path, name: str) -> dict:
    out, counted = work / name, work / f"{name}.counted"
    env = {**os.environ, "PYTHONPATH": str(code), "ALAST_BENCH_COUNTED": str(counted)}
    cmd = [sys.executable, "-c", DRIVER, "train", *train_args, *extra, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"counted_steps": int(counted.read_text()), "train_time_s": summary["train_time_s"],
            "wall_time_s": summary["wall_time_s"], "train_flops": summary.get("train_flops"),
            "val_accuracy": summary.get("val_accuracy")}


def main(argv: list[str] | None = None) -> dict:
    args, train_args = parse_args(argv)
    variants = {"counting": (ROOT, [])}
    if args.base is not None:
        variants["counting (base)"] = (args.base.resolve(), [])
    variants["off"] = (ROOT, ["--set", "backend.count_flops=off"])
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for i, (name, (code, extra)) in enumerate(variants.items()):
                runs[name].append(run_once(train_args, code, extra, Path(tmp), f"r{rnd}v{i}"))
                r = runs[name][-1]
                print(f"round {rnd} {name}: {r['counted_steps']} counted steps, training steps "
                      f"{r['train_time_s']:.1f} s, wall {r['wall_time_s']:.1f} s", flush=True)
    flops = {r["train_flops"] for k, rs in runs.items() if k != "off" for r in rs}
    if len(flops) != 1:
        raise SystemExit(f"the counting variants disagree on the counted FLOPs: {sorted(flops)}")
    rows = {k: {"counted_steps": rs[0]["counted_steps"],
                "train_time_s": statistics.median(r["train_time_s"] for r in rs),
                "wall_time_s": statistics.median(r["wall_time_s"] for r in rs)} for k, rs in runs.items()}
    floor = rows["off"]["train_time_s"]
    print(f"\n`alast train {' '.join(train_args)}`, medians of {args.rounds} round(s); counted FLOPs "
          f"{flops.pop():.4g} in every counting variant")
    print(f"{'variant':18} {'counted steps':>14} {'training steps':>15} {'over off':>9} {'wall':>8}")
    for k, r in rows.items():
        print(f"{k:18} {r['counted_steps']:>14} {r['train_time_s']:>13.1f} s {r['train_time_s'] / floor:>8.3f}x "
              f"{r['wall_time_s']:>6.1f} s")
    record = {"command": ["alast", "train", *train_args], "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "base": str(args.base) if args.base else None, "medians": rows, "runs": runs}
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
