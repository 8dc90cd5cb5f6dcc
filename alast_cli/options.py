"""Shared CLI options: a config file plus named options and --set overrides, resolved to a config."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import click

from alast.config import (
    AlastConfig,
    ConfigError,
    check_policy_name,
    check_single_run,
    load_config,
    unused_policy_keys,
    with_absolute_paths,
)


def config_options(fn: Callable) -> Callable:
    opts = [
        click.argument("config", required=False, type=PathOption()),
        click.option("--model", help="timm model name (ViT/DeiT), alast_demo_vit or alast_vit12"),
        click.option("--pretrained/--no-pretrained", default=None,
                     help="start from pretrained weights: timm's download for a timm model (default: off), the "
                          "shipped backbone for alast_demo_vit / alast_vit12 (default: on)"),
        click.option("--checkpoint", type=PathOption(),
                     help="local weights to start from: a file, or a directory holding one (a hub snapshot)"),
        click.option("--img-size", type=int, help="input image size"),
        click.option("--data", help="digits | shapes | letters | imagefolder:PATH | torchvision:NAME | "
                                    "random[:N] (N random images, default 256, of 10 classes: timing only)"),
        click.option("--data-dir", type=PathOption(), help="root for torchvision datasets"),
        click.option("--policy", help="alast | full | freeze | tokens | random | lora | alast+lora ..."),
        click.option("--backend", help="torch | ort"),
        click.option("--steps", type=int, help="training steps"),
        click.option("--epochs", type=float, help="training epochs (instead of --steps)"),
        click.option("--batch-size", type=int, help="global batch size"),
        click.option("--micro-batch-size", type=int,
                     help="gradient accumulation: the most images per forward and backward pass on a process"),
        click.option("--lr", type=float, help="peak learning rate"),
        click.option("--target-flops", type=float, help="fraction of full fine-tuning FLOPs, in (0, 1]"),
        click.option("--seed", type=int, help="random seed"),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="override any config key, e.g. --set train.lr=3e-4 (repeatable)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


_NAMED = {
    "model": "model.name", "pretrained": "model.pretrained", "checkpoint": "model.checkpoint",
    "img_size": "model.img_size", "data": "data.spec", "data_dir": "data.data_dir", "policy": "policy.name",
    "backend": "backend.name", "steps": "train.steps", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "micro_batch_size": "train.micro_batch_size", "lr": "train.lr",
    "target_flops": "policy.target_flops", "seed": "train.seed",
}


def resolve_config(config: Path | None, overrides: tuple[str, ...], single_run: bool = True,
                   **named: Any) -> AlastConfig:
    """Config file < named options and --set overrides (a named option and a --set of its key are
    refused together); local paths made absolute. ``single_run``: the
    config of one run (not bench's base config, whose policy each run replaces), checked as such."""
    if named.get("steps") is not None and named.get("epochs") is not None:
        raise ConfigError("--steps and --epochs both given; pass one of them")
    _refuse_named_and_set(named, overrides)
    sets = []
    for key, dotted in _NAMED.items():
        value = named.get(key)
        if value is None:
            continue
        if key == "epochs":
            sets.append("train.steps=null")
        if key == "steps":
            sets.append("train.epochs=null")
        sets.append(f"{dotted}={_yaml_scalar(value)}")
    cfg = with_absolute_paths(load_config(config, sets + list(overrides)))
    if named.get("policy") is not None and cfg.policy.name == named["policy"]:  # not replaced by --set
        check_policy_name(cfg.policy.name, "--policy")
    if single_run:
        check_single_run(cfg)
        unused = unused_policy_keys(cfg)
        if unused and "LOCAL_RANK" not in os.environ:  # a torchrun worker: its launcher said it
            keys = ", ".join(f"policy.{k}" for k in unused)
            click.echo(f"note: {keys} {'is' if len(unused) == 1 else 'are'} not used by policy {cfg.policy.name!r} "
                       "and ignored", err=True)
    return cfg


def set_keys(overrides: tuple[str, ...]) -> set[str]:
    """The config keys the ``--set`` overrides name."""
    return {o.split("=", 1)[0].strip() for o in overrides}


def _refuse_named_and_set(named: dict[str, Any], overrides: tuple[str, ...]) -> None:
    """Refuse a named option whose key a ``--set`` sets too: one of the two would be dropped."""
    keys = set_keys(overrides)
    for key, dotted in _NAMED.items():
        if named.get(key) is not None and dotted in keys:
            flag = "--pretrained/--no-pretrained" if key == "pretrained" else "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} and --set {dotted} both given; pass one of them")


def _yaml_scalar(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


class PathOption(click.Path):
    """click's Path as a :class:`~pathlib.Path`, refusing an empty value (``Path("")`` is ``.``: an empty
    ``--out`` would write into the current folder, an empty config or checkpoint read it)."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


def check_out_path(out: Path, option: str = "--out", folder: bool = False) -> None:
    """Refuse an output ``option`` whose folder (``out`` itself with ``folder``, else the one it goes
    in) cannot be created or written, before any work, naming ``out``. Judged on the nearest folder
    that exists: a file in the way, a read-only file system, no write permission, or a probe file
    that cannot be made there (file systems whose permissions lie, such as /proc); the probe is
    removed at once."""
    from alast.training.rundir import nearest_existing, probe_write, unwritable

    out = Path(out)
    where = nearest_existing(out if folder else out.parent)
    fix = f"choose a writable {option}"
    if not where.is_dir():
        raise ValueError(f"cannot write {option} {out}: {where} is a file, not a folder; {fix}")
    why = unwritable(where)
    if why:
        raise ValueError(f"cannot write {option} {out} ({why}); {fix}")
    why = probe_write(where)
    if why:
        raise ValueError(f"cannot write {option} {out} (no file can be created in {where}: {why}); {fix}")
