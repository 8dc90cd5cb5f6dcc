"""Mixed precision for the torch runtime: bf16 autocast on CUDA and on CPUs with bf16 matrix
instructions, and fp16 autocast with loss scaling on CUDA (GPUs without bf16: T4, V100).

On a CPU with AVX-512 BF16 or AMX, oneDNN multiplies bf16 matrices in hardware: full fine-tuning
of ViT-B/16 or DeiT-S steps about twice as fast as in fp32 (``python benchmarks/cpu_bf16.py``).
torch's CPU flash attention is the exception. With its backward it takes 1.03x-3.6x its fp32 time
(fp32 with the casts there and back) with every query, 1.5x-5.1x with fewer queries than keys, as
in a block that drops tokens; its forward alone takes 0.42x-0.68x (``python benchmarks/cpu_bf16.py
--attention``, docs/results/cpu_bf16_attention.json). So under CPU autocast an attention that will
be differentiated runs in fp32 and hands bf16 back; one without gradient stays in bf16. On a CPU
without the instructions bf16 is emulated, slower than fp32, and refused, as it is on a GPU before
Ampere, where fp16 is the half precision that runs at speed.

fp16's range ends at 65504, so its gradients are computed on a scaled loss
(``torch.amp.GradScaler``): a step whose gradients overflow is not applied and the scale halves.
On CUDA the fused AdamW reads the scaler's overflow flag on the device, so no step waits on it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


PRECISIONS = ("fp32", "bf16", "fp16")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_bf16(device: torch.device, setting: str = "backend.precision") -> None:
    """Refuse bf16 autocast (ValueError, naming ``setting``) on a device where it would not pay."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        raise ValueError(f"{setting}=bf16 on this CPU: it has no bf16 matrix instructions (AVX-512 BF16 "
                         f"or AMX), so bf16 would run slower than fp32; use {setting}=fp32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{setting}=bf16 on {torch.cuda.get_device_name(device)}: the GPU has no bf16 "
                         f"arithmetic (it came with Ampere), so bf16 would be emulated; use {setting}=fp16")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{setting}=bf16 is for CUDA devices and CPUs, not {device.type}; use fp32")


def check_fp16(device: torch.device, setting: str = "backend.precision") -> None:
    """Refuse fp16 autocast (ValueError, naming ``setting``) off CUDA: a CPU multiplies fp16 matrices
    no faster than fp32 ones (bf16 is the CPU's half precision)."""
    if device.type != "cuda":
        raise ValueError(f"{setting}=fp16 is for CUDA GPUs (with loss scaling), not the {device.type}; use "
                         f"{setting}=fp32, or bf16 on a CPU with AVX-512 BF16 or AMX")


def check_precision(device: torch.device, precision: str, setting: str = "backend.precision") -> None:
    """Refuse ``precision`` (ValueError, naming ``setting``) on a device where it cannot run or would
    not pay."""
    if precision not in PRECISIONS:
        raise ValueError(f"{setting}={precision} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        check_bf16(device, setting)
    elif precision == "fp16":
        check_fp16(device, setting)


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The gradient scaler fp16 needs (its defaults: 2**16 to start, halved on an overflow, doubled
    after 2000 steps without one); None for fp32 and bf16, whose range is fp32's."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


_FP32_WRAPPERS: dict[Callable, Callable] = {}


def _differentiated_attention_in_fp32(sdpa: Callable) -> Callable:
    """``sdpa``, in fp32 where a gradient will flow through it (its output back in the queries' dtype).
    One wrapper per ``sdpa``, made once: compiled blocks (``backend.compile``) guard on the function
    they traced, and a new one every step would recompile them every step."""
    if sdpa in _FP32_WRAPPERS.values():
        return sdpa  # entered inside another CPU autocast: already wrapped
    if sdpa in _FP32_WRAPPERS:
        return _FP32_WRAPPERS[sdpa]

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if not grad or query.dtype == torch.float32:
            return sdpa(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            out = sdpa(query.float(), key.float(), value.float(), attn_mask, *args, **kwargs)
        return out.to(query.dtype)

    _FP32_WRAPPERS[sdpa] = attention
    return attention


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on ``device`` (nothing for fp32). On a CPU,
    ``F.scaled_dot_product_attention`` (which timm's blocks and alast's call through ``F``) runs in
    fp32 meanwhile where it will be differentiated, and is put back on exit."""
    return _half_autocast(device, HALF[precision]) if precision in HALF else contextlib.nullcontext()


@contextlib.contextmanager
def _half_autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype):
        if device.type != "cpu":
            yield
            return
        sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _differentiated_attention_in_fp32(sdpa)
        try:
            yield
        finally:
            F.scaled_dot_product_attention = sdpa
