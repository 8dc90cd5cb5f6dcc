"""Values that flow between the planner and the runtimes.

All of them are frozen dataclasses of plain numbers so they can be logged, compared and
checkpointed without torch. Block indices are 0-based, in forward order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Budget:
    """What one training step may spend, per transformer block.

    keep_ratios: fraction of the *current* patch tokens kept after each block (1.0 keeps all, 0.0
        keeps ``min_tokens``). Dropping is cumulative: block l+1 sees only what block l kept.
    trained: whether each block receives weight gradients and an optimizer update this step.
    min_tokens: floor on the number of patch tokens kept after any block.
    token_multiple: kept counts are rounded down to a multiple of this (never below ``min_tokens``);
        1 keeps exact counts. The runtime must round the same way (``check_budget`` refuses otherwise).
    budgets: the planner's raw per-block budgets (ALaST's b_l), for logging; equal to keep_ratios
        for the static policies.
    train_embeddings: whether the embeddings (every parameter that feeds block 0: patch embedding,
        class/register/distillation tokens, position embedding, pre-norm) are trained this step
        (where the run trains them at all). False: the backward stops at the lowest trained block.
    """

    keep_ratios: tuple[float, ...]
    trained: tuple[bool, ...]
    min_tokens: int = 1
    budgets: tuple[float, ...] = field(default=())
    token_multiple: int = 1
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        if len(self.keep_ratios) != len(self.trained):
            raise ValueError("keep_ratios and trained must have one entry per block")
        if any(not (0.0 <= r <= 1.0) for r in self.keep_ratios):
            raise ValueError(f"keep ratios must lie in [0, 1], got {self.keep_ratios}")
        if self.min_tokens < 1:
            raise ValueError("min_tokens must be >= 1")
        if self.token_multiple < 1:
            raise ValueError("token_multiple must be >= 1")

    @property
    def num_blocks(self) -> int:
        return len(self.trained)

    @property
    def trained_blocks(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.trained) if t)

    @property
    def drops_tokens(self) -> bool:
        return any(r < 1.0 for r in self.keep_ratios)

    @property
    def freezes_blocks(self) -> bool:
        return not all(self.trained)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Observation:
    """What the runtime measured in one step, fed back to the planner.

    deltas: per-block class-token change ||CLS_l - CLS_{l-1}||^2, already reduced over the batch
        (and across ranks when training data-parallel).
    """

    step: int
    progress: float
    deltas: tuple[float, ...]
    loss: float = float("nan")


@dataclass(frozen=True)
class StepResult:
    """What one executed training step did.

    kept_tokens: patch tokens leaving each block (after selection); the input of block l+1.
    tokens_in: patch tokens entering each block.
    train_flops: flops (2 per multiply-add) of forward+backward, counted by the runtime, or None
        when this step was not counted.
    memory_measured: whether the runtime measured this step's peak memory (CPU runtimes sample).
    compile_time_s: seconds this step spent compiling (torch.compile), excluded from step_time_s.
    embeddings_trained: whether the step trained the embeddings (see :class:`Budget`).
    loss_scale: the loss scale of an fp16 step's backward (None without one); ``update_skipped``: its
        gradients overflowed, so the weights were left as they were.
    cached_images: images whose frozen bottom blocks' outputs were read from the runtime's cache
        instead of computed (:meth:`~runtimes.torch_backend.runtime.TorchRuntime.enable_frozen_cache`).
    """

    loss: float
    deltas: tuple[float, ...]
    tokens_in: tuple[int, ...]
    kept_tokens: tuple[int, ...]
    trained_blocks: tuple[int, ...]
    batch_size: int
    step_time_s: float
    train_flops: float | None = None
    memory_measured: bool = False
    compile_time_s: float = 0.0
    embeddings_trained: bool = True
    loss_scale: float | None = None
    update_skipped: bool = False
    cached_images: int = 0


@runtime_checkable
class Planner(Protocol):
    """Decides each step's :class:`Budget` and learns from each step's :class:`Observation`."""

    name: str
    num_blocks: int

    def plan(self, step: int, progress: float) -> Budget: ...

    def observe(self, observation: Observation) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
