"""Cost of the ALaST machinery, and alast vs full, per training step on real architectures.

Times, alternating in rounds (medians):
  plain  - the unpatched timm model, full fine-tuning step
  patched- the patched model at full budget (CLS deltas recorded, no dropping): the overhead
  full   - TorchRuntime with the `full` policy (what `alast train --policy full` runs)
  alast  - TorchRuntime with the `alast` policy: with --target-flops, as `alast train --target-flops`
           runs it (today's defaults, the knobs and cost model the target solver gives), otherwise
           the planner's own defaults updated by --policy-kw
and counts each one's FLOPs with torch.utils.flop_counter, and peak memory (CUDA allocator or
MemTracker on CPU). Writes JSON to --out.

With --target-flops the alast run has sparse steps and, where a dense final phase is set (``--set
policy.dense_final_frac=0.3``; none by default), dense ones in the last policy.dense_final_frac of
the steps; both are timed (``alast`` and ``alast_dense``) and ``run_*`` combine them by the phase's
share: what a whole run of that many steps costs.

  python benchmarks/overhead.py --model vit_base_patch16_224 --batch-size 8 --rounds 5 --target-flops 0.4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alast.config import AlastConfig, ConfigError, apply_overrides, build_config  # noqa: E402
from alast.models import create_model  # noqa: E402
from alast.planning.plan import solve_target  # noqa: E402
from alast.training.build import build_planner  # noqa: E402
from planners import Observation, create_planner  # noqa: E402
from planners.rules import dense_final_share  # noqa: E402
from runtimes.torch_backend.flops import counter  # noqa: E402
from runtimes.torch_backend.runtime import TorchRuntime  # noqa: E402

# the runtime and planner each timed step uses: alast_dense is the alast run at the end of its steps
RUNTIME_OF = {"full": "full", "alast": "alast", "alast_dense": "alast"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--policy-kw", default="{}", help="JSON options for the alast planner (without --target-flops)")
    ap.add_argument("--target-flops", type=float, default=None,
                    help="run alast as `alast train --target-flops T` does, at today's defaults")
    ap.add_argument("--steps", type=int, default=150, help="with --target-flops: the run length the solver plans for")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --target-flops: config override, as in alast train (e.g. policy.dense_final_frac=0.3)")
    ap.add_argument("--out", type=Path, default=Path("overhead.json"))
    return ap.parse_args(argv)


class Bench:
    """One batch, and the steps timed on it: the plain timm model's, and the runtimes' (``full`` and
    ``alast``, each with its planner)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dev = torch.device(args.device)
        torch.manual_seed(0)
        self.model_name = args.model
        size = self.fresh().patch_embed.img_size
        self.x = torch.randn(args.batch_size, 3, *size, device=self.dev)
        self.y = torch.randint(0, 10, (args.batch_size,), device=self.dev)
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.precision == "bf16" else None
        self.plain = self.fresh()
        self.opt = torch.optim.AdamW(self.plain.parameters(), lr=1e-4)
        self.cfg, self.dense_share, alast_kw = alast_setup(args)
        self.runtimes, self.planners = {}, {}
        for name in ("full", "alast"):
            rt = TorchRuntime(self.fresh(), lr=1e-4, weight_decay=0.05, grad_clip=1.0, device=args.device,
                              precision=args.precision, count_flops="off", memory_probe_steps=lambda s: False,
                              freeze_embeddings=name == "alast" and self.cfg.policy.embeddings_frozen,
                              token_select=self.cfg.policy.token_select, token_score=self.cfg.policy.token_score)
            self.runtimes[name] = rt
            self.planners[name] = (create_planner(name, rt.num_blocks) if name == "full" else
                                   build_planner(self.cfg, rt.num_blocks, alast_kw))
        self.steps = {"full": 0, "alast": 0}
        self.progress = {"full": 0.0, "alast": 0.0, "alast_dense": 0.999}

    def fresh(self) -> torch.nn.Module:
        return create_model(self.model_name, 10).to(self.dev)

    def plain_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.amp:
            with self.amp():
                loss = F.cross_entropy(self.plain(self.x).float(), self.y)
        else:
            loss = F.cross_entropy(self.plain(self.x), self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.plain.parameters(), 1.0)
        self.opt.step()

    def rt_step(self, name: str) -> None:
        key = RUNTIME_OF[name]
        planner, rt = self.planners[key], self.runtimes[key]
        budget = planner.plan(self.steps[key], self.progress[name])
        r = rt.train_step(self.x, self.y, budget, 1e-4, self.steps[key])
        self.steps[key] += 1
        planner.observe(Observation(self.steps[key], self.progress[name], r.deltas))

    def patched_step(self) -> None:
        """The patched model at full budget: the ``full`` runtime's first step, again."""
        budget = self.planners["full"].plan(0, 0.0)
        self.runtimes["full"].train_step(self.x, self.y, budget, 1e-4, 0)

    def timed(self) -> dict[str, Callable[[], None]]:
        fns = {"plain": self.plain_step, "patched": self.patched_step, "full": lambda: self.rt_step("full"),
               "alast": lambda: self.rt_step("alast")}
        if self.dense_share:
            fns["alast_dense"] = lambda: self.rt_step("alast_dense")
        return fns

    def median_times(self, rounds: int) -> dict[str, float]:
        """Each timed step's median over ``rounds``, in alternating order, after two warm-up calls."""
        fns = self.timed()
        sync = (lambda: torch.cuda.synchronize()) if self.dev.type == "cuda" else (lambda: None)
        for fn in fns.values():
            fn(), fn()
        times = {k: [] for k in fns}
        for r in range(rounds):
            order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
            for k in order:
                sync()
                t = time.perf_counter()
                fns[k]()
                sync()
                times[k].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    def flops(self) -> dict[str, float]:
        """Each step's counted FLOPs (torch.utils.flop_counter)."""
        flops = {}
        for k in ("full", "alast", "alast_dense")[:3 if self.dense_share else 2]:
            key = RUNTIME_OF[k]
            self.runtimes[key].count_flops = "every"
            budget = self.planners[key].plan(self.steps[key], self.progress[k])
            flops[k] = self.runtimes[key].train_step(self.x, self.y, budget, 1e-4, self.steps[key]).train_flops
        with counter() as c:
            self.plain_step()
        flops["plain"] = c.get_total_flops()
        return flops

    def peak_memory(self) -> dict[str, int]:
        """Peak training memory of the full and alast steps: the CUDA allocator's, or MemTracker's on CPU."""
        mem = {}
        for k in ("full", "alast"):
            if self.dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                for _ in range(2):
                    self.rt_step(k)
                mem[k] = torch.cuda.max_memory_allocated()
            else:
                rt = self.runtimes[k]
                rt._probes.probe = lambda s: True
                rt._peak_bytes = None
                self.rt_step(k)
                mem[k] = rt.peak_memory_bytes()
        return mem


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    med = bench.median_times(args.rounds)
    flops = bench.flops()
    result = {
        "model": args.model, "batch_size": args.batch_size, "device": str(bench.dev), "precision": args.precision,
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "median_step_s": med, "overhead_patched_vs_plain": med["patched"] / med["plain"] - 1,
        "flops": flops, "flops_ratio_alast_vs_full": flops["alast"] / flops["full"],
        "speedup_alast_vs_full": med["full"] / med["alast"],
    }
    if bench.cfg.policy.target_flops is not None:
        share = bench.dense_share
        run_s = (1 - share) * med["alast"] + share * med.get("alast_dense", 0.0)
        run_flops = (1 - share) * flops["alast"] + share * flops.get("alast_dense", 0.0)
        result.update(target_flops=bench.cfg.policy.target_flops, steps=args.steps, dense_final_share=share,
                      run_step_s_alast=run_s, run_flops_ratio_alast_vs_full=run_flops / flops["full"],
                      run_speedup_alast_vs_full=med["full"] / run_s,
                      run_share_of_flop_bound=(med["full"] / run_s) / (flops["full"] / run_flops))
    mem = bench.peak_memory()
    result["peak_memory_bytes"] = mem
    result["memory_ratio_alast_vs_full"] = mem["alast"] / mem["full"]
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def alast_setup(args) -> tuple[AlastConfig, float, dict]:
    """The alast policy's config, the dense final phase's share of a run, and the planner overrides:
    with --target-flops, the solver's knobs and cost model (as `alast train` uses them)."""
    if args.target_flops is None:
        if args.set:
            raise SystemExit("--set applies with --target-flops; without one, give the planner's options as --policy-kw")
        cfg = AlastConfig.model_validate({"model": {"name": args.model},
                                          "policy": {"dense_final_frac": 0.0, "early_frac": 0.0}})
        return cfg, 0.0, json.loads(args.policy_kw)
    # the timed sparse steps are the ones after the early phase (policy.early_frac: off here)
    try:
        cfg = build_config(apply_overrides({"model": {"name": args.model},
                                            "policy": {"target_flops": args.target_flops, "early_frac": 0.0},
                                            "train": {"steps": args.steps, "batch_size": args.batch_size},
                                            "backend": {"device": args.device, "precision": args.precision}}, args.set))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    if cfg.policy.early_frac:
        raise SystemExit("policy.early_frac is off here (the timed sparse steps are those after it); drop that --set")
    knobs, _ = solve_target(cfg)
    return cfg, dense_final_share(cfg.policy.dense_final_frac, args.steps), knobs


if __name__ == "__main__":
    main()
