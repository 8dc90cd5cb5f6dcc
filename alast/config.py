"""The run configuration: read from YAML, overridden with ``section.key=value`` strings (values parsed
as YAML), validated against the schema (:mod:`alast.config_schema`, whose models this module
exports), and written back as a run's ``config.yaml``.
"""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alast.config_schema import (
    EARLY_FRAC,
    MIN_OPSET,
    AlastConfig,
    BackendConfig,
    ConfigError,
    DataConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PolicyConfig,
    TrainConfig,
)

__all__ = ["EARLY_FRAC", "MIN_OPSET", "AlastConfig", "BackendConfig", "ConfigError", "DataConfig", "ExportConfig",
           "LoraConfig", "ModelConfig", "OutputConfig", "PolicyConfig", "TrainConfig", "apply_overrides",
           "build_config", "build_run_config", "check_policy_name", "check_single_run", "dump_config",
           "load_config", "load_run_config", "parse_override", "read_yaml", "with_absolute_paths"]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    if first["type"] == "extra_forbidden":
        close = _close_keys(loc)
        hint = f"did you mean '{close}'? " if close else ""
        return f"unknown config key '{loc}'; {hint}check the spelling (every key: docs/usage.md#configuration, alast/config_schema.py)"
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    where = f"'{loc}'" if loc else "config"
    return f"invalid value for {where}: {msg}{shown}"


def _config_keys(section: Any = AlastConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema, sections included (``policy.lora.rank``)."""
    keys = []
    for name, field in section.model_fields.items():
        keys.append(prefix + name)
        for kind in (field.annotation, *typing.get_args(field.annotation)):  # LoraConfig | None too
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys += _config_keys(kind, f"{prefix}{name}.")
                break
    return keys


# keys users write for one of ours (other tools' names): the hint names ours, not the nearest spelling
KEY_SYNONYMS = {"data.name": "data.spec", "data.dataset": "data.spec", "data.path": "data.spec",
                "data.root": "data.data_dir", "model.arch": "model.name", "train.batch": "train.batch_size",
                "train.learning_rate": "train.lr", "train.max_steps": "train.steps", "train.epoch": "train.epochs"}


def _close_keys(key: str) -> str | None:
    """The schema's key ``key`` was meant as: another tool's name for it (:data:`KEY_SYNONYMS`), one
    ending in it (``lora`` -> ``policy.lora``), else the closest spelling."""
    if key in KEY_SYNONYMS:
        return KEY_SYNONYMS[key]
    keys = _config_keys()
    ending = [k for k in keys if k.endswith("." + key)]
    if ending:
        return ending[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return close[0] if close else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.steps=200'`` -> (['train', 'steps'], 200). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"malformed --set {text!r}: expected section.key=value, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"malformed --set {text!r}: the key must name a section, e.g. train.steps=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        tag = _tag_problem(exc)
        why = f"{tag}; give a plain value" if tag else f"value is not valid YAML ({exc.__class__.__name__})"
        raise ConfigError(f"malformed --set {text!r}: {why}") from None
    return parts, value


def _tag_problem(exc: yaml.YAMLError) -> str | None:
    """What is wrong with the YAML tag that ``exc`` (from ``yaml.safe_load``) refused, or None when
    it is not about a tag."""
    if not isinstance(exc, yaml.constructor.ConstructorError):
        return None
    found = re.search(r"tag '([^']*)'", str(exc.problem))
    if found is None:
        return None
    tag = found.group(1).replace("tag:yaml.org,2002:", "!!")
    if tag.startswith("!!python/"):
        return f"YAML tags that build Python objects ({tag}) are not allowed"
    return f"unknown YAML tag {tag}"


def _section_model(model: type[BaseModel] | None, key: str) -> tuple[bool, type[BaseModel] | None, bool]:
    """Whether ``key`` is a field of the section ``model``, the section it holds (None: a value), and
    whether that section may be null (``policy.lora``)."""
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return False, None, False
    args = typing.get_args(field.annotation) or (field.annotation,)
    sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return True, (sections[0] if sections else None), type(None) in args


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node: dict[str, Any] = data
        model: type[BaseModel] | None = AlastConfig
        for i, p in enumerate(parts[:-1]):
            key = ".".join(parts[:i + 1])
            known, section, _ = _section_model(model, p)
            if known and section is None:
                raise ConfigError(f"cannot set {text!r}: '{key}' is a value, not a section; set it with "
                                  f"--set {key}=VALUE")
            child = node.get(p)
            if child is None:  # absent, or an empty section
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {text!r}: '{key}' is a value ({child!r}) in the config, but it is "
                                  "a section; write its keys under it")
            node, model = child, section
        node[parts[-1]] = value
    return data


def _check_sections(data: dict[str, Any], path: Path, model: type[BaseModel] | None = None,
                    prefix: str = "") -> None:
    """Read an empty section of the config file ``path`` as an empty one (its defaults), and refuse a
    section given a value, naming it (nested sections included)."""
    for key, value in data.items():
        _, section, optional = _section_model(model or AlastConfig, key)
        if section is None:
            continue
        if value is None and not optional:
            data[key] = {}
        elif isinstance(value, dict):
            _check_sections(value, path, section, f"{prefix}{key}.")
        elif value is not None:
            raise ConfigError(f"'{prefix}{key}' in {path} must be a section (its keys indented under it), not "
                              f"{value!r}; fix the file")


def _check_steps_or_epochs(data: dict[str, Any]) -> None:
    """Refuse a config that sets both ``train.steps`` and ``train.epochs`` (one would be ignored), or
    neither (``steps`` null without ``epochs``: the run's length would be unknown)."""
    train = data.get("train")
    if not isinstance(train, dict):
        return
    if train.get("steps") is not None and train.get("epochs") is not None:
        raise ConfigError(f"train.steps ({train['steps']!r}) and train.epochs ({train['epochs']!r}) are both set; "
                          "set one of them to null (e.g. --set train.epochs=null)")
    if "steps" in train and train["steps"] is None and train.get("epochs") is None:
        raise ConfigError("train.steps is null and train.epochs is not set: set one of them (e.g. --steps 150 or "
                          "--epochs 3)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML keeps the last copy,
    so a section written twice would lose the first one's keys without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue  # the schema has string keys only; validation names any other
            if key in seen:
                raise DuplicateKeyError(key, seen[key], key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.again = key, first, again


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}; check the path or run without a config for the demo")
    if path.is_dir():
        raise ConfigError(f"config path is a directory: {path}; pass a .yaml file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text; is it a YAML file?") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except DuplicateKeyError as exc:
        raise ConfigError(f"{exc.key!r} is given twice in {path} (lines {exc.first.line + 1} and "
                          f"{exc.again.line + 1}), and only one would count; merge them into one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        tag = _tag_problem(exc)
        if tag:
            raise ConfigError(f"{tag} in {path}{where}; write plain values (numbers, strings, lists, "
                              "mappings)") from None
        raise ConfigError(f"YAML syntax error in {path}{where}; fix the file and retry") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (model:, data:, train:, ...)")
    return data


def build_config(data: dict[str, Any], new: bool = False) -> AlastConfig:
    """``data`` validated. ``new``: the config of a new run (file, options, --set), also held to
    what the run's export will accept, rather than a run's saved config, read back as written."""
    try:
        return AlastConfig.model_validate(data, context={"new": new})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> AlastConfig:
    """Read ``path`` (or start from the defaults), apply ``overrides``, validate."""
    data = read_yaml(path) if path is not None else {}
    if path is not None:
        _check_sections(data, path)
    data = apply_overrides(data, list(overrides or []))
    _check_steps_or_epochs(data)
    return build_config(data, new=True)


# Defaults changed since runs were written without these keys: a run's config.yaml that lacks one
# was trained with the value here, and is read back with it (export, evaluation and resume).
EARLIER_DEFAULTS: dict[str, dict[str, Any]] = {"policy": {"token_select": "top", "token_score": "attention",
                                                           "trim_last": False, "spare_first": 0, "early_frac": 0.0,
                                                           "dense_final_interleave": False,
                                                           "token_temperature": 1.0}}


def build_run_config(data: dict[str, Any]) -> AlastConfig:
    """A config saved by a run (its config.yaml or a checkpoint's copy), validated; keys it lacks
    take :data:`EARLIER_DEFAULTS`."""
    data = dict(data)
    for section, earlier in EARLIER_DEFAULTS.items():
        values = data.get(section)
        if values is None or isinstance(values, dict):
            data[section] = {**earlier, **(values or {})}
    return build_config(data)


RUN_SECTIONS = ("model", "data", "policy", "train")  # what every run's config.yaml holds (with more)


def load_run_config(path: Path) -> AlastConfig:
    """A run's saved ``config.yaml`` (see :func:`build_run_config`). A run saves every section; one
    without any of :data:`RUN_SECTIONS` is not that file (an emptied one would read as the defaults:
    another model, data or policy than the run's)."""
    data = read_yaml(path)
    lacking = [s for s in RUN_SECTIONS if not isinstance(data.get(s), dict)]
    if lacking:
        what = "is empty" if not data else f"lacks its {', '.join(lacking)} section{'s' if len(lacking) > 1 else ''}"
        raise ConfigError(f"{path} {what}: it is not the config the run saved; restore it, or rerun the training")
    return build_run_config(data)


def with_absolute_paths(cfg: AlastConfig) -> AlastConfig:
    """``cfg`` with its local paths (an ``imagefolder:`` spec, ``data.data_dir``, ``model.checkpoint``)
    made absolute from the current directory, so that a run's saved config finds its data and
    weights from any directory (``alast eval``, ``export``, ``--resume``); a ``model.checkpoint``
    directory becomes the weights file in it (:func:`alast.models.weights_in_directory`)."""
    kind, sep, path = cfg.data.spec.partition(":")
    if kind == "imagefolder" and sep and path:
        cfg.data.spec = f"imagefolder:{Path(path).expanduser().absolute()}"
    if cfg.data.data_dir is not None:
        cfg.data.data_dir = Path(cfg.data.data_dir).expanduser().absolute()
    if cfg.model.checkpoint is not None:
        cfg.model.checkpoint = Path(cfg.model.checkpoint).expanduser().absolute()
        if cfg.model.checkpoint.is_dir():  # the run records, and a resume compares, the file itself
            from alast.data.common import say_once
            from alast.models import weights_in_directory

            found = weights_in_directory(cfg.model.checkpoint)
            say_once([f"checkpoint {cfg.model.checkpoint} is a directory: loading {found.name} from it"])
            cfg.model.checkpoint = found
    return cfg


def check_policy_name(name: str, where: str = "policy.name") -> None:
    """Refuse an unknown policy name (a registered planner, ``lora``, or either with ``+lora``)."""
    from planners import available_planners

    known = available_planners()
    if ("full" if name == "lora" else name.removesuffix("+lora")) not in known:
        head, plus, tail = str(name).partition("+")
        swapped = f"{tail}+{head}" if plus and head == "lora" else str(name)  # lora+alast: alast+lora
        close = difflib.get_close_matches(swapped, [*known, "lora", *(f"{k}+lora" for k in known)], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown policy {name!r} in {where}; {hint}choose from: {', '.join(known)}, lora, or a "
                          "policy with +lora (e.g. alast+lora)")


# policy.* keys that are planner options of the same name: a planner that does not take one ignores it
PLANNER_KEYS = ("alpha", "b_init", "b_min", "b_max", "k_trained", "freeze_mode", "delta_reduction", "min_tokens",
                "keep_ratio", "dense_final_frac", "dense_final_blocks", "dense_final_interleave", "rule", "gain",
                "ema", "spare_first", "early_frac", "trim_last")


def unused_policy_keys(cfg: AlastConfig) -> list[str]:
    """The ``policy.*`` keys set (in the config or with ``--set``) that the policy's planner does not
    take, so that the run ignores them (``policy.k_trained`` under ``lora``, ``keep_ratio`` under ``alast``)."""
    from planners import planner_options

    taken = set(planner_options(cfg.policy.planner))
    fields = type(cfg.policy).model_fields  # a run's config.yaml lists every key: only a value off its default asks
    return [k for k in PLANNER_KEYS if k in cfg.policy.model_fields_set and k not in taken
            and getattr(cfg.policy, k) != fields[k].get_default(call_default_factory=True)]


def check_single_run(cfg: AlastConfig) -> None:
    """Refuse settings that one run (``alast train``, ``alast plan``) would not honour as written."""
    p = cfg.policy
    check_policy_name(p.name)
    if p.lora is not None and not (p.name == "lora" or p.name.endswith("+lora")):
        lora = "lora" if p.name == "full" else f"{p.name}+lora"
        raise ConfigError(f"policy.lora is set but policy {p.name!r} does not use LoRA; use --policy {lora}, "
                          "or drop the policy.lora settings")


def dump_config(cfg: AlastConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
