"""Option checks of the policies: a bad option is refused (:class:`PlannerError`) with what fits."""
from __future__ import annotations

from . import rules
from .registry import PlannerError


def check_multiple(token_multiple: int) -> int:
    if int(token_multiple) < 1:
        raise PlannerError(f"token_multiple must be >= 1, got {token_multiple}")
    return int(token_multiple)


def check_k(k: int | None, num_blocks: int, freeze_mode: str = "sample") -> int:
    k = rules.default_k_trained(num_blocks, freeze_mode) if k is None else int(k)
    if not 1 <= k <= num_blocks:
        raise PlannerError(f"k_trained must be between 1 and {num_blocks} (the model depth), got {k}")
    return k


def check_early(early_frac: float, dense_final_frac: float, freeze_mode: str) -> float:
    early_frac = float(early_frac)
    if not 0.0 <= early_frac < 1.0 or early_frac + float(dense_final_frac) >= 1.0:
        raise PlannerError(f"early_frac must lie in [0, 1) and leave steps after it and the dense final phase "
                           f"(dense_final_frac={dense_final_frac:g}), got {early_frac}")
    if early_frac and freeze_mode != "last":
        raise PlannerError(f"early_frac trains the block below the top k_trained ones: it needs "
                           f"freeze_mode='last', not {freeze_mode!r}")
    return early_frac


def check_spare(spare_first: int | str, num_blocks: int, k: int, freeze_mode: str) -> int:
    """The bottom blocks that keep every token when the top ``k`` train."""
    try:
        spare = rules.spared_blocks(spare_first, num_blocks, k, freeze_mode)
    except ValueError as e:
        raise PlannerError(str(e)) from None
    if not 0 <= spare < num_blocks:
        raise PlannerError(f"spare_first must lie in [0, {num_blocks - 1}] (blocks that keep every token), "
                           f"got {spare_first}")
    return spare


def check_alast(num_blocks, alpha, b_init, b_min, b_max, freeze_mode, delta_reduction, min_tokens,
                 dense_final_frac, rule, gain, ema, target_flops, cost_model) -> None:
    if not 0.0 <= dense_final_frac < 1.0:
        raise PlannerError(f"dense_final_frac must lie in [0, 1), got {dense_final_frac}")
    if not 0.0 < b_min <= b_max <= 1.0:
        raise PlannerError(f"need 0 < b_min <= b_max <= 1, got b_min={b_min}, b_max={b_max}")
    if not b_min <= b_init <= b_max:
        raise PlannerError(f"b_init={b_init} must lie in [b_min, b_max] = [{b_min}, {b_max}]")
    if rule not in ("normalized", "paper"):
        raise PlannerError(f"rule must be 'normalized' or 'paper', got {rule!r}")
    if alpha < 0:
        raise PlannerError(f"alpha must be >= 0, got {alpha}")
    if gain < 0:
        raise PlannerError(f"gain must be >= 0, got {gain}")
    if not 0.0 <= ema < 1.0:
        raise PlannerError(f"ema must lie in [0, 1), got {ema}")
    if freeze_mode not in ("sample", "topk", "last"):
        raise PlannerError(f"freeze_mode must be 'sample', 'topk' or 'last', got {freeze_mode!r}")
    if delta_reduction not in ("mean", "sum"):
        raise PlannerError(f"delta_reduction must be 'mean' or 'sum', got {delta_reduction!r}")
    if min_tokens < 1:
        raise PlannerError(f"min_tokens must be >= 1, got {min_tokens}")
    if target_flops is not None:
        if not target_flops > 0:
            raise PlannerError(f"target_flops must be > 0 (a fraction of full fine-tuning), got {target_flops}")
        if cost_model is None:
            raise PlannerError("target_flops needs the model's cost model: "
                               "create_planner('alast', num_blocks, cost_model=cm, target_flops=...)")
    if cost_model is not None and cost_model.num_blocks != num_blocks:
        raise PlannerError(f"cost model {cost_model.model!r} has {cost_model.num_blocks} blocks, "
                           f"the model has {num_blocks}")
