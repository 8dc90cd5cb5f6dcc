"""The runtime registry: a backend name -> a factory building that backend's runtime.

A factory takes the run's configuration (read by attribute: ``cfg.train.lr``, ``cfg.backend.device``
...), the timm model and the optional data-parallel communicator; a backend may register a check of
the configuration too, which a run calls before it loads data (:func:`check_runtime_config`), so that
what the backend would refuse stops the run at once. Backends register themselves when
their module is imported; :func:`create_runtime` imports the built-in ones on demand, so a missing
optional dependency (ONNX Runtime Training) only matters to whoever asks for that backend.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

RUNTIMES: dict[str, Callable[..., Any]] = {}
CHECKS: dict[str, Callable[[Any], None]] = {}
BUILTIN = {"torch": "runtimes.torch_backend.runtime", "ort": "runtimes.ort_backend.runtime"}


def register_runtime(name: str, check: Callable[[Any], None] | None = None):
    """Decorator: register ``factory(cfg, model, comm=None)`` under ``name`` (a duplicate is an error),
    with ``check(cfg)``, which raises ValueError on what the backend refuses."""
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in RUNTIMES:
            raise ValueError(f"runtime {name!r} is already registered")
        RUNTIMES[name] = factory
        if check is not None:
            CHECKS[name] = check
        return factory

    return deco


def available_runtimes() -> list[str]:
    return sorted(set(RUNTIMES) | set(BUILTIN))


def _load(name: str) -> None:
    """Import the built-in backend ``name``; ValueError (bad input) if it is unknown or cannot load here."""
    if name not in RUNTIMES and name in BUILTIN:
        try:
            importlib.import_module(BUILTIN[name])
        except ImportError as exc:
            raise ValueError(f"--backend {name} is unavailable: {exc}") from None
    if name not in RUNTIMES:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(available_runtimes())}")


def check_runtime_config(name: str, cfg: Any) -> None:
    """Refuse (ValueError) what the ``name`` backend would refuse of ``cfg``, before anything is loaded."""
    _load(name)
    if name in CHECKS:
        CHECKS[name](cfg)


def create_runtime(name: str, cfg: Any, model: Any, comm: Any = None) -> Any:
    """Build the ``name`` backend; ValueError (bad input) if it is unknown or cannot load here."""
    _load(name)
    return RUNTIMES[name](cfg, model, comm=comm)
