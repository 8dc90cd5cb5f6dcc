"""`alast bench`: several policies on the same data, model, seeds and steps, one table.

Runs alternate: seed s runs the policies in an order rotated by s, so a machine that drifts
(thermal, a noisy neighbour) does not favour the policy that always runs first.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alast.config import AlastConfig, build_config
from alast.training.loop import Hooks, train

COST_KEYS = ("train_flops", "peak_memory_bytes", "wall_time_s", "median_step_time_s", "train_time_s")
TARGET_POLICIES = ("alast", "alast+lora", "tokens")


@dataclass
class BenchPlan:
    base: AlastConfig
    policies: list[str]
    seeds: list[int]
    out: Path
    target_flops: float | None = None
    target_policies: tuple[str, ...] = TARGET_POLICIES
    runs: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "full" not in self.policies:
            raise ValueError("bench needs 'full' among --policies: every cost is reported as a ratio to it")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("--policies lists a policy twice")
        for i, seed in enumerate(self.seeds):
            k = i % len(self.policies)
            for policy in self.policies[k:] + self.policies[:k]:
                self.runs.append((policy, seed))


def policy_config(base: AlastConfig, policy: str, seed: int, run_dir: Path, target: float | None) -> AlastConfig:
    data = base.model_dump(mode="json")
    data["policy"]["name"] = policy
    data["policy"]["target_flops"] = target
    if policy in ("lora", "alast+lora") and data["policy"].get("lora") is None:
        data["policy"]["lora"] = {}
    if policy not in ("lora", "alast+lora"):
        data["policy"]["lora"] = None
    data["train"]["seed"] = seed
    data["output"]["dir"] = str(run_dir)
    data["output"]["force"] = False
    return build_config(data)


def run_bench(plan: BenchPlan, on_run: Callable[[int, int, str, int], Hooks] | None = None,
              solve_target: Callable[[AlastConfig], tuple[dict[str, Any], dict[str, Any]]] | None = None
              ) -> dict[str, Any]:
    plan.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for i, (policy, seed) in enumerate(plan.runs):
        run_dir = plan.out / "runs" / f"{policy.replace('+', '-')}-seed{seed}"
        target = plan.target_flops if policy in plan.target_policies else None
        cfg = policy_config(plan.base, policy, seed, run_dir, target)
        overrides, info = (None, None)
        if target is not None:
            if solve_target is None:
                raise ValueError("a FLOPs target needs the planner (alast.planning.plan)")
            overrides, info = solve_target(cfg)
        _release_memory()  # the previous run's model must not count towards this run's peak
        hooks = on_run(i, len(plan.runs), policy, seed) if on_run else None
        summary = train(cfg, run_dir, hooks=hooks, planner_overrides=overrides, plan_info=info)
        summary["seed"] = seed
        summary["run_dir"] = str(run_dir)
        results.append(summary)
        (plan.out / "raw.jsonl").open("a").write(json.dumps(summary) + "\n")
    table = aggregate(results, plan.policies)
    write_outputs(plan, results, table)
    return table


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict[str, Any]], policies: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"policies": {}}
    for policy in policies:
        rs = [r for r in results if r["policy"] == policy]
        acc_mean, acc_std = _mean_std([r["val_accuracy"] for r in rs])
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "val_accuracy": acc_mean,
                                 "val_accuracy_std": acc_std}
        for key in COST_KEYS:
            entry[key], _ = _mean_std([r.get(key) for r in rs])
        entry["full_ft_train_flops"], _ = _mean_std([r.get("full_ft_train_flops") for r in rs])
        entry["plan"] = rs[0].get("plan") if rs else None
        out["policies"][policy] = entry
    full = out["policies"]["full"]
    for policy, e in out["policies"].items():
        for key in COST_KEYS:
            e[f"{key}_ratio"] = (e[key] / full[key]) if e.get(key) and full.get(key) else None
        e["accuracy_delta_vs_full"] = (e["val_accuracy"] - full["val_accuracy"]) if full["val_accuracy"] is not None else None
        e["speedup_vs_full"] = (full["median_step_time_s"] / e["median_step_time_s"]) if e.get("median_step_time_s") else None
        fr = e.get("train_flops_ratio")
        e["speedup_share_of_flop_bound"] = (e["speedup_vs_full"] / (1 / fr)) if fr and e["speedup_vs_full"] else None
    first = results[0] if results else {}
    out["setting"] = {k: first.get(k) for k in ("model", "data", "backend", "steps", "batch_size", "device")}
    return out


_FORMATS: dict[str, Callable[[Any], str]] = {
    "acc": lambda v: f"{100 * v:.2f}", "ratio": lambda v: f"{v:.3f}", "flops": lambda v: f"{v / 1e12:.3f}",
    "bytes": lambda v: f"{v / 2**20:.1f}", "s": lambda v: f"{v:.2f}", "ms": lambda v: f"{1000 * v:.1f}",
}


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "n/a"
    return _FORMATS.get(kind, str)(v)


COLUMNS = [
    ("policy", None, None), ("acc %", "val_accuracy", "acc"), ("± std", "val_accuracy_std", "acc"),
    ("TFLOPs", "train_flops", "flops"), ("FLOPs/full", "train_flops_ratio", "ratio"),
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
            f"batch {s['batch_size']}, device `{s['device']}`. Accuracy: mean (± std) over seeds; costs: mean.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def write_outputs(plan: BenchPlan, results: list[dict[str, Any]], table: dict[str, Any]) -> None:
    out = plan.out
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(table))
    _plots(out, results, plan.policies)


def _plots(out: Path, results: list[dict[str, Any]], policies: list[str]) -> None:
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for policy in policies:
        rs = [r for r in results if r["policy"] == policy and r.get("train_flops")]
        if rs:
            ax.scatter([r["train_flops"] / 1e12 for r in rs], [100 * r["val_accuracy"] for r in rs], label=policy)
    ax.set_xlabel("training TFLOPs (counted)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    per_policy = []
    for policy in policies:
        times = []
        for r in results:
            if r["policy"] == policy:
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
        if r["policy"].startswith("alast") and r.get("run_dir"):
            src = Path(r["run_dir"]) / "budgets.png"
            if src.exists():
                shutil.copy(src, out / f"budgets_{r['policy'].replace('+', '-')}.png")
