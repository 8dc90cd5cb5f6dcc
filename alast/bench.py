"""`alast bench`: several policies on the same data, model, seeds and steps, one table.

Runs alternate: seed s runs the policies in an order rotated by s, so a machine that drifts
(thermal, a noisy neighbour) does not favour the policy that always runs first.

Beside the same-steps table: ``matched`` adds, right after each ALaST run, full fine-tuning for the
steps that cost the same counted FLOPs (row ``full@matched``); ``targets`` runs every policy at
several FLOPs targets and draws accuracy-versus-FLOPs curves (:mod:`alast.bench_curves`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alast.bench_runs import MATCHED, RunSpec, compare, curve_runs, judgement, matched_steps, mean_std, same_step_runs
from alast.config import AlastConfig, build_config, check_policy_name
from alast.training.loop import Hooks, train

COST_KEYS = ("train_flops", "peak_memory_bytes", "wall_time_s", "median_step_time_s", "train_time_s")
TARGET_POLICIES = ("alast", "alast+lora", "tokens")
Solver = Callable[[AlastConfig], tuple[dict[str, Any], dict[str, Any]]]


@dataclass
class BenchPlan:
    """What to run. ``target_flops``: one target for ``target_policies`` at the same steps;
    ``targets``: several, for curves (exclusive with ``target_flops``); ``matched``: a
    compute-matched full fine-tuning run after each ``alast`` run."""

    base: AlastConfig
    policies: list[str]
    seeds: list[int]
    out: Path
    target_flops: float | None = None
    target_policies: tuple[str, ...] = TARGET_POLICIES
    matched: bool = False
    targets: tuple[float, ...] | None = None
    base_steps: int | None = None
    runs: list[RunSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "full" not in self.policies:
            raise ValueError("bench needs 'full' among --policies: every cost is reported as a ratio to it")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("--policies lists a policy twice")
        for name in self.policies:
            check_policy_name(name, "--policies")
        if self.targets is not None and self.target_flops is not None:
            raise ValueError("give either --target-flops (one target) or --targets (curves), not both")
        if self.matched and "alast" not in self.policies:
            raise ValueError("--matched matches full fine-tuning to the alast run's FLOPs: add alast to --policies")
        if (self.matched or self.targets) and self.base.backend.count_flops == "off":
            raise ValueError("--matched and --targets compare counted FLOPs, but backend.count_flops is off; "
                             "drop --set backend.count_flops=off (or pass --no-matched)")
        if self.targets is None:
            self.runs = same_step_runs(self.policies, self.seeds, self.target_flops, self.target_policies)
            return
        if self.base_steps is None:
            self.base_steps = _planned_steps(self.base)
        self.runs = curve_runs(self.policies, self.seeds, tuple(self.targets), self.base_steps)

    @property
    def rows(self) -> list[str]:
        """Row names of the same-steps table."""
        return self.policies + ([MATCHED] if self.matched else [])


def _planned_steps(cfg: AlastConfig) -> int:
    from alast.planning.plan import planned_steps

    return planned_steps(cfg)


def policy_config(base: AlastConfig, policy: str, seed: int, run_dir: Path, target: float | None,
                  steps: int | None = None) -> AlastConfig:
    """``base`` set to ``policy`` (LoRA section added or dropped), ``seed``, ``run_dir``, the FLOPs
    target, and ``steps`` in place of the base's steps or epochs when given."""
    data = base.model_dump(mode="json")
    data["policy"]["name"] = policy
    data["policy"]["target_flops"] = target
    if policy in ("lora", "alast+lora") and data["policy"].get("lora") is None:
        data["policy"]["lora"] = {}
    if policy not in ("lora", "alast+lora"):
        data["policy"]["lora"] = None
    if steps is not None:
        data["train"]["steps"], data["train"]["epochs"] = int(steps), None
    data["train"]["seed"] = seed
    data["output"]["dir"] = str(run_dir)
    data["output"]["force"] = False
    return build_config(data)


def run_bench(plan: BenchPlan, on_run: Callable[[int, int, str, int], Hooks] | None = None,
              solve_target: Solver | None = None) -> dict[str, Any]:
    """Run ``plan`` (a ``full@matched`` run right after each alast run when ``plan.matched``); write
    ``raw.jsonl``, ``results.json``/``results.md`` and plots (``curves.json`` too over targets)
    under ``plan.out``; return what ``results.json`` holds."""
    if plan.targets is None and solve_target is not None:
        _solve_up_front(plan, solve_target)
    plan.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    total = len(plan.runs) + (sum(r.policy == "alast" for r in plan.runs) if plan.matched else 0)

    def execute(spec: RunSpec) -> dict[str, Any]:
        summary = _execute(plan, spec, len(results), total, on_run, solve_target)
        results.append(summary)
        with (plan.out / "raw.jsonl").open("a") as f:
            f.write(json.dumps(summary) + "\n")
        return summary

    for spec in plan.runs:
        summary = execute(spec)
        if plan.matched and spec.policy == "alast" and "skipped" not in summary:
            execute(RunSpec("full", spec.seed, spec.target, MATCHED, matched_steps(summary)))
    if plan.targets is not None:
        from alast.bench_curves import write_curve_outputs

        return write_curve_outputs(plan.out, results, plan.targets, plan.base_steps)
    table = aggregate(results, plan.rows)
    write_outputs(plan, results, table)
    return table


def _solve_up_front(plan: BenchPlan, solve_target: Solver) -> None:
    """Solve each policy's FLOPs target before the first run trains, so a target out of a policy's
    reach fails the bench at once, not after the runs before it (each run solves again once its
    data is loaded, from the cached cost model). As in a run, a batch the data cannot fill is
    refused first, before the solver profiles the model."""
    from alast.data import check_batch_size
    from alast.training.build import load_data

    solved: set[str] = set()
    for spec in plan.runs:
        if not spec.solve or spec.policy in solved:
            continue
        cfg = policy_config(plan.base, spec.policy, spec.seed, plan.out / "runs" / spec.dir_name(), spec.target,
                            spec.steps)
        if not solved:
            check_batch_size(len(load_data(cfg)[0].train), cfg.train.batch_size, 1)
        solve_target(cfg)
        solved.add(spec.policy)


def _execute(plan: BenchPlan, spec: RunSpec, index: int, total: int,
             on_run: Callable[[int, int, str, int], Hooks] | None, solve_target: Solver | None) -> dict[str, Any]:
    """Train one run (its knobs solved for its target first) and return its summary, annotated with
    seed, run dir, row label and target. Over several targets, a target out of the policy's reach
    returns a record with the solver's reason under ``skipped`` instead of failing the bench."""
    from planners.target import TargetError

    run_dir = plan.out / "runs" / spec.dir_name()
    cfg = policy_config(plan.base, spec.policy, spec.seed, run_dir, spec.target if spec.solve else None, spec.steps)
    solve = None
    if spec.solve:
        if solve_target is None:
            raise ValueError("a FLOPs target needs the planner (alast.planning.plan)")

        def solve() -> tuple[dict[str, Any], dict[str, Any]]:  # run by the loop once the data is loaded
            return solve_target(cfg)
    _release_memory()  # the previous run's model must not count towards this run's peak
    shown = spec.name + (f" at {spec.target:g}x" if spec.target is not None else "")
    hooks = on_run(index, total, shown, spec.seed) if on_run else None
    try:
        summary = train(cfg, run_dir, hooks=hooks, solve=solve)
    except TargetError as exc:  # raised by ``solve``, before the run directory is made
        if plan.targets is None:
            raise
        return {"policy": spec.policy, "label": spec.name, "seed": spec.seed, "target": spec.target,
                "skipped": str(exc).strip().splitlines()[0]}
    summary.update(seed=spec.seed, run_dir=str(run_dir), label=spec.name, target=spec.target)
    return summary


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _row(r: dict[str, Any]) -> str:
    return r.get("label") or r["policy"]


def aggregate(results: list[dict[str, Any]], policies: list[str]) -> dict[str, Any]:
    """One entry per row (policy, or label such as ``full@matched``): accuracy mean and std over
    seeds, mean costs and their ratios to ``full``; ``matched``: alast against ``full@matched``."""
    out: dict[str, Any] = {"policies": {}}
    for policy in policies:
        rs = [r for r in results if _row(r) == policy and "skipped" not in r]
        acc_mean, acc_std = mean_std([r["val_accuracy"] for r in rs])
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "val_accuracy": acc_mean,
                                 "val_accuracy_std": acc_std}
        # the same models on their token schedule and on every token; the deployed model's inference FLOPs
        for key in ("val_accuracy_token_schedule", "val_accuracy_all_tokens"):
            entry[key], _ = mean_std([r.get(key) for r in rs])
        entry["inference_flops_ratio"], _ = mean_std([r.get("inference_flops_ratio") or 1.0 for r in rs])
        for key in COST_KEYS + ("full_ft_train_flops", "steps"):
            entry[key], _ = mean_std([r.get(key) for r in rs])
        entry["plan"] = rs[0].get("plan") if rs else None
        out["policies"][policy] = entry
    full = out["policies"]["full"]
    for policy, e in out["policies"].items():
        for key in COST_KEYS:
            e[f"{key}_ratio"] = (e[key] / full[key]) if e.get(key) and full.get(key) else None
        e["accuracy_delta_vs_full"] = (e["val_accuracy"] - full["val_accuracy"]
                                       if full["val_accuracy"] is not None and e["val_accuracy"] is not None else None)
        e["speedup_vs_full"] = (full["median_step_time_s"] / e["median_step_time_s"]) if e.get("median_step_time_s") else None
        fr = e.get("train_flops_ratio")
        e["speedup_share_of_flop_bound"] = (e["speedup_vs_full"] / (1 / fr)) if fr and e["speedup_vs_full"] else None
    out["matched"] = _matched_comparison(results) if MATCHED in policies else None
    out["same_steps"] = _same_steps_comparison(results, out["policies"]) if "alast" in policies else None
    first = next((r for r in results if _row(r) != MATCHED and "skipped" not in r), {})
    out["setting"] = {k: first.get(k) for k in ("model", "data", "backend", "steps", "batch_size", "device")}
    return out


def _matched_comparison(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """alast against full fine-tuning at the same counted FLOPs, with a one-line verdict."""
    a = [r["val_accuracy"] for r in results if _row(r) == "alast" and "skipped" not in r]
    b = [r["val_accuracy"] for r in results if _row(r) == MATCHED]
    if not a or not b:
        return None
    c = compare(a, b)
    c["line"] = (f"Compute-matched: alast {100 * c['a_mean']:.2f}% vs {MATCHED} {100 * c['b_mean']:.2f}% "
                 f"({c['diff'] * 100:+.2f} pts): alast is {judgement(c)}.")
    return c


def _same_steps_comparison(results: list[dict[str, Any]], rows: dict[str, Any]) -> dict[str, Any] | None:
    """alast against full fine-tuning with the same steps, at alast's counted FLOPs, with a one-line verdict."""
    a = [r["val_accuracy"] for r in results if _row(r) == "alast" and "skipped" not in r]
    b = [r["val_accuracy"] for r in results if _row(r) == "full" and "skipped" not in r]
    if not a or not b:
        return None
    c = compare(a, b)
    ratio = rows["alast"].get("train_flops_ratio")
    at = f", at {ratio:.3f}x full's counted FLOPs" if ratio else ""
    c["line"] = (f"Same steps: alast {100 * c['a_mean']:.2f}% vs full {100 * c['b_mean']:.2f}% "
                 f"({c['diff'] * 100:+.2f} pts{at}): alast is {judgement(c)}.")
    return c


_FORMATS: dict[str, Callable[[Any], str]] = {
    "acc": lambda v: f"{100 * v:.2f}", "ratio": lambda v: f"{v:.3f}", "flops": lambda v: f"{v / 1e12:.3f}",
    "bytes": lambda v: f"{v / 2**20:.1f}", "s": lambda v: f"{v:.2f}", "ms": lambda v: f"{1000 * v:.1f}",
    "int": lambda v: f"{v:g}",
}


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "n/a"
    return _FORMATS.get(kind, str)(v)


COLUMNS = [
    ("policy", None, None), ("steps", "steps", "int"), ("acc %", "val_accuracy", "acc"), ("± std", "val_accuracy_std", "acc"),
    ("acc schedule %", "val_accuracy_token_schedule", "acc"), ("acc all tokens %", "val_accuracy_all_tokens", "acc"),
    ("TFLOPs", "train_flops", "flops"), ("FLOPs/full", "train_flops_ratio", "ratio"),
    ("inference FLOPs", "inference_flops_ratio", "ratio"),
    ("peak MiB", "peak_memory_bytes", "bytes"), ("mem/full", "peak_memory_bytes_ratio", "ratio"),
    ("step ms", "median_step_time_s", "ms"), ("speed-up", "speedup_vs_full", "ratio"),
    ("wall s", "wall_time_s", "s"), ("wall/full", "wall_time_s_ratio", "ratio"),
]


def markdown_table(table: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for policy, e in table["policies"].items():
        cells = [policy] + [_fmt(e.get(key), kind) for _, key, kind in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    s = table["setting"]
    head = (f"Setting: model `{s['model']}`, data `{s['data']}`, backend `{s['backend']}`, {s['steps']} steps, "
            f"batch {s['batch_size']}, device `{s['device']}`. Accuracy: mean (± std) over seeds of the deployed "
            f"models (`policy.eval_tokens`), then the same models on their token schedule and on every token; "
            f"inference FLOPs: the deployed forward against every token's; costs: mean.")
    text = head + "\n\n" + "\n".join(lines) + "\n"
    if table.get("same_steps"):
        text += f"\n{table['same_steps']['line']}\n"
    if table.get("matched"):
        text += (f"\n`{MATCHED}`: full fine-tuning for fewer steps, as many as cost the alast run's counted FLOPs "
                 f"(same seed). {table['matched']['line']}\n")
    return text


def write_outputs(plan: BenchPlan, results: list[dict[str, Any]], table: dict[str, Any]) -> None:
    out = plan.out
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(table))
    _plots(out, [r for r in results if "skipped" not in r], plan.rows)


def _plots(out: Path, results: list[dict[str, Any]], policies: list[str]) -> None:
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for policy in policies:
        rs = [r for r in results if _row(r) == policy and r.get("train_flops")]
        if rs:
            ax.scatter([r["train_flops"] / 1e12 for r in rs], [100 * r["val_accuracy"] for r in rs], label=policy)
    ax.set_xlabel("training TFLOPs (counted)")
    ax.set_ylabel("validation accuracy (%)")
    if ax.collections:
        ax.legend()
    else:  # backend.count_flops=off: there is no x axis to plot against
        ax.text(0.5, 0.5, "FLOPs were not counted (backend.count_flops=off)", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    per_policy = []
    for policy in policies:
        times = []
        for r in results:
            if _row(r) == policy:
                metrics = Path(r["run_dir"]) / "metrics.jsonl" if r.get("run_dir") else None
                if metrics and metrics.exists():
                    times += [json.loads(l)["step_time_s"] * 1000 for l in metrics.read_text().splitlines()[1:]]
        per_policy.append(times or [0.0])
    ax.boxplot(per_policy, showfliers=False)
    ax.set_xticks(range(1, len(policies) + 1), policies, rotation=20)
    ax.set_ylabel("step time (ms)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)

    for r in results:
        if _row(r).startswith("alast") and r.get("run_dir"):
            src = Path(r["run_dir"]) / "budgets.png"
            if src.exists():
                shutil.copy(src, out / f"budgets_{r['policy'].replace('+', '-')}.png")
