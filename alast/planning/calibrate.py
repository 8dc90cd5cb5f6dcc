"""Fit the cost model's time model to real training steps timed on this machine."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alast.models import create_model
from planners.costmodel import CostModel, TimeModel

_TIME_FEATURES = ("step", "fwd_flops", "bwd_flops", "select_blocks", "bwd_blocks")


def _calibration_budgets(num_blocks: int) -> dict[str, Any]:
    """Step shapes that pull the time features apart: tokens, trained blocks, selection."""
    from planners import Budget

    L = num_blocks
    top = tuple(i == L - 1 for i in range(L))
    half = tuple(i < max(1, L // 2) for i in range(L))

    def alast_like(frozen: int, keep: float) -> Budget:
        """ALaST's own step: the bottom blocks frozen on every token, the embeddings frozen, the
        blocks above trained and dropping. Without such steps the fit, extrapolated to them, priced
        them 7-9% high (the demo ViT at batch 32, held-out shapes)."""
        frozen = min(max(1, frozen), L - 1) if L > 1 else 0
        return Budget(tuple(1.0 if i < frozen else keep for i in range(L)), tuple(i >= frozen for i in range(L)),
                      train_embeddings=False)

    return {"full": Budget((1.0,) * L, (True,) * L), "top1": Budget((1.0,) * L, top),
            "tokens0.5": Budget((0.5,) * L, (True,) * L), "tokens0.5-top1": Budget((0.5,) * L, top),
            "tokens0.8-lowhalf": Budget((0.8,) * L, half),
            "frozen-third-tokens0.7": alast_like(L // 3, 0.7), "frozen-half-tokens0.85": alast_like(L // 2, 0.85)}


def calibrate_time(cm: CostModel, name: str, *, batch_size: int, device: str = "cpu", count_flops: str = "every",
                   lora: dict[str, Any] | None = None, reps: int = 5, extra: dict[str, Any] | None = None,
                   precision: str = "fp32") -> "TimeModel":
    """Time real training steps of the torch runtime on this machine and fit the time model.

    Seven step shapes plus ``extra`` budgets (the planned policy's own step, so the fit holds where
    it is used), ``reps`` rounds after a first round (alternating, so drift hits all alike),
    median per shape; non-negative least squares on the features of
    :class:`~planners.costmodel.TimeModel`. What a run's steps do beside training is timed too: the
    first round's steps are the first of their shape, counted under the FLOP counter (where
    ``count_flops`` is ``every``), its first step is the runtime's first; and one more round
    measures memory on every step (CPU).
    """
    import statistics

    from scipy.optimize import nnls

    from planners.simulate import StepShape, step_cost
    from runtimes.torch_backend.runtime import TorchRuntime

    torch.manual_seed(0)
    model = create_model(name, cm.num_classes, pretrained=False, img_size=cm.img_size)  # timing needs no weights
    # Memory is measured on the first step (the heaviest shape, so that no later step is measured
    # for being heavier than every measured one) and in the last round.
    probing = [False]
    rt = TorchRuntime(model, lr=1e-4, weight_decay=0.05, grad_clip=1.0, device=device, count_flops=count_flops,
                      lora=lora, memory_probe_steps=lambda s: probing[0] or s == 0, precision=precision)
    x = torch.randn(batch_size, 3, cm.img_size, cm.img_size)
    y = torch.randint(0, max(cm.num_classes, 1), (batch_size,))
    budgets = {**_calibration_budgets(cm.num_blocks), **(extra or {})}
    times: dict[str, list[float]] = {k: [] for k in budgets}
    first: dict[str, float] = {}  # round 0: each shape's first step, counted
    probed: dict[str, float] = {}  # the last round: memory measured
    probe_round = reps + 1 if rt.device.type == "cpu" else None
    for rnd in range(reps + 2 if probe_round else reps + 1):
        probing[0] = rnd == probe_round
        rt.force_count = rnd == 0  # a shape solved from others' counts would run uncounted
        for i, (key, budget) in enumerate(budgets.items()):
            t = rt.train_step(x, y, budget, 1e-4, rnd * len(budgets) + i).step_time_s
            if rnd == 0:
                first[key] = t
            elif probing[0]:
                probed[key] = t
            else:
                times[key].append(t)
    plain = {key: statistics.median(times[key]) for key in budgets}
    points, rows, ys = [], [], []
    for key, budget in budgets.items():
        feats = step_cost(cm, StepShape.from_budget(budget, cm.num_patches), batch_size).time_features()
        med = plain[key]
        points.append({"shape": key, "step_time_s": med, **feats})
        rows.append([feats[f] for f in _TIME_FEATURES])
        ys.append(med)
    a = np.asarray(rows, float)
    used = [j for j in range(a.shape[1]) if j == 0 or np.ptp(a[:, j]) > 0]
    scale = np.abs(a[:, used]).max(axis=0)
    coef, _ = nnls(a[:, used] / scale, np.asarray(ys))
    coefficients = {f: 0.0 for f in _TIME_FEATURES}
    for j, c in zip(used, coef / scale):
        coefficients[_TIME_FEATURES[j]] = float(c)
    keys = list(budgets)
    counted = [first[k] / plain[k] for k in keys[1:]]  # the very first step also initialises: apart
    counted_factor = max(1.0, statistics.median(counted)) if count_flops == "every" and counted else 1.0
    probed_factor = max(1.0, statistics.median(probed[k] / plain[k] for k in keys)) if probed else 1.0
    first_step_s = max(0.0, first[keys[0]] - plain[keys[0]] * (counted_factor + probed_factor - 1.0))
    threads = torch.get_num_threads() if rt.device.type == "cpu" else None
    return TimeModel("calibrated", coefficients, device=str(rt.device), batch_size=batch_size, count_flops=count_flops,
                     threads=threads, precision=precision, points=points, first_step_s=first_step_s,
                     counted_factor=counted_factor, probed_factor=probed_factor,
                     note=f"calibrated: {reps} rounds of {len(budgets)} real step shapes at batch {batch_size} on "
                     f"{rt.device} ({precision}, FLOP counting {count_flops}); a counted step "
                     f"{counted_factor:.2f}x a plain one"
                     + (f", a memory-measured step {probed_factor:.2f}x" if probed else "")
                     + f", the first step +{first_step_s:.2f} s")
