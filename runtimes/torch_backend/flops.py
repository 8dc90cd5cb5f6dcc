"""FLOP counting with ``torch.utils.flop_counter`` (2 flops per multiply-add), attention included.

In torch 2.14 the CPU flash-attention kernels behind ``scaled_dot_product_attention`` are missing
from the counter's registry and count as 0; register them with the same formula as the other
SDPA kernels.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter as fc

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
