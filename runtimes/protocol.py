"""The runtime interface every backend implements, and the loop's check of a budget against it."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from planners import Budget, StepResult


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can honour. The loop refuses budgets that need more, never approximates."""

    dynamic_tokens: bool
    per_step_freezing: bool
    lora: bool
    data_parallel: bool


class RuntimeError_(RuntimeError):
    """A failure while running (not bad input): exit code 1."""


class NonFiniteLoss(RuntimeError_):
    def __init__(self, step: int, loss: float) -> None:
        # ``step`` counts from 0, as metrics.jsonl does; the progress bar counts from 1
        super().__init__(f"loss became {loss} at step {step + 1} (metrics.jsonl step {step}); "
                         "lower train.lr or check the data")
        self.step, self.loss = step, loss


class LossScaleCollapse(NonFiniteLoss):
    """fp16's gradients overflowed on many steps in a row: the loss scale keeps halving and the weights
    stop moving."""

    def __init__(self, step: int, in_a_row: int, scale: float | None) -> None:
        RuntimeError_.__init__(self, f"fp16 gradients overflowed on {in_a_row} steps in a row, to step {step + 1} "
                               f"(metrics.jsonl step {step}; loss scale now {(scale or 0) / 2:g}), so none of "
                               "them trained; use backend.precision=bf16 on a GPU with bf16 (Ampere or later) "
                               "or fp32, or lower train.lr")
        self.step, self.loss = step, float("nan")


@runtime_checkable
class Runtime(Protocol):
    name: str
    capabilities: Capabilities
    num_blocks: int
    num_patches: int

    def train_step(self, images: Any, labels: Any, budget: Budget, lr: float, step: int) -> StepResult:
        """One step on a batch: ``images`` float32 ``[B, C, H, W]`` or 8-bit
        :class:`~runtimes.images.Pixels` (as in :meth:`evaluate`'s batches), ``labels`` class indices."""

    def evaluate(self, batches: Iterable[tuple[Any, Any]], kept: Sequence[int] | None = None) -> dict[str, float]:
        """Accuracy, mean loss and sample count in eval mode, on every token or, with ``kept``, on
        that token schedule (:mod:`runtimes.token_schedule`)."""

    def full_ft_step_flops(self, batch_size: int) -> float | None: ...

    def peak_memory_bytes(self) -> int | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export_model(self) -> Any: ...


def check_budget(runtime: Runtime, budget: Budget) -> None:
    caps = runtime.capabilities
    if budget.num_blocks != runtime.num_blocks:
        raise ValueError(f"budget has {budget.num_blocks} blocks, the model {runtime.num_blocks}")
    if budget.drops_tokens and not caps.dynamic_tokens:
        raise ValueError(f"the {runtime.name} runtime cannot drop tokens; choose a policy without token dropping")
    multiple = getattr(runtime, "token_multiple", 1)
    if budget.drops_tokens and budget.token_multiple != multiple:
        raise ValueError(f"the budget rounds kept tokens to multiples of {budget.token_multiple}, the "
                         f"{runtime.name} runtime to multiples of {multiple}; set both from backend.token_multiple")
    if budget.freezes_blocks and not caps.per_step_freezing:
        raise ValueError(f"the {runtime.name} runtime cannot freeze blocks per step")


def pass_sizes(batch_size: int, micro_batch: int | None) -> list[int]:
    """The images of each forward and backward pass of a step of ``batch_size`` images under
    ``train.micro_batch_size`` (gradient accumulation): one pass without it (None), else passes of
    ``micro_batch`` and a last one of the rest."""
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"train.micro_batch_size must be >= 1, got {micro_batch}")
    size = batch_size if micro_batch is None else min(micro_batch, batch_size)
    return [min(size, batch_size - start) for start in range(0, batch_size, size)]
