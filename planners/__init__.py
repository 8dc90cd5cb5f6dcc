"""Budget policies and cost planning for ALaST. Pure Python: this package never imports torch."""
from . import policies as _policies  # noqa: F401  (registers the built-in policies)
from .registry import PlannerError, available_planners, create_planner, planner_options, register_planner
from .rules import kept_token_counts, schedule_from_steps, schedule_window
from .types import Budget, Observation, Planner, StepResult

__all__ = [
    "Budget", "Observation", "Planner", "PlannerError", "StepResult", "available_planners",
    "create_planner", "kept_token_counts", "planner_options", "register_planner", "schedule_from_steps",
    "schedule_window",
]
