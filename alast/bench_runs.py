"""What `alast bench` runs, in which order and for how many steps, and how two rows compare.

Pure functions on numbers and summaries (no torch), so the bench's arithmetic is unit-tested alone.

* Order: seed index i rotates the policy order by i (over several targets, the target groups by i
  and each group's policies by i + j), so a machine that drifts (thermal, a noisy neighbour) does
  not favour the policy that always runs first.
* Step counts: a compute-matched full fine-tuning run (``full@matched``) takes
  ``round(steps * train_flops / full_ft_train_flops)`` steps of the ALaST run it matches, from that
  run's counted FLOPs; a compute-matched LoRA run (``lora@matched``, after an ``alast+lora`` run)
  takes ``round(train_flops / every_token_step_flops)``, the counted cost of one step of the same
  LoRA model on every block and token (a LoRA step computes no weight gradients for the frozen
  base, so it costs less than a full fine-tuning step); full fine-tuning "by steps" at target t
  (``full@steps``) takes ``round(steps * t)``. Rounding is half up (2.5 -> 3), not Python's half
  to even. The learning-rate schedule follows the shorter step count as in any run.
* Targets: every policy but ``full`` and the fixed-cost ones has its knobs solved for a target; a
  counted ratio more than :data:`TARGET_TOLERANCE` (relative) off its target is flagged, not called
  the same cost.
* Comparison: the mean accuracy difference of two rows and whether it exceeds their pooled std.
* The same-steps table: rows aggregated over seeds, costs as ratios to full (the ``full`` row, for
  the matched rows too), the verdicts, markdown.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

MATCHED = "full@matched"
LORA_MATCHED = "lora@matched"
# the policy whose runs a compute-matched row follows -> (that row, the policy it runs, its result key)
MATCHED_ROWS = {"alast": (MATCHED, "full", "matched"), "alast+lora": (LORA_MATCHED, "lora", "lora_matched")}
BY_STEPS = "full@steps"
FIXED_COST = ("lora",)  # no FLOPs knob and no step change: one point at its own cost
TARGET_TOLERANCE = 0.03  # a counted FLOPs ratio this far (relative) from its target is not "at" it
COST_KEYS = ("train_flops", "peak_memory_bytes", "wall_time_s", "median_step_time_s", "train_time_s")
# Costs shown as a ratio to full's. Not wall time: it holds the process's one-time start-up (imports,
# the first model build, profiling, caches), which the first run alone pays, whichever policy it is.
RATIO_KEYS = ("train_flops", "peak_memory_bytes", "median_step_time_s", "train_time_s")


class RunSpec(NamedTuple):
    """One planned training run.

    ``target`` is the FLOPs target the row belongs to (None: none); ``solve`` says whether the
    planner sets the policy's knobs for it; ``steps`` overrides ``train.steps`` (None: the base's);
    ``lr`` overrides ``train.lr`` (None: the base's); ``tune``: a run that chooses a learning rate,
    on images held out of the training split (:func:`tuning_runs`)."""

    policy: str
    seed: int
    target: float | None = None
    label: str | None = None
    steps: int | None = None
    solve: bool = False
    lr: float | None = None
    tune: bool = False

    @property
    def name(self) -> str:
        """The row the run reports to: the label (``full@matched``, ``lora@matched``, ``full@steps``)
        or the policy."""
        return self.label or self.policy

    def dir_name(self) -> str:
        """``<policy>[-t<target>]-seed<k>``, with ``+`` and ``@`` spelled ``-``; a tuning run's ends in
        ``-lr<rate>``."""
        tag = f"-t{self.target:g}" if self.target is not None else ""
        rate = f"-lr{self.lr:g}" if self.tune else ""
        return f"{self.name.replace('+', '-').replace('@', '-')}{tag}-seed{self.seed}{rate}"


TuneKey = tuple[str, float | None, int | None]  # (policy, FLOPs target, steps): the runs that share one rate


def tune_key(spec: RunSpec, base_steps: int | None = None, curves: bool = False) -> TuneKey:
    """The runs that share one chosen learning rate: a policy at one FLOPs target and one step count
    (``base_steps``: the bench's, spelled None). A compute-matched row's step count follows another
    run, so no run before it can choose its rate: ``full@matched`` takes the rate of full fine-tuning
    by steps at its target over curves (whose step count it nearly has, and whose run it is where the
    counts are equal), else full's; ``lora@matched`` takes lora's."""
    if spec.label == MATCHED and curves and spec.target is not None and base_steps is not None:
        steps = scaled_steps(base_steps, spec.target)
        return spec.policy, None, None if steps == base_steps else steps
    if spec.label in (MATCHED, LORA_MATCHED):
        return spec.policy, None, None
    return spec.policy, spec.target if spec.solve else None, None if spec.steps == base_steps else spec.steps


def tuning_runs(runs: list[RunSpec], lrs: tuple[float, ...], seed: int, matched_policies: Sequence[str] = (),
                base_steps: int | None = None, curves: bool = False) -> list[RunSpec]:
    """One run per learning rate of ``lrs`` for each :func:`tune_key` of ``runs`` (and of the
    compute-matched rows that follow ``matched_policies``), all with ``seed`` and a fixed step count
    (``base_steps`` where the row has none of its own: a run on fewer images is as many steps as the
    row's), in the order the keys first run."""
    keys: dict[TuneKey, RunSpec] = {}
    for spec in runs:
        keys.setdefault(tune_key(spec, base_steps, curves), spec)
    for policy in matched_policies:
        _, follower, _ = MATCHED_ROWS[policy]
        keys.setdefault((follower, None, None), RunSpec(follower, seed))
    return [spec._replace(seed=seed, lr=lr, tune=True, steps=base_steps if spec.steps is None else spec.steps)
            for spec in keys.values() for lr in lrs]


def choose_lrs(tuned: list[tuple[RunSpec, dict[str, Any]]], base_steps: int | None = None,
               curves: bool = False) -> list[dict[str, Any]]:
    """Per :func:`tune_key`: each rate's accuracy on the held-out images (a skipped run: none) and the
    chosen rate, the most accurate (on a tie, the one listed first); ``chosen`` None where every run
    of the key was skipped."""
    out: dict[TuneKey, dict[str, Any]] = {}
    for spec, summary in tuned:
        key = tune_key(spec, base_steps, curves)
        entry = out.setdefault(key, {"key": list(key), "row": spec.name, "target": spec.target, "steps": key[2],
                                     "seed": spec.seed, "accuracy": {}, "chosen": None})
        acc = summary.get("val_accuracy") if "skipped" not in summary else None
        entry["accuracy"][f"{spec.lr:g}"] = acc
        best = entry["accuracy"].get(f"{entry['chosen']:g}") if entry["chosen"] is not None else None
        if acc is not None and (best is None or acc > best):
            entry["chosen"] = spec.lr
    return list(out.values())


def with_lrs(runs: list[RunSpec], choices: list[dict[str, Any]], base_steps: int | None = None,
             curves: bool = False) -> list[RunSpec]:
    """``runs`` with each run's chosen learning rate (:func:`choose_lrs`; none chosen: the base's)."""
    chosen = {tuple(c["key"]): c["chosen"] for c in choices}
    return [r._replace(lr=chosen.get(tune_key(r, base_steps, curves))) for r in runs]


def lr_markdown(learning_rates: dict[str, Any] | None) -> str:
    """results.md's paragraph on the chosen learning rates (``alast bench --lrs``; None: none)."""
    if learning_rates is None:
        return ""
    head = (f"\nLearning rates (`--lrs`), chosen per row by one run each on seed {learning_rates['seed']}, trained "
            f"on the training images less {100 * learning_rates['tune_fraction']:g}% of them and scored on those "
            "(the validation images play no part in the choice); the row's runs above train at the chosen rate:\n\n")
    return head + "".join(f"- {line}\n" for line in lr_lines(learning_rates["rows"]))


def lr_lines(choices: list[dict[str, Any]]) -> list[str]:
    """Each row's chosen learning rate and every rate's held-out accuracy, one line per row."""
    out = []
    for c in choices:
        where = "".join([f" at {c['target']:g}x" if c["target"] is not None else "",
                         f", {c['steps']} steps" if c["steps"] is not None else ""])
        tried = ", ".join(f"{lr}: {'skipped' if a is None else f'{100 * a:.2f}%'}" for lr, a in c["accuracy"].items())
        chosen = "none (every run skipped)" if c["chosen"] is None else f"{c['chosen']:g}"
        out.append(f"{c['row']}{where}: {chosen} ({tried})")
    return out


def _rotate(items: list[Any], k: int) -> list[Any]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def solves_target(policy: str) -> bool:
    """Whether a FLOPs target sets ``policy``'s knobs: every policy but ``full`` (the reference, which
    reaches a target by steps) and the fixed-cost ones."""
    return policy != "full" and policy not in FIXED_COST


def same_step_runs(policies: list[str], seeds: list[int], target: float | None) -> list[RunSpec]:
    """Every policy once per seed at the base step count; ``target`` goes to each policy it can set
    (:func:`solves_target`), as over several targets."""
    runs = []
    for i, seed in enumerate(seeds):
        for policy in _rotate(list(policies), i):
            t = target if target is not None and solves_target(policy) else None
            runs.append(RunSpec(policy, seed, t, solve=t is not None))
    return runs


def curve_runs(policies: list[str], seeds: list[int], targets: tuple[float, ...], steps: int) -> list[RunSpec]:
    """Runs for accuracy-versus-FLOPs curves: at each target, full fine-tuning by steps and every
    other policy with its knobs solved for the target; once per seed, full fine-tuning at all
    ``steps`` (the reference, unless 1 is a target) and each fixed-cost policy (``lora``)."""
    def group(target: float, seed: int) -> list[RunSpec]:
        out = []
        for p in policies:
            if p == "full":
                out.append(RunSpec("full", seed, target, BY_STEPS, scaled_steps(steps, target)))
            elif solves_target(p):
                out.append(RunSpec(p, seed, target, solve=True))
        return out

    runs: list[RunSpec] = []
    for i, seed in enumerate(seeds):
        reference = [] if 1.0 in targets else [RunSpec("full", seed, 1.0, BY_STEPS, steps)]
        reference += [RunSpec(p, seed) for p in policies if p in FIXED_COST]
        groups = [g for g in [group(t, seed) for t in targets] + [reference] if g]
        for j, g in enumerate(_rotate(groups, i)):
            runs += _rotate(g, i + j)
    return runs


def scaled_steps(steps: int, fraction: float) -> int:
    """Steps of full fine-tuning that cost ``fraction`` of ``steps``, rounded half up (at least one)."""
    return max(1, math.floor(steps * fraction + 0.5))


def off_target(ratio: float | None, target: float | None, tolerance: float = TARGET_TOLERANCE) -> float | None:
    """``ratio / target - 1`` where it exceeds ``tolerance`` in size (the point is not at its target's
    cost), else None (also when either is unknown)."""
    if ratio is None or not target:
        return None
    off = ratio / target - 1
    return off if abs(off) > tolerance else None


def off_target_text(off: float) -> str:
    """``"20.0% under the target"`` for ``off`` = -0.2."""
    return f"{100 * abs(off):.1f}% {'under' if off < 0 else 'over'} the target"


def matched_steps(summary: dict[str, Any], row: str = MATCHED) -> int:
    """Steps of the compute-matched ``row`` whose counted FLOPs equal those of the run ``summary``
    describes. ``full@matched``: ``round(steps * train_flops / full_ft_train_flops)`` (full
    fine-tuning costs the same each step). ``lora@matched``: ``round(train_flops /
    every_token_step_flops)``, the counted cost of one LoRA step on every block and token, worked
    out exactly on the counted figures (no float rounding at a half)."""
    if row == LORA_MATCHED:
        flops, step = summary.get("train_flops"), summary.get("every_token_step_flops")
        if not flops or not step:
            raise ValueError(f"a compute-matched LoRA run needs the {summary.get('policy')} run's counted FLOPs, but "
                             f"its summary has train_flops={flops}, every_token_step_flops={step} (a run from before "
                             "this count, or with backend.count_flops off); keep backend.count_flops on")
        return max(1, math.floor(Fraction(flops) / Fraction(step) + Fraction(1, 2)))
    flops, full, steps = summary.get("train_flops"), summary.get("full_ft_train_flops"), summary.get("steps")
    if not flops or not full or not steps:
        raise ValueError(f"a compute-matched run needs the {summary.get('policy')} run's counted FLOPs, but its "
                         f"summary has train_flops={flops}, full_ft_train_flops={full}; keep backend.count_flops on")
    return scaled_steps(int(steps), flops / full)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the values that are not None (std 0 for one value; None for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a`` minus mean of ``b``, their pooled sample std (None unless both have two or more
    values) and whether the difference exceeds it (None when the spread is unknown)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma is None or mb is None:
        raise ValueError("compare needs at least one value on each side")
    pooled = None
    if len(a) > 1 and len(b) > 1:
        pooled = math.sqrt(((len(a) - 1) * sa**2 + (len(b) - 1) * sb**2) / (len(a) + len(b) - 2))
    diff = ma - mb
    return {"a_mean": ma, "b_mean": mb, "diff": diff, "pooled_std": pooled, "n_a": len(a), "n_b": len(b),
            "exceeds_pooled_std": (abs(diff) > pooled) if pooled is not None else None}


def judgement(c: dict[str, Any]) -> str:
    """Words for a :func:`compare` result: above / below / level, and how it stands to the spread."""
    side = "above" if c["diff"] > 0 else "below" if c["diff"] < 0 else "level with"
    if c["exceeds_pooled_std"] is None:
        return f"{side} (one seed on a side: no spread to judge by)"
    if c["exceeds_pooled_std"]:
        return f"{side}, beyond the pooled std {100 * c['pooled_std']:.2f} pts"
    return f"{side} but within the pooled std {100 * c['pooled_std']:.2f} pts: no clear difference"


def _row(r: dict[str, Any]) -> str:
    return r.get("label") or r["policy"]


def aggregate(results: list[dict[str, Any]], policies: list[str]) -> dict[str, Any]:
    """One entry per row (policy, or label such as ``full@matched``): accuracy mean and std over
    seeds, mean costs and their ratios to ``full``; ``matched``: alast against ``full@matched``;
    ``lora_matched``: alast+lora against ``lora@matched``."""
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
        # the share of the parameters the optimizer changed over the run (summary.json's parameters)
        entry["parameters_updated_share"], _ = mean_std([_updated_share(r.get("parameters")) for r in rs])
        for key in COST_KEYS + ("full_ft_train_flops", "steps"):
            entry[key], _ = mean_std([r.get(key) for r in rs])
        entry["plan"] = rs[0].get("plan") if rs else None
        entry["lr"] = rs[0].get("lr") if rs else None  # train.lr: one rate a row (alast bench --lrs: its chosen one)
        out["policies"][policy] = entry
    full = out["policies"]["full"]
    for policy, e in out["policies"].items():
        for key in RATIO_KEYS:
            e[f"{key}_ratio"] = (e[key] / full[key]) if e.get(key) and full.get(key) else None
        e["accuracy_delta_vs_full"] = (e["val_accuracy"] - full["val_accuracy"]
                                       if full["val_accuracy"] is not None and e["val_accuracy"] is not None else None)
        e["speedup_vs_full"] = (full["median_step_time_s"] / e["median_step_time_s"]) if e.get("median_step_time_s") else None
        fr = e.get("train_flops_ratio")
        e["speedup_share_of_flop_bound"] = (e["speedup_vs_full"] / (1 / fr)) if fr and e["speedup_vs_full"] else None
    for policy, (row, _, key) in MATCHED_ROWS.items():
        out[key] = _matched_comparison(results, out["policies"], policy, row) if row in policies else None
    out["same_steps"] = _same_steps_comparison(results, out["policies"]) if "alast" in policies else None
    matched_rows = {row for row, _, _ in MATCHED_ROWS.values()}
    first = next((r for r in results if _row(r) not in matched_rows and "skipped" not in r), {})
    out["setting"] = {k: first.get(k) for k in ("model", "data", "backend", "steps", "batch_size", "device")}
    return out


def _updated_share(counts: dict[str, int] | None) -> float | None:
    return counts["updated"] / counts["total"] if counts and counts.get("total") else None


def _matched_comparison(results: list[dict[str, Any]], rows: dict[str, Any], policy: str = "alast",
                        row: str = MATCHED) -> dict[str, Any] | None:
    """``policy`` (alast, alast+lora) against its compute-matched ``row`` (full@matched, lora@matched)
    at the same counted FLOPs, with a one-line verdict that shows both FLOPs ratios (to full) and
    flags a matched run more than 3% off the policy's FLOPs (too few steps to match)."""
    a = [r["val_accuracy"] for r in results if _row(r) == policy and "skipped" not in r]
    b = [r["val_accuracy"] for r in results if _row(r) == row and "skipped" not in r]
    if not a or not b or policy not in rows:
        return None
    c = compare(a, b)
    ra, rb = rows[policy].get("train_flops_ratio"), rows[row].get("train_flops_ratio")
    c["flops_ratios"] = {policy: ra, row: rb}
    off = off_target(rb, ra)
    c["off_target"] = off
    flag = (f"; {row} {100 * abs(off):.1f}% {'under' if off < 0 else 'over'} {policy}'s FLOPs: not the same cost"
            if off is not None else "")
    c["line"] = (f"Compute-matched: {policy} {100 * c['a_mean']:.2f}% at {_x(ra)} vs {row} {100 * c['b_mean']:.2f}% "
                 f"at {_x(rb)} ({c['diff'] * 100:+.2f} pts{flag}): {policy} is {judgement(c)}.")
    return c


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}x"


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
    ("inference FLOPs", "inference_flops_ratio", "ratio"), ("params updated %", "parameters_updated_share", "acc"),
    ("peak MiB", "peak_memory_bytes", "bytes"), ("mem/full", "peak_memory_bytes_ratio", "ratio"),
    ("step ms", "median_step_time_s", "ms"), ("speed-up", "speedup_vs_full", "ratio"),
    ("train s", "train_time_s", "s"), ("train/full", "train_time_s_ratio", "ratio"), ("wall s", "wall_time_s", "s"),
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
            f"inference FLOPs: the deployed forward against every token's; costs: mean. Train s: the time in "
            f"training steps (start-up, evaluation and checkpoints left out), the time compared to full's; wall s: "
            f"the whole run, whose one-time start-up (imports, first model build, profiling) the first run pays.")
    text = head + "\n\n" + "\n".join(lines) + "\n"
    if table.get("same_steps"):
        text += f"\n{table['same_steps']['line']}\n"
    if table.get("matched"):
        text += (f"\n`{MATCHED}`: full fine-tuning for fewer steps, as many as cost the alast run's counted FLOPs "
                 f"(same seed). {table['matched']['line']}\n")
    if table.get("lora_matched"):
        text += (f"\n`{LORA_MATCHED}`: LoRA (every block, every token) for fewer steps, as many as cost the "
                 f"alast+lora run's counted FLOPs (same seed and LoRA settings). {table['lora_matched']['line']}\n")
    for policy, reason in table.get("left_out", {}).items():
        text += f"\nLeft out of the default policies, `{policy}`: {reason}\n"
    return text + lr_markdown(table.get("learning_rates"))
