"""A launched training step whose loss and deltas are still on the device.

On CUDA, reading a loss with ``float()`` or deltas with ``.tolist()`` makes the host wait until the
device has finished the step, so the host cannot queue the next step meanwhile and the GPU idles
between steps (a launch-bound ViT step spends much of its time there). A :class:`PendingStep`
instead starts one asynchronous copy of the loss and the per-sample deltas into pinned host memory
and records an event; :meth:`PendingStep.resolve` waits on that event only. The loop resolves step
i after it has launched step i+1, so the device is never starved (see docs/gpu.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from planners import StepResult
from planners.rules import reduce_deltas

from ..protocol import NonFiniteLoss


@dataclass
class DeviceTimer:
    """Step time without a host sync: CUDA events on the device, the host clock on the CPU."""

    start: Any
    end: Any = None

    @classmethod
    def begin(cls, device: torch.device) -> "DeviceTimer":
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return cls(ev)
        return cls(time.perf_counter())

    def stop(self) -> None:
        if isinstance(self.start, float):
            self.end = time.perf_counter()
        else:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()

    def seconds(self) -> float:
        if isinstance(self.start, float):
            return self.end - self.start
        return self.start.elapsed_time(self.end) / 1000.0  # waits for the end event only


@dataclass
class PendingStep:
    """What a launched step produced; :meth:`resolve` turns it into a :class:`StepResult`.

    ``values`` holds ``[loss per rank..., deltas [L, B] flattened]`` (float32), then with fp16 the
    loss scale before and after the step, on the host once ``ready`` has fired. The token counts,
    trained blocks and counted flops are host values known at launch.
    """

    step: int
    values: torch.Tensor
    ready: Any
    ranks: int
    num_blocks: int
    reduction: str
    timer: DeviceTimer
    fields: dict[str, Any]
    compile_time_s: float = 0.0
    scaled: bool = False
    _result: StepResult | None = None

    @classmethod
    def launch(cls, step: int, loss: torch.Tensor, deltas: torch.Tensor, comm: Any, reduction: str,
               timer: DeviceTimer, fields: dict[str, Any], compile_time_s: float,
               scales: torch.Tensor | None = None) -> "PendingStep":
        """Gather across ranks on the device, then one non-blocking copy to pinned host memory.
        ``scales``: fp16's loss scale before and after the step (the same on every rank)."""
        loss = loss.detach().float().reshape(1, 1)
        if comm is not None:
            loss, deltas = comm.gather_batch(loss), comm.gather_batch(deltas)
        parts = [loss.flatten(), deltas.detach().float().flatten()]
        packed = torch.cat(parts if scales is None else [*parts, scales.to(parts[0].device)])
        ready = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            packed = host
        return cls(step, packed, ready, int(loss.numel()), int(deltas.shape[0]), reduction, timer, fields,
                   compile_time_s, scales is not None)

    def resolve(self) -> StepResult:
        """Wait for this step's copy (not for later steps), check the loss, reduce the deltas."""
        if self._result is not None:
            return self._result
        if self.ready is not None:
            self.ready.synchronize()
        flat = self.values.tolist()
        scaling = {}
        if self.scaled:
            (before, after), flat = flat[-2:], flat[:-2]
            scaling = {"loss_scale": before, "update_skipped": after < before}  # the scale halves on an overflow
        loss = sum(flat[: self.ranks]) / self.ranks
        if not math.isfinite(loss):
            raise NonFiniteLoss(self.step, loss)
        rows = flat[self.ranks:]
        width = len(rows) // max(self.num_blocks, 1)
        deltas = tuple(reduce_deltas(rows[i * width:(i + 1) * width], self.reduction)
                       for i in range(self.num_blocks))
        step_time = max(self.timer.seconds() - self.compile_time_s, 0.0)
        self._result = StepResult(loss=loss, deltas=deltas, step_time_s=step_time,
                                  compile_time_s=self.compile_time_s, **scaling, **self.fields)
        return self._result
