"""Accuracy versus counted FLOPs over several targets (``alast bench --targets``).

Each trained run is one record of ``curves.json``: counted training FLOPs, their ratio to full
fine-tuning at the bench's full step count (the x axis, the same reference for every run), accuracy,
wall time and steps. A target out of a policy's reach is a record with the solver's one-line reason
under ``skipped``. A point is the mean (± sample std) over seeds of one row at one target.

Per target, a verdict computed from the records: alast against full fine-tuning by steps (the
compute-matched reference), against ``full@matched`` where run, and against tokens: the mean
accuracy difference and whether it exceeds the pooled std of the two rows. A point whose counted
FLOPs ratio is more than 3% off its target (full fine-tuning by steps rounded to few steps, a
planner short of its target) is flagged in the table and the verdict, not called the same cost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alast.bench_runs import (
    BY_STEPS,
    MATCHED,
    compare,
    judgement,
    lr_markdown,
    mean_std,
    off_target,
    off_target_text,
)

CURVES = "curves.json"
COMPARED = (BY_STEPS, MATCHED, "tokens")  # what alast is judged against first, in this order; then every other row
RECORD_KEYS = ("steps", "train_flops", "val_accuracy", "val_accuracy_token_schedule", "val_accuracy_all_tokens",
               "inference_flops_ratio", "wall_time_s", "run_dir", "lr")


def curve_record(summary: dict[str, Any], base_steps: int) -> dict[str, Any]:
    """A run summary (or a skip) as a curves.json record; ``full_ref_train_flops`` is full fine-tuning
    at ``base_steps``, scaled from the run's own count of a full fine-tuning step."""
    rec = {"policy": summary.get("label") or summary["policy"], "target": summary.get("target"),
           "seed": summary["seed"]}
    if "skipped" in summary:
        return {**rec, "skipped": summary["skipped"]}
    rec.update({k: summary.get(k) for k in RECORD_KEYS})
    full, steps = summary.get("full_ft_train_flops"), summary.get("steps")
    ref = full * base_steps / steps if full and steps else None
    rec["full_ref_train_flops"] = ref
    rec["flops_ratio"] = rec["train_flops"] / ref if ref and rec["train_flops"] is not None else None
    return rec


def _trained(records: list[dict[str, Any]], policy: str, target: float | None) -> list[dict[str, Any]]:
    return [r for r in records if r["policy"] == policy and r["target"] == target and "skipped" not in r]


def points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (row, target) that trained: means and stds over seeds, in first-run order."""
    keys = list(dict.fromkeys((r["policy"], r["target"]) for r in records if "skipped" not in r))
    out = []
    for policy, target in keys:
        rs = _trained(records, policy, target)
        acc, acc_std = mean_std([r["val_accuracy"] for r in rs])
        every, _ = mean_std([r.get("val_accuracy_all_tokens") or r["val_accuracy"] for r in rs])
        sched, _ = mean_std([r.get("val_accuracy_token_schedule") for r in rs])
        ratio, ratio_std = mean_std([r["flops_ratio"] for r in rs])
        out.append({"policy": policy, "target": target, "seeds": [r["seed"] for r in rs],
                    "steps": mean_std([r["steps"] for r in rs])[0], "flops_ratio": ratio,
                    "flops_ratio_std": ratio_std, "off_target": off_target(ratio, target),
                    "val_accuracy": acc, "val_accuracy_std": acc_std,
                    "val_accuracy_token_schedule": sched, "val_accuracy_all_tokens": every,
                    "inference_flops_ratio": mean_std([r.get("inference_flops_ratio") or 1.0 for r in rs])[0],
                    "wall_time_s": mean_std([r["wall_time_s"] for r in rs])[0], "lr": rs[0].get("lr")})
    return out


def verdicts(records: list[dict[str, Any]], targets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per target: alast against each row that ran there, those of :data:`COMPARED` first, then the
    others (freeze, random, lora) in the order they ran; none if alast never ran."""
    if not any(r["policy"] == "alast" for r in records):
        return []
    out = []
    for t in targets:
        a = _trained(records, "alast", t)
        if not a:
            why = next((r["skipped"] for r in records if r["policy"] == "alast" and r["target"] == t
                        and "skipped" in r), "no alast run")
            out.append({"target": t, "alast": None, "comparisons": {}, "line": f"target {t:g}: no verdict: {why}"})
            continue
        ra = mean_std([r["flops_ratio"] for r in a])[0]
        comparisons, parts = {}, []
        others = [r["policy"] for r in records if r["target"] == t and r["policy"] not in (*COMPARED, "alast")]
        for name in (*COMPARED, *dict.fromkeys(others)):
            b = _trained(records, name, t)
            if not b:
                continue
            c = compare([r["val_accuracy"] for r in a], [r["val_accuracy"] for r in b])
            c["flops_ratio"] = mean_std([r["flops_ratio"] for r in b])[0]
            c["off_target"] = off_target(c["flops_ratio"], t)
            comparisons[name] = c
            parts.append(f"vs {name} {100 * c['b_mean']:.2f}% at {_x(c['flops_ratio'], c['off_target'])}: "
                         f"{100 * c['diff']:+.2f} pts, {judgement(c)}")
        acc = mean_std([r["val_accuracy"] for r in a])[0]
        off = off_target(ra, t)
        line = (f"target {t:g}: alast {100 * acc:.2f}% at {_x(ra, off)}; "
                + ("; ".join(parts) or "nothing to compare with"))
        out.append({"target": t, "alast": {"val_accuracy": acc, "flops_ratio": ra, "off_target": off, "n": len(a)},
                    "comparisons": comparisons, "line": line})
    return out


def _x(ratio: float | None, off: float | None = None) -> str:
    """``0.400x``, flagged ``0.400x (20.0% under the target: not the same cost)`` where ``off``."""
    if ratio is None:
        return "n/a"
    return f"{ratio:.3f}x" + (f" ({off_target_text(off)}: not the same cost)" if off is not None else "")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _table(pts: list[dict[str, Any]]) -> list[str]:
    lines = ["| policy | seeds | steps | FLOPs/full | acc % | ± std | acc schedule % | acc all tokens % | inference FLOPs "
             "| wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        wall = "n/a" if p["wall_time_s"] is None else f"{p['wall_time_s']:.2f}"
        ratio = _x(p["flops_ratio"], p.get("off_target"))
        lines.append(f"| {p['policy']} | {len(p['seeds'])} | {p['steps']:g} | {ratio} | "
                     f"{_pct(p['val_accuracy'])} | {_pct(p['val_accuracy_std'])} | "
                     f"{_pct(p.get('val_accuracy_token_schedule'))} | {_pct(p.get('val_accuracy_all_tokens'))} | "
                     f"{_x(p.get('inference_flops_ratio'))} | {wall} |")
    return lines


def markdown(setting: dict[str, Any], base_steps: int, targets: tuple[float, ...], pts: list[dict[str, Any]],
             records: list[dict[str, Any]], verdict_list: list[dict[str, Any]]) -> str:
    """results.md over several targets: a table per target, the reference rows, skips, verdicts."""
    s = setting
    text = [f"Setting: model `{s.get('model')}`, data `{s.get('data')}`, backend `{s.get('backend')}`, "
            f"batch {s.get('batch_size')}, device `{s.get('device')}`. FLOPs/full: counted training FLOPs over "
            f"full fine-tuning at {base_steps} steps. `{BY_STEPS}`: full fine-tuning for round({base_steps} x "
            f"target) steps. Accuracy: mean (± std) over seeds of the deployed models (`policy.eval_tokens`); acc "
            "schedule / all tokens: the same models on their token schedule / on every token; inference FLOPs: the "
            "deployed forward against every token's.", ""]
    for t in targets:
        text += [f"### Target {t:g}x", ""] + _table([p for p in pts if p["target"] == t]) + [""]
        skips = {r["policy"]: r["skipped"] for r in records if r["target"] == t and "skipped" in r}
        text += [f"- {name}: skipped: {why}" for name, why in skips.items()] + ([""] if skips else [])
    ref = [p for p in pts if p["target"] not in targets]
    if ref:
        text += ["### Reference (full fine-tuning at every step; fixed-cost policies)", ""] + _table(ref) + [""]
    if verdict_list:
        text += ["### Verdicts (alast against each row at the same target)", ""]
        text += [f"- {v['line']}" for v in verdict_list] + [""]
    return "\n".join(text)


def plot(path: Path, pts: list[dict[str, Any]], base_steps: int) -> None:
    """Accuracy (mean ± std over seeds) against the FLOPs ratio: a line per row, full by steps dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for policy in dict.fromkeys(p["policy"] for p in pts):
        ps = sorted((p for p in pts if p["policy"] == policy and p["flops_ratio"] is not None),
                    key=lambda p: p["flops_ratio"])
        if not ps:
            continue
        style = dict(color="k", linestyle="--", marker="s", zorder=3) if policy == BY_STEPS else dict(marker="o")
        label = f"{BY_STEPS} (reference)" if policy == BY_STEPS else policy
        ax.errorbar([p["flops_ratio"] for p in ps], [100 * p["val_accuracy"] for p in ps],
                    yerr=[100 * (p["val_accuracy_std"] or 0.0) for p in ps], capsize=3, label=label, **style)
    ax.set_xlabel(f"counted training FLOPs / full fine-tuning at {base_steps} steps")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ordered(pts: list[dict[str, Any]], targets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Points by target (targets' order, then the reference), the full fine-tuning rows first."""
    rank = {BY_STEPS: 0, MATCHED: 1}
    return sorted(pts, key=lambda p: (targets.index(p["target"]) if p["target"] in targets else len(targets),
                                      rank.get(p["policy"], 2)))


def write_curve_outputs(out: Path, results: list[dict[str, Any]], targets: tuple[float, ...],
                        base_steps: int, learning_rates: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write curves.json, results.json, results.md and accuracy_vs_flops.png; return results.json's dict
    (``learning_rates``: the rows' chosen rates, ``alast bench --lrs``)."""
    records = [curve_record(r, base_steps) for r in results]
    pts, verdict_list = _ordered(points(records), targets), verdicts(records, targets)
    first = next((r for r in results if "skipped" not in r), {})
    setting = {k: first.get(k) for k in ("model", "data", "backend", "batch_size", "device")}
    setting["steps"] = base_steps
    x = f"counted training FLOPs / full fine-tuning at {base_steps} steps"
    (out / CURVES).write_text(json.dumps({"setting": setting, "x": x, "targets": list(targets),
                                          "records": records}, indent=2) + "\n")
    result = {"mode": "curves", "setting": setting, "x": x, "targets": list(targets), "points": pts,
              "verdicts": verdict_list, "skipped": [r for r in records if "skipped" in r]}
    if learning_rates is not None:
        result["learning_rates"] = learning_rates
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(setting, base_steps, targets, pts, records, verdict_list)
                                    + lr_markdown(learning_rates))
    plot(out / "accuracy_vs_flops.png", pts, base_steps)
    return result
