"""Planner registry: a dict, a decorator and a factory. A duplicate name is an error."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .types import Planner

_PLANNERS: dict[str, type] = {}
# Keyword arguments that are objects the caller hands over (the profiled cost model), not settings:
# create_planner accepts them, planner_options (the settings a config may hold) leaves them out.
OBJECT_ARGUMENTS = ("cost_model",)


class PlannerError(ValueError):
    """A planner was asked for with a name or option it does not have."""


def register_planner(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in _PLANNERS:
            raise PlannerError(f"planner {name!r} is already registered by {_PLANNERS[name].__name__}")
        for method in ("plan", "observe", "state_dict", "load_state_dict"):
            if not callable(getattr(cls, method, None)):
                raise PlannerError(f"planner {name!r} lacks the method {method}()")
        cls.name = name
        _PLANNERS[name] = cls
        return cls

    return decorator


def available_planners() -> list[str]:
    return sorted(_PLANNERS)


def planner_options(name: str) -> list[str]:
    """Settings the planner ``name`` accepts (besides ``num_blocks`` and the objects in
    ``OBJECT_ARGUMENTS``, which are never configuration)."""
    return [p for p in _parameters(name) if p not in OBJECT_ARGUMENTS]


def _parameters(name: str) -> list[str]:
    params = inspect.signature(_get(name).__init__).parameters
    return [p for p in params if p not in ("self", "num_blocks")]


def _get(name: str) -> type:
    if name not in _PLANNERS:
        raise PlannerError(
            f"unknown policy {name!r}; choose one of: {', '.join(available_planners())}"
        )
    return _PLANNERS[name]


def create_planner(name: str, num_blocks: int, **options: Any) -> Planner:
    """Build the planner ``name`` for a model with ``num_blocks`` blocks.

    Options the planner does not take are an error, so a typo never silently falls back to a
    default. The objects in ``OBJECT_ARGUMENTS`` (``cost_model=``, a
    :class:`~planners.costmodel.CostModel`, which alast's ``target_flops`` needs) may be passed to
    any planner; one that does not use them does not get them.
    """
    cls = _get(name)
    params = set(_parameters(name))
    options = {k: v for k, v in options.items() if k in params or k not in OBJECT_ARGUMENTS}
    accepted = set(planner_options(name))
    unknown = sorted(set(options) - params)
    if unknown:
        raise PlannerError(
            f"policy {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(num_blocks=num_blocks, **options)
