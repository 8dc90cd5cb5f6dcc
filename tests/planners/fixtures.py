"""Synthetic inputs for the planner tests: plain numbers, no torch, no profiling."""
from __future__ import annotations

import math
import random

from planners.costmodel import BlockCost, CostModel, DropCost, MemoryModel, SegmentCost

STATES = ("weights_and_input", "weights_only", "input_only", "none")


def synthetic_cost_model(num_blocks: int = 12, num_patches: int = 196, dim: int = 64, mlp_ratio: float = 4.0,
                         num_classes: int = 10, patch: int = 16, embed_trainable: bool = True,
                         select_inside: bool = False, head_reads_prefix: bool = False) -> CostModel:
    """A ViT's cost model in closed form (per sample, n tokens entering a block): projections and
    MLP ``n * D^2 * (4 + 2 mlp_ratio)`` MACs, attention ``2 n^2 D``; backward 2x the linear part when
    trained, 1x when frozen, 2.5x attention; CLS scores ``n D`` MACs. Flops = 2 x MACs.
    ``select_inside``: a dropping block computes its kept tokens only (qkv ``3 D^2`` per entering
    token, the rest per kept token, attention ``2 n_in n_out D``)."""
    lin = dim * dim * (4 + 2 * mlp_ratio)
    qkv = 3.0 * dim * dim
    drop = None
    if select_inside:  # fwd: 2 x MACs plus the scores; bwd as above, per part
        per = {"weights_and_input": 4, "weights_only": 2, "input_only": 2}
        drop = DropCost(fwd_flops=(0.0, 2 * qkv + 2.0 * dim, 2 * (lin - qkv), 4.0 * dim),
                        bwd_flops={s: (0.0, f * qkv, f * (lin - qkv), 10.0 * dim) for s, f in per.items()},
                        act_bytes={s: (0.0, 16.0 * dim, 24.0 * dim, 0.0) for s in per})
    param_bytes = int(4 * lin)
    bwd = {"weights_and_input": (0.0, 4 * lin, 10 * dim), "weights_only": (0.0, 2 * lin, 10 * dim),
           "input_only": (0.0, 2 * lin, 10 * dim), "none": (0.0, 0.0, 0.0)}
    blocks = tuple(
        BlockCost(index=i, params=int(lin), trainable_params=int(lin), trainable_bytes=param_bytes,
                  largest_trainable_bytes=param_bytes // 2, fwd_macs=(0.0, lin, 2 * dim),
                  fwd_flops=(0.0, 2 * lin, 4 * dim), bwd_flops=bwd, select_flops=(0.0, 2.0 * dim),
                  act_bytes={s: (0.0, 40.0 * dim if s != "none" else 0.0) for s in STATES},
                  select_act_bytes=4.0 * dim, select_index_bytes=8.0,
                  transient_bytes={s: (float(param_bytes), 8.0 * dim) for s in STATES}, drop=drop)
        for i in range(num_blocks))
    embed_macs = num_patches * 3 * patch * patch * dim
    embed = SegmentCost(params=3 * patch * patch * dim, trainable=embed_trainable, trainable_bytes=12 * patch * patch * dim,
                        largest_trainable_bytes=12 * patch * patch * dim, fwd_macs=(float(embed_macs),),
                        fwd_flops=(2.0 * embed_macs,), bwd_flops={"weights_only": (2.0 * embed_macs,)},
                        act_bytes=(4.0 * num_patches * dim,))
    head_macs = float(dim * num_classes)
    head = SegmentCost(params=dim * num_classes, trainable=True, trainable_bytes=4 * dim * num_classes,
                       largest_trainable_bytes=4 * dim * num_classes, fwd_macs=(head_macs,),
                       fwd_flops=(2 * head_macs,),
                       bwd_flops={"weights_only": (2 * head_macs,), "weights_and_input": (4 * head_macs,)},
                       act_bytes=(0.0, 4.0 * dim))
    return CostModel(model="synthetic", img_size=math.isqrt(num_patches) * patch, num_patches=num_patches,
                     num_prefix_tokens=1, num_classes=num_classes, embed_dim=dim, attention="closed-form",
                     embed=embed, blocks=blocks, head=head, head_reads_prefix=head_reads_prefix,
                     memory=MemoryModel(param_bytes=num_blocks * param_bytes, buffer_bytes=0))


def lognormal_deltas(levels, steps: int, sigma: float = 0.3, seed: int = 0, scale: float = 1.0):
    """``steps`` tuples of per-block deltas: ``levels`` times lognormal batch noise."""
    rng = random.Random(seed)
    return [tuple(scale * lv * math.exp(rng.gauss(0.0, sigma)) for lv in levels) for _ in range(steps)]
