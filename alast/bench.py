"""`alast bench`: several policies on the same data, model, seeds and steps, one table.

Runs alternate: seed s runs the policies in an order rotated by s, so a machine that drifts
(thermal, a noisy neighbour) does not favour the policy that always runs first.

Beside the same-steps table: ``matched`` adds, right after each ALaST run, full fine-tuning for the
steps that cost the same counted FLOPs (row ``full@matched``), and right after each ALaST+LoRA run,
LoRA on every block and token for the steps that cost the same (row ``lora@matched``); ``targets``
runs every policy at several FLOPs targets and draws accuracy-versus-FLOPs curves
(:mod:`alast.bench_curves`).

A bench writes what it was asked to run to ``bench.json`` before its first run; ``resume`` finishes
an interrupted bench: the same arguments, runs with a ``summary.json`` read back (not rerun), an
interrupted run continued from its last checkpoint, then the rest, and the same tables.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alast.bench_runs import (
    BY_STEPS,
    MATCHED,
    MATCHED_ROWS,
    RunSpec,
    _row,
    aggregate,
    choose_lrs,
    curve_runs,
    markdown_table,
    matched_steps,
    same_step_runs,
    scaled_steps,
    tuning_runs,
    with_lrs,
)
from alast.config import AlastConfig, build_config, build_run_config, check_policy_name
from alast.data.cache import shared_between_runs
from alast.training.loop import Hooks, train

MANIFEST = "bench.json"
MANIFEST_ARGS = {"policies": "--policies", "seeds": "--seeds/--seed", "target_flops": "--target-flops",
                 "targets": "--targets", "matched": "--matched", "cost_model": "--cost-model", "lrs": "--lrs",
                 "tune_fraction": "--tune-fraction"}
TUNING = "tuning.jsonl"  # the learning-rate runs' summaries, one line each
Solver = Callable[..., tuple[dict[str, Any], dict[str, Any]]]  # plan.solve_target: (cfg, steps=None)
OnRun = Callable[[int, int, str, int], Hooks]


@dataclass
class BenchPlan:
    """What to run. ``target_flops``: one target for every policy that can be set to one, at the
    same steps; ``targets``: several, for curves (exclusive with ``target_flops``); ``matched``: a
    compute-matched full fine-tuning run after each ``alast`` run and a compute-matched LoRA run
    after each ``alast+lora`` run (:data:`~alast.bench_runs.MATCHED_ROWS`); ``cost_model``: the file the
    targets are planned from (recorded for a resume); ``resume``: finish the bench in ``out``;
    ``optional``: policies the user did not name (``--policies``' default list), each left out, with its
    reason in ``left_out``, where one FLOPs target is out of its reach, instead of the bench refused
    (``left_out`` may name others from the start: the default list's LoRA policies on the ort backend);
    ``lrs``: learning rates each row chooses from, one run each on the first seed, trained on the
    training images less ``tune_fraction`` of them and scored on those (:func:`~alast.bench_runs.tuning_runs`);
    the row's runs then train at its most accurate rate."""

    base: AlastConfig
    policies: list[str]
    seeds: list[int]
    out: Path
    target_flops: float | None = None
    matched: bool = False
    targets: tuple[float, ...] | None = None
    base_steps: int | None = None
    cost_model: str | None = None
    resume: bool = False
    optional: frozenset[str] = frozenset()
    runs: list[RunSpec] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    lrs: tuple[float, ...] | None = None
    tune_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in self.policies:  # first: `FULL` is an unknown name, not a missing full
            check_policy_name(name, "--policies")
        if "full" not in self.policies:
            raise ValueError("bench needs 'full' among --policies: every cost is reported as a ratio to it")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("--policies lists a policy twice")
        if self.targets is not None and self.target_flops is not None:
            raise ValueError("give either --target-flops (one target) or --targets (curves), not both")
        if self.matched and not self.matched_policies:
            raise ValueError("--matched matches full fine-tuning to the alast run's FLOPs and LoRA to the alast+lora "
                             "run's: add alast to --policies, or alast+lora")
        if self.lrs is not None and (len(self.lrs) < 2 or len(set(self.lrs)) != len(self.lrs)
                                     or min(self.lrs) <= 0):
            raise ValueError("--lrs needs two or more different learning rates above 0, e.g. --lrs 1e-3,5e-4")
        if not 0 < self.tune_fraction < 1:
            raise ValueError(f"--tune-fraction must lie in (0, 1), got {self.tune_fraction:g}")
        if (self.matched or self.targets) and self.base.backend.count_flops == "off":
            raise ValueError("--matched and --targets compare counted FLOPs, but backend.count_flops is off; "
                             "drop --set backend.count_flops=off (or pass --no-matched)")
        if self.targets is None:
            self.runs = same_step_runs(self.policies, self.seeds, self.target_flops)
            if self.lrs is not None and self.base_steps is None:  # the tuning runs' steps (their epochs are fewer)
                self.base_steps = _planned_steps(self.base)
            return
        if self.base_steps is None:
            self.base_steps = _planned_steps(self.base)
        self.runs = curve_runs(self.policies, self.seeds, tuple(self.targets), self.base_steps)

    @property
    def matched_policies(self) -> list[str]:
        """The policies of ``policies`` that a compute-matched row follows (alast, alast+lora)."""
        return [p for p in MATCHED_ROWS if p in self.policies and p not in self.left_out]

    @property
    def rows(self) -> list[str]:
        """Row names of the same-steps table: the policies, then the compute-matched rows."""
        kept = [p for p in self.policies if p not in self.left_out]
        return kept + ([MATCHED_ROWS[p][0] for p in self.matched_policies] if self.matched else [])

    def leave_out(self, policy: str, reason: str) -> None:
        """Drop an ``optional`` policy's runs (its FLOPs target is out of its reach: ``reason``)."""
        self.left_out[policy] = reason
        self.runs = [r for r in self.runs if r.policy != policy]

    def manifest(self) -> dict[str, Any]:
        """What ``bench.json`` records: the arguments that decide the runs, and the base config."""
        return {"policies": self.policies, "seeds": self.seeds, "target_flops": self.target_flops,
                "targets": None if self.targets is None else list(self.targets), "matched": self.matched,
                "cost_model": self.cost_model, "lrs": None if self.lrs is None else list(self.lrs),
                "tune_fraction": self.tune_fraction if self.lrs is not None else None,
                "config": self.base.model_dump(mode="json")}


def _planned_steps(cfg: AlastConfig) -> int:
    from alast.planning.plan import planned_steps

    return planned_steps(cfg)


def policy_config(base: AlastConfig, policy: str, seed: int, run_dir: Path, target: float | None,
                  steps: int | None = None, lr: float | None = None, tune_fraction: float | None = None,
                  tune_seeds: Sequence[int] = ()) -> AlastConfig:
    """``base`` set to ``policy`` (LoRA section added or dropped), ``seed``, ``run_dir``, the FLOPs
    target, and ``steps`` in place of the base's steps or epochs, ``lr`` in place of its learning rate
    when given; ``tune_fraction`` (``data.tune_fraction``; None: none): score on images held out of
    training, none of them a validation image of a seed of ``tune_seeds``."""
    data = base.model_dump(mode="json")
    if lr is not None:
        data["train"]["lr"] = lr
    data["data"]["tune_fraction"] = tune_fraction
    data["data"]["tune_outside_seeds"] = list(tune_seeds) if tune_fraction is not None else []
    data["policy"]["name"] = policy
    data["policy"]["target_flops"] = target
    if not (policy == "lora" or policy.endswith("+lora")):
        data["policy"]["lora"] = None  # every LoRA policy keeps the base's LoRA settings (its defaults if none)
    if steps is not None:
        data["train"]["steps"], data["train"]["epochs"] = int(steps), None
    data["train"]["seed"] = seed
    data["output"]["dir"] = str(run_dir)
    data["output"]["force"] = False
    return build_config(data)


def check_resume(plan: BenchPlan) -> None:
    """Refuse to resume ``plan.out`` unless it holds a bench started with ``plan``'s arguments (one
    line naming what differs); config keys that never change results (threads, workers) may differ."""
    from alast.training.resume import result_changes

    out = plan.out
    if not out.is_dir():
        raise ValueError(f"cannot resume bench {out}: no such folder; drop --resume to start the bench there")
    if not (out / MANIFEST).is_file():
        raise ValueError(f"cannot resume {out}: it holds no {MANIFEST}, so it is not the output of an alast bench "
                         "(or one from before --resume); drop --resume and choose an empty --out")
    try:
        saved = json.loads((out / MANIFEST).read_text())
        saved_base = build_run_config(saved["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot resume {out}: its {MANIFEST} is unreadable ({str(exc).splitlines()[0]}); "
                         "start a new bench with another --out") from None
    wanted = plan.manifest()
    changed = [f"{flag} ({_show(saved.get(key))} -> {_show(wanted[key])})" for key, flag in MANIFEST_ARGS.items()
               if saved.get(key) != wanted[key]]
    changed += result_changes(_run_neutral(saved_base), _run_neutral(plan.base))
    if changed:
        raise ValueError(f"cannot resume bench {out} with other arguments: {', '.join(changed)}; rerun it with the "
                         "arguments it was started with, or start a new bench with another --out")


def _run_neutral(cfg: AlastConfig) -> AlastConfig:
    """``cfg`` with the keys each run sets for itself (policy, target, seed) made equal."""
    data = cfg.model_dump(mode="json")
    data["policy"]["name"], data["policy"]["target_flops"], data["train"]["seed"] = "full", None, 0
    return build_config(data)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def run_bench(plan: BenchPlan, on_run: OnRun | None = None, solve_target: Solver | None = None,
              on_reused: Callable[[int, int, str, int], None] | None = None,
              on_left_out: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Run ``plan`` (when ``plan.matched``, a ``full@matched`` run right after each alast run and a
    ``lora@matched`` run right after each alast+lora run); write
    ``bench.json``, ``raw.jsonl``, ``results.json``/``results.md`` and plots (``curves.json`` too over
    targets) under ``plan.out``; return what ``results.json`` holds. With ``plan.resume``, a finished
    run is read back (``on_reused`` is told) and an interrupted one continues from its checkpoint.
    ``on_left_out(policy, reason)`` is told of each optional policy left out, before the first run."""
    if plan.resume:
        check_resume(plan)
    shapes = check_policies(plan)
    if plan.lrs is not None or (solve_target is not None and any(spec.solve for spec in plan.runs)):
        _check_batch(plan)  # before the solver profiles the model
    unreachable = _solve_up_front(plan, solve_target, shapes) if solve_target is not None else {}
    if on_left_out is not None:
        for policy, reason in plan.left_out.items():
            on_left_out(policy, reason)
    todo = [r for r in plan.runs if _skip_reason(plan, r, unreachable) is None]  # the progress counts these
    if not todo and unreachable:  # every point skipped: a bench of empty tables
        from planners.target import TargetError

        raise TargetError(f"no run of this bench reaches its --targets: {next(iter(unreachable.values()))}")
    plan.out.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        (plan.out / MANIFEST).write_text(json.dumps(plan.manifest(), indent=2) + "\n")
    (plan.out / "raw.jsonl").write_text("")  # a resumed bench writes every run's line again, in order
    results: list[dict[str, Any]] = []
    curves = plan.targets is not None
    tuning = [] if plan.lrs is None else tuning_runs(todo, plan.lrs, plan.seeds[0],
                                                     plan.matched_policies if plan.matched else [], plan.base_steps,
                                                     curves)
    total = len(tuning) + len(todo) + (sum(r.policy in MATCHED_ROWS for r in todo) if plan.matched else 0)

    def execute(spec: RunSpec) -> dict[str, Any]:
        nonlocal total
        why = _skip_reason(plan, spec, unreachable)
        if why is not None:
            if spec.label == MATCHED:  # the one counted row whose skip shows only once its alast run ran
                total -= 1
            summary = {"policy": spec.policy, "label": spec.name, "seed": spec.seed, "target": spec.target,
                       "skipped": why}
        else:
            done = len(tuning) + sum("skipped" not in r for r in results)
            summary = _execute(plan, spec, done, total, on_run, solve_target, on_reused)
        results.append(summary)
        with (plan.out / "raw.jsonl").open("a") as f:
            f.write(json.dumps(summary) + "\n")
        return summary

    choices: list[dict[str, Any]] = []
    with shared_between_runs():  # runs on the same data read each image once between them
        if tuning:
            choices = _choose_lrs(plan, tuning, total, on_run, solve_target, on_reused)
            plan.runs = with_lrs(plan.runs, choices, plan.base_steps, curves)
        for spec in plan.runs:
            summary = execute(spec)
            if plan.matched and spec.policy in MATCHED_ROWS and "skipped" not in summary:
                row, policy, _ = MATCHED_ROWS[spec.policy]
                execute(with_lrs([RunSpec(policy, spec.seed, spec.target, row, matched_steps(summary, row))],
                                 choices, plan.base_steps, curves)[0])
    learning_rates = ({"tune_fraction": plan.tune_fraction, "seed": plan.seeds[0], "rows": choices}
                      if plan.lrs is not None else None)
    if plan.targets is not None:
        from alast.bench_curves import write_curve_outputs

        return write_curve_outputs(plan.out, results, plan.targets, plan.base_steps, learning_rates)
    table = aggregate(results, plan.rows)
    if learning_rates is not None:
        table["learning_rates"] = learning_rates
    write_outputs(plan, results, table)
    return table


def _choose_lrs(plan: BenchPlan, tuning: list[RunSpec], total: int, on_run: OnRun | None, solve_target: Solver | None,
                on_reused: Callable[[int, int, str, int], None] | None) -> list[dict[str, Any]]:
    """Train the learning-rate runs ``tuning`` (each on the training images less ``plan.tune_fraction``
    of them, scored on those), writing each summary to ``tuning.jsonl``; return each row's choice
    (:func:`~alast.bench_runs.choose_lrs`)."""
    (plan.out / TUNING).write_text("")
    tuned = []
    for i, spec in enumerate(tuning):
        summary = _execute(plan, spec, i, total, on_run, solve_target, on_reused)
        tuned.append((spec, summary))
        with (plan.out / TUNING).open("a") as f:
            f.write(json.dumps(summary) + "\n")
    return choose_lrs(tuned, plan.base_steps, plan.targets is not None)


def check_policies(plan: BenchPlan) -> dict[str, tuple[int, bool]]:
    """Build each run's config, then its runtime and planner as the run will, on the model with
    random weights and two classes (the checks need its layers, not its weights or the data), so
    that what would refuse a later run (LoRA on the ort backend, a bad ``policy.lora.targets``, a
    policy option) stops the bench before the first run trains, not after the runs before it.
    A runtime is built once per LoRA setting and embedding freezing (all it reads of a policy); a
    planner under a FLOPs target is built once the target is solved (:func:`_solve_up_front`). The
    policy of each compute-matched row ``plan.matched`` adds (``lora`` after alast+lora) is checked
    too, though it is not among ``--policies``.
    Returns each policy's (blocks, whether the head reads only the prefix tokens)."""
    from alast.models import create_model
    from alast.training.build import build_planner, create_runtime
    from runtimes.token_schedule import head_reads_prefix

    built: dict[str, tuple[int, bool]] = {}
    shapes: dict[str, tuple[int, bool]] = {}
    specs = {(s.policy, s.target if s.solve else None): s for s in plan.runs}
    for row, policy, _ in (MATCHED_ROWS[p] for p in plan.matched_policies if plan.matched):
        specs.setdefault((policy, None), RunSpec(policy, plan.seeds[0] if plan.seeds else 0, label=row))
    for spec in specs.values():
        cfg = policy_config(plan.base, spec.policy, spec.seed, plan.out / "runs" / spec.dir_name(),
                            spec.target if spec.solve else None, spec.steps)
        key = json.dumps([cfg.policy.lora and cfg.policy.lora.model_dump(), cfg.policy.embeddings_frozen])
        if key not in built:
            m = cfg.model
            model = create_model(m.name, 2, pretrained=False, img_size=m.img_size, drop_path_rate=m.drop_path_rate)
            built[key] = (create_runtime(cfg, model).num_blocks, head_reads_prefix(model))
            del model
            _release_memory()
        shapes[spec.policy] = built[key]
        if not spec.solve:
            build_planner(cfg, built[key][0], head_reads_prefix=built[key][1])
    return shapes


def _check_batch(plan: BenchPlan) -> None:
    """Refuse, before the first run, a batch the training images cannot fill: under ``--lrs`` those of
    the tuning runs (the training split less ``plan.tune_fraction`` of it), the fewest any run has."""
    from alast.data import DataError, check_batch_size
    from alast.training.build import load_data

    tune = plan.tune_fraction if plan.lrs is not None else None
    cfg = policy_config(plan.base, "full", plan.seeds[0], plan.out / "tune", None, tune_fraction=tune,
                        tune_seeds=plan.seeds)
    n = len(load_data(cfg)[0].train)
    if tune is not None and cfg.train.batch_size > n:
        raise DataError(f"--tune-fraction {tune:g} leaves the tuning runs {n} training images, fewer than a batch "
                        f"of {cfg.train.batch_size}; lower --tune-fraction or --batch-size")
    check_batch_size(n, cfg.train.batch_size, 1)


def _solve_up_front(plan: BenchPlan, solve_target: Solver,
                    shapes: dict[str, tuple[int, bool]]) -> dict[tuple[str, float], str]:
    """Solve each policy's FLOPs target before the first run trains, so a target out of a policy's
    reach fails the bench at once, not after the runs before it (each run solves again once its
    data is loaded, from the cached cost model); the policy's planner is built with the solution,
    as its run will (``shapes``: from :func:`check_policies`). Over several targets such a
    (policy, target) is returned with the solver's one-line reason instead, to be skipped (a batch the
    data cannot fill is refused before, by :func:`_check_batch`, as a run refuses it first)."""
    from alast.training.build import build_planner
    from planners.target import TargetError

    solved: set[tuple[str, float | None]] = set()
    unreachable: dict[tuple[str, float], str] = {}
    for spec in plan.runs:
        if not spec.solve or (spec.policy, spec.target) in solved:
            continue
        cfg = policy_config(plan.base, spec.policy, spec.seed, plan.out / "runs" / spec.dir_name(), spec.target,
                            spec.steps)
        solved.add((spec.policy, spec.target))
        try:
            overrides, _ = solve_target(cfg)
        except TargetError as exc:
            if plan.targets is None and spec.policy in plan.optional:
                plan.leave_out(spec.policy, bench_reason(exc, curves=False))
                continue
            if plan.targets is None:
                raise TargetError(bench_reason(exc, curves=False)) from None
            unreachable[(spec.policy, spec.target)] = bench_reason(exc, curves=True)
            continue
        blocks, prefix = shapes[spec.policy]
        build_planner(cfg, blocks, overrides, head_reads_prefix=prefix)
    return unreachable


def bench_reason(exc: Exception, curves: bool) -> str:
    """The solver's one-line reason in bench's options: bench takes no ``--policy`` (full fine-tuning
    is its reference row, there already), and over curves the targets are ``--targets``."""
    line = str(getattr(exc, "reason", exc)).strip().splitlines()[0]
    return line.replace("--target-flops", "--targets") if curves else line


def _skip_reason(plan: BenchPlan, spec: RunSpec, unreachable: dict[tuple[str, float], str]) -> str | None:
    """Why ``spec`` is not run: its target is out of its policy's reach, it is full fine-tuning by
    steps at a target that no other policy reaches (nothing to compare it with), or it is a
    compute-matched full fine-tuning run over targets whose steps are those of ``full@steps`` at its
    target (the same run again)."""
    if spec.solve:
        return unreachable.get((spec.policy, spec.target))
    if spec.label == MATCHED and plan.targets is not None and spec.steps == scaled_steps(plan.base_steps, spec.target):
        return f"the same run as {BY_STEPS} at {spec.target:g}x ({spec.steps} steps, seed {spec.seed})"
    if spec.label != BY_STEPS:
        return None
    others = {s.policy for s in plan.runs if s.solve and s.target == spec.target}
    if others and all((p, spec.target) in unreachable for p in others):
        return f"no other policy reaches {spec.target:g}x, so there is nothing to compare with"
    return None


def _execute(plan: BenchPlan, spec: RunSpec, index: int, total: int, on_run: OnRun | None,
             solve_target: Solver | None, on_reused: Callable[[int, int, str, int], None] | None) -> dict[str, Any]:
    """Train one run (its knobs solved for its target first) and return its summary, annotated with
    seed, run dir, row label and target. Over several targets, a target out of the policy's reach
    returns a record with the solver's reason under ``skipped`` instead of failing the bench.
    Resuming, a finished run's summary is read back and an unfinished one continued."""
    from planners.target import TargetError

    run_dir = plan.out / ("tune" if spec.tune else "runs") / spec.dir_name()
    cfg = policy_config(plan.base, spec.policy, spec.seed, run_dir, spec.target if spec.solve else None, spec.steps,
                        spec.lr, plan.tune_fraction if spec.tune else None, plan.seeds)
    shown = spec.name + (f" at {spec.target:g}x" if spec.target is not None else "")
    if spec.tune:
        shown += f", lr {spec.lr:g} (tuning run)"
    elif spec.lr is not None:
        shown += f", lr {spec.lr:g}"
    resume = plan.resume and _started(plan.out, run_dir, cfg)
    if resume and (run_dir / "summary.json").is_file():
        if on_reused:
            on_reused(index, total, shown, spec.seed)
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        if plan.resume and not resume and run_dir.exists():
            cfg.output.force = True  # made, but stopped before its config was written: start it afresh
        solve = None
        if spec.solve:
            if solve_target is None:
                raise ValueError("a FLOPs target needs the planner (alast.planning.plan)")

            def solve(steps: int) -> tuple[dict[str, Any], dict[str, Any]]:  # run by the loop once the data is loaded
                return solve_target(cfg, steps=steps)
        _release_memory()  # the previous run's model must not count towards this run's peak
        hooks = on_run(index, total, shown, spec.seed) if on_run else None
        try:
            summary = train(cfg, run_dir, resume=resume, hooks=hooks, solve=solve)
        except TargetError as exc:  # raised by ``solve``, before the run directory is made
            if plan.targets is None:
                raise TargetError(bench_reason(exc, curves=False)) from None
            return {"policy": spec.policy, "label": spec.name, "seed": spec.seed, "target": spec.target,
                    "skipped": bench_reason(exc, curves=True)}
    summary.update(seed=spec.seed, run_dir=str(run_dir), label=spec.name, target=spec.target, lr=cfg.train.lr)
    return summary


def _started(out: Path, run_dir: Path, cfg: AlastConfig) -> bool:
    """Whether ``run_dir`` holds a run this bench started (its config.yaml); refuses one whose saved
    config differs from ``cfg`` in what changes results."""
    from alast.config import load_run_config
    from alast.training.resume import result_changes
    from alast.training.rundir import CONFIG

    if not (run_dir / CONFIG).is_file():
        return False
    changed = result_changes(load_run_config(run_dir / CONFIG), cfg)
    if changed:
        raise ValueError(f"cannot resume bench {out}: {run_dir} was trained with another config: {', '.join(changed)}; "
                         "start a new bench with another --out")
    return True


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def write_outputs(plan: BenchPlan, results: list[dict[str, Any]], table: dict[str, Any]) -> None:
    out = plan.out
    if plan.left_out:
        table["left_out"] = dict(plan.left_out)
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
