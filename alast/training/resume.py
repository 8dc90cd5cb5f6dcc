"""Which config to resume a run with, and which changes a resume refuses.

A resumed run must produce the losses the uninterrupted run would have, so any key that changes
the training computation (model, data, policy, optimizer, schedule, step count, seed, device,
precision) must match the run's ``config.yaml``. Keys that only change bookkeeping or speed may
differ: they are listed in :data:`NEUTRAL_KEYS`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from alast.config import (
    AlastConfig,
    ConfigError,
    apply_overrides,
    build_config,
    build_run_config,
    load_run_config,
    read_yaml,
    with_absolute_paths,
)
from alast.training.rundir import CONFIG as RUN_CONFIG
from alast.training.rundir import RunDirError

# CLI option name -> config key; mirrors alast_cli.options._NAMED (a test keeps them in step).
NAMED_OPTION_KEYS: dict[str, str] = {
    "model": "model.name", "pretrained": "model.pretrained", "checkpoint": "model.checkpoint",
    "img_size": "model.img_size", "data": "data.spec", "data_dir": "data.data_dir", "policy": "policy.name",
    "backend": "backend.name", "steps": "train.steps", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "micro_batch_size": "train.micro_batch_size", "lr": "train.lr",
    "target_flops": "policy.target_flops", "seed": "train.seed",
}

# Keys a resume may change: they affect where files go, how often they are written, how fast a
# step runs or what is measured, never the losses. (Thread count can change CPU rounding; bitwise
# equal resumes need the same backend.threads. data.num_workers is neutral because augmentation is
# seeded per sample from (train.seed, step, index): alast.data.datasets.StepSeededAugment. data.cache
# is neutral because a cached image is the transformed tensor, bit for bit: alast.data.cache.)
NEUTRAL_KEYS = frozenset({
    "output.dir", "output.checkpoint_every", "output.checkpoint_minutes", "output.keep_last", "output.force",
    "backend.threads", "backend.count_flops", "data.num_workers", "data.cache", "data.data_dir", "train.eval_every",
    "output.tensorboard",
    "train.eval_batch_size",
    "policy.eval_tokens",  # how the final model is evaluated, not how it is trained
    "train.micro_batch_size",  # the same steps in passes, their token draws the one pass's: float rounding only
})
NEUTRAL_SECTIONS = ("export.",)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'train': {'lr': 1}}`` -> ``{'train.lr': 1}``; a None section stays one key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def result_changes(old: AlastConfig | Mapping[str, Any], new: AlastConfig | Mapping[str, Any]) -> list[str]:
    """``'key (old -> new)'`` for every differing key that would change the training results."""
    a, b = (flatten(_as_dict(c)) for c in (old, new))
    changed = []
    for key in sorted(set(a) | set(b)):
        if key in NEUTRAL_KEYS or key.startswith(NEUTRAL_SECTIONS):
            continue
        if a.get(key) != b.get(key):
            changed.append(f"{key} ({_show(a.get(key))} -> {_show(b.get(key))})")
    return changed


def _as_dict(cfg: AlastConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, AlastConfig):
        return cfg.model_dump(mode="json")
    return build_run_config(dict(cfg)).model_dump(mode="json")


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def named_sets(named: Mapping[str, Any]) -> list[str]:
    """CLI named options (``steps=200``) as ``section.key=value`` overrides (None: not given)."""
    sets = []
    for name, value in named.items():
        if value is None:
            continue
        if name not in NAMED_OPTION_KEYS:
            raise ConfigError(f"unknown option {name!r}")
        if name == "epochs":
            sets.append("train.steps=null")
        if name == "steps":
            sets.append("train.epochs=null")
        sets.append(f"{NAMED_OPTION_KEYS[name]}={json.dumps(str(value) if isinstance(value, Path) else value)}")
    return sets


def saved_config(run_dir: Path) -> AlastConfig:
    """The resolved config a run was started with."""

    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise RunDirError(f"cannot resume {run_dir}: no {RUN_CONFIG} there (not a run directory, or the run "
                          "never started); start a new run instead")
    return load_run_config(path)


def resume_config(run_dir: Path, config_path: Path | None, overrides: Sequence[str],
                  named_options: Mapping[str, Any]) -> AlastConfig:
    """The config to continue ``run_dir`` with.

    Starts from the run's ``config.yaml`` (or ``config_path`` if given), applies the named options
    and ``--set`` overrides, and refuses (ConfigError) any difference from the run's config that
    would change results, naming the keys.
    """
    saved = with_absolute_paths(saved_config(run_dir))  # a run written before paths were stored absolute
    base = read_yaml(config_path) if config_path is not None else saved.model_dump(mode="json")
    wanted = with_absolute_paths(build_config(apply_overrides(base, named_sets(named_options) + list(overrides))))
    check_compatible(saved, wanted, run_dir)
    return wanted


def check_compatible(saved: AlastConfig | Mapping[str, Any], wanted: AlastConfig | Mapping[str, Any],
                     run_dir: Path) -> None:
    changed = result_changes(saved, wanted)
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with a changed config: {', '.join(changed)} would change "
                          "the results; drop these changes, or start a new run with another --out")


def check_world_size(saved: int, world_size: int, run_dir: Path) -> None:
    """A run resumes with the process count it was trained with: each process trains its own share
    of the batch with its own token draws, and the counted FLOPs are per process."""
    if int(saved) != world_size:
        def procs(n: int) -> str:
            return "1 process" if n == 1 else f"{n} processes"

        how = "without --nproc" if saved == 1 else f"with --nproc {saved}"
        raise ConfigError(f"cannot resume {run_dir} with {procs(world_size)}: it was trained with {procs(int(saved))}, "
                          f"which its checkpoints, batch shares and token draws follow; resume it {how}")
