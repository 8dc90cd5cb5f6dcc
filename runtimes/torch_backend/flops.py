"""FLOP counting with ``torch.utils.flop_counter`` (2 flops per multiply-add), attention included.

In torch 2.14 the CPU flash-attention kernels behind ``scaled_dot_product_attention`` are missing
from the counter's registry and count as 0; register them with the same formula as the other
SDPA kernels.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils import flop_counter as fc

from planners.countfit import StepCounts
from planners.rules import flop_count_keys

_REGISTERED = False


def register_cpu_sdpa() -> None:
    """Teach FlopCounterMode the CPU flash-attention forward and backward ops (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd.default not in fc.flop_registry:

        def fwd_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

        fc.register_flop_formula(fwd, get_raw=True)(fwd_flops)
    if bwd is not None and bwd.default not in fc.flop_registry:

        def bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

        fc.register_flop_formula(bwd, get_raw=True)(bwd_flops)
    _REGISTERED = True


def counter() -> fc.FlopCounterMode:
    register_cpu_sdpa()
    return fc.FlopCounterMode(display=False)


def name_modules(fc: fc.FlopCounterMode, root: nn.Module) -> None:
    """Name ``root``'s modules in ``fc`` as a forward through ``root`` names them, for a step that calls
    some of its blocks directly (above the frozen blocks' cache): its per-block counts then carry the
    names :class:`StepFlopCache` reads. (torch's ModuleTracker names a module on entry, from the
    modules entered before it; where that internal is missing, the names do not match and the step's
    pieces are not stored: the counts stay right, such steps are counted each time.)"""
    tracker = getattr(fc, "mod_tracker", None)
    if tracker is not None and hasattr(tracker, "_get_mod_name"):
        tracker._get_mod_name(root)


class StepFlopCache:
    """Counted flops of a training step, assembled from per-block counts.

    A block's counted flops depend only on (batch, tokens in, tokens kept (a block that selects
    inside computes the kept ones only), whether it is trained, whether anything below it, a block
    or the embeddings, is trained); the rest of the model (embedding, head) only on (batch, tokens
    leaving the last block, whether the embeddings are trained). A piece counted before is read
    back; one never counted is solved exactly from counted pieces of its kind once they determine
    its polynomial in the token counts and further counts agreed with it
    (:class:`planners.countfit.StepCounts`). A step whose every piece is known is not counted: it
    can run compiled and with no counter dispatch overhead. Otherwise it runs eagerly under the
    counter once, and its pieces are read from the counter's per-module totals (tested equal to a
    fresh count of the whole step). The backend's precision and LoRA are fixed for a run, so they
    are not part of the key.
    """

    def __init__(self, block_names: list[str]) -> None:
        self.block_names = block_names
        self.counts = StepCounts()

    keys = staticmethod(flop_count_keys)  # the planner predicts which steps are counted with the same keys

    def lookup(self, keys: tuple[list[tuple], tuple]) -> float | None:
        return self.counts.lookup(keys)

    def record(self, fc: fc.FlopCounterMode, keys: tuple[list[tuple], tuple], skipped: list[float] | None = None,
               skipped_rest: float = 0.0) -> float:
        """Store the pieces of a step just counted by ``fc``; returns its total. ``skipped``: the counts
        the first blocks would have had had they run under ``fc`` (a step that started above them, read
        from a cache), and ``skipped_rest`` the embeddings'; the pieces stored are the whole step's."""
        counts = {name: sum(ops.values()) for name, ops in fc.get_flop_counts().items()}
        total = float(fc.get_total_flops())
        for name, flops in zip(self.block_names, skipped or ()):
            counts[name] = counts.get(name, 0) + flops
        # A block name the counter did not report means the names do not match: cache nothing.
        if all(name in counts for name in self.block_names):
            per_block = [float(counts[name]) for name in self.block_names]
            self.counts.record(keys, per_block, total + sum(skipped or ()) + skipped_rest - sum(per_block))
        return total


@contextlib.contextmanager
def grad_flags_restored(params: Iterable[nn.Parameter], clear_grads: bool = False,
                        set_to: bool | None = None) -> Iterator[list[nn.Parameter]]:
    """Let a measurement switch parameters' ``requires_grad`` freely (``set_to``: every one set so on
    entry): each flag is put back on exit (and, with ``clear_grads``, the gradients the measurement
    left are dropped)."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        if set_to is not None:
            for p in params:
                p.requires_grad_(set_to)
        yield params
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            if clear_grads:
                p.grad = None
