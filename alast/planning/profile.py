"""Profile a timm ViT into a :class:`~planners.costmodel.CostModel`.

Each block is run alone at several token counts and its costs fitted to the exact form of a
transformer block, ``c0 + c1 n + c2 n^2``:
  * forward multiply-adds with fvcore (matrix products only; fvcore does not count
    ``scaled_dot_product_attention``, so a handle for it is registered here);
  * forward and backward FLOPs with ``torch.utils.flop_counter`` (the counter the runtime records,
    CPU fused attention included) in every backward state, so the planner reproduces the runtime's
    counts, and the CLS-attention scores a block computes when it drops tokens;
  * bytes autograd saves for the backward (saved-tensor hooks), and the bytes held after every op
    of the block's forward and backward (torch's MemTracker), each op's a line in the batch: the
    ops that can hold the most are the block's memory events;
  * where the torch runtime selects a block's tokens inside it (timm's standard block), the same
    counts for that computation at several (entering, kept) token pairs, fitted to its exact form
    ``c0 + c_in n_in + c_out n_out + c_io n_in n_out``.
Blocks with identical structure are measured once. The patch embedding and the head are profiled the
same way. Everything is per sample (batch 1); the planner scales by the batch. ``alast.planning.calibrate.calibrate_time``
times real training steps of the torch runtime on this machine for the time model.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from alast.models import SHIPPED_MODELS, create_model
from alast.planning import profile_cache
from alast.planning.measure import (
    STATES,
    AsModule,
    count_costs,
    fit_bilinear,
    fit_events,
    fit_poly,
    fvcore_macs,
    memory_lines,
    param_storages,
    set_grad,
    transient_pairs,
)
from planners.costmodel import (
    CLASSIFIER,
    EMBED,
    HEAD,
    BlockCost,
    CostModel,
    DropCost,
    MemoryEvents,
    MemoryModel,
    SegmentCost,
)
from runtimes.token_schedule import head_reads_prefix
from runtimes.torch_backend.flops import counter, grad_flags_restored
from runtimes.torch_backend.params import block_signature, embedding_parameters, param_groups, stem_tokens, timm_model
from runtimes.torch_backend.patch import (
    block_rope,
    check_patchable,
    forward_selecting,
    rotary_embeddings,
    selects_in_block,
)
from runtimes.torch_backend.relpos import RelativePositions, beit_forward, is_beit_block, leading_positions
from runtimes.torch_backend.tokens import cls_attention_scores, select_tokens, summary_pool


def drop_pairs(ns: list[int], num_prefix: int) -> list[tuple[int, int]]:
    """(entering, kept) sequence lengths to profile a selecting block at: every kept count of
    ``ns`` below every entering one, and one token fewer than all."""
    pairs = {(i, o) for i in ns for o in ns if num_prefix < o < i}
    pairs |= {(i, num_prefix + 1) for i in ns if i > num_prefix + 1} | {(ns[-1], ns[-1] - 1)}
    return sorted(pairs)


def profile_dropping(block: nn.Module, trainable: list[nn.Parameter], ns: list[int], dim: int, num_prefix: int,
                     pool: int | None = None, rope: torch.Tensor | None = None) -> tuple[DropCost | None, float]:
    """The block's costs when it selects its tokens inside (None where the runtime cannot: it runs
    the block whole, then drops), with ``trainable`` its parameters that train; returns them and
    the worst fit error. ``pool``: how the model is read (``tokens.summary_pool``); ``rope``: the
    rotary embeddings of every patch token (:func:`~runtimes.torch_backend.patch.block_rope`)."""
    if not selects_in_block(block):
        return None, 0.0
    exclude = param_storages(block) | _storages(rope)
    pairs = drop_pairs(ns, num_prefix)
    meas: dict[str, dict[str, list[float]]] = {s: {"fwd": [], "bwd": [], "act": []} for s in STATES}
    for n_in, n_out in pairs:
        for state, (weights, inp) in STATES.items():
            set_grad(trainable, weights)
            x = torch.randn(1, n_in, dim).requires_grad_(inp)
            keep = n_out - num_prefix
            run = lambda: forward_selecting(block, x, keep, num_prefix, pool=pool,  # noqa: B023
                                            pos=_pos_for(block, rope, x, num_prefix))[0]  # noqa: B023
            f, b, a = count_costs(run, exclude)
            for key, v in (("fwd", f), ("bwd", b), ("act", a)):
                meas[state][key].append(v)
    set_grad(trainable, True)
    errs: list[float] = []

    def fit(ys: list[float]) -> tuple[float, float, float, float]:
        coef, err = fit_bilinear(pairs, ys)
        errs.append(err)
        return coef

    mem_pairs = transient_pairs(ns, num_prefix)
    grid = [(i, o) for i in _grid(ns) for o in _grid([num_prefix + 1, i - 1]) if o < i]
    fwd_events, bwd_events = _memory_events(
        block, trainable, mem_pairs, dim, lambda ys: fit_bilinear(mem_pairs, ys), _pair_value, grid, errs,
        lambda pair: lambda blk, x: forward_selecting(blk, x, pair[1] - num_prefix, num_prefix, pool=pool,
                                                      pos=_pos_for(blk, rope, x, num_prefix))[0], _held(rope))
    cost = DropCost(fwd_flops=fit(meas["weights_and_input"]["fwd"]),
                    bwd_flops={s: fit(meas[s]["bwd"]) for s in STATES},
                    act_bytes={s: fit(meas[s]["act"]) for s in STATES},
                    fwd_events=fwd_events, bwd_events=bwd_events)
    return cost, max(errs)


def _grid(ns: list[int], points: int = 24) -> list[int]:
    """Token counts from ``ns[0]`` to ``ns[-1]``, at most ``points`` of them, both ends included."""
    return sorted({round(v) for v in np.linspace(ns[0], ns[-1], points)})


def _n_value(cs: np.ndarray, ss: np.ndarray, n: int) -> np.ndarray:
    powers = np.asarray([1.0, n, n * n])[: cs.shape[1]]
    return np.stack([cs @ powers, ss @ powers], axis=1)


def _pair_value(cs: np.ndarray, ss: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
    terms = np.asarray([1.0, pair[0], pair[1], pair[0] * pair[1]])
    return np.stack([cs @ terms, ss @ terms], axis=1)


def _memory_events(block: nn.Module, trainable: list[nn.Parameter], keys: list, dim: int,
                   fit: Callable[[list[float]], tuple[tuple[float, ...], float]], value: Callable, grid: list,
                   errs: list[float], fn_at: Callable[[Any], Callable[[nn.Module, torch.Tensor], torch.Tensor]],
                   held: tuple[torch.Tensor, ...] = ()) -> tuple[dict[str, MemoryEvents], dict[str, MemoryEvents]]:
    """The block's forward memory events in every state (``none`` included) and its backward ones
    in every backward state (:func:`~alast.planning.measure.fit_events`), over ``keys`` (token
    counts or (entering, kept) pairs: ``fn_at(key)`` runs the block at one). ``held``: what the
    model holds beside the block (its rotary embeddings), not the block's."""
    fwd, bwd = {}, {}
    for state in (*STATES, "none"):
        lines = [memory_lines(block, fn_at(k), trainable, state, k if isinstance(k, int) else k[0], dim, held)
                 for k in keys]
        for out, part in ((fwd, 0), (bwd, 1)):
            if state == "none" and part == 1:
                continue
            out[state], err = fit_events(keys, [ln[part] for ln in lines], fit, value, grid)
            errs.append(err)
    set_grad(trainable, True)
    return fwd, bwd


def profile_block(block: nn.Module, index: int, ns: list[int], dim: int, num_prefix: int = 1,
                  pool: int | None = None, rope: torch.Tensor | None = None) -> tuple[BlockCost, float]:
    """Measure one block (see the module docstring); returns its costs and worst fit error.
    ``pool``: how the model is read, its class token (None) or its pooled patch tokens
    (``tokens.summary_pool``); ``rope``: the rotary embeddings of every patch token (timm's ``Eva``;
    the block runs on the first ones)."""
    whole = functools.partial(_whole, rope=rope, num_prefix=num_prefix)
    trainable = [p for p in block.parameters() if p.requires_grad]
    exclude = param_storages(block) | _storages(rope)
    macs, errs = [], []
    meas: dict[str, dict[str, list[float]]] = {s: {"fwd": [], "bwd": [], "act": []} for s in STATES}
    for n in ns:
        plain = rope is None and not is_beit_block(block)
        traced = block if plain else AsModule(functools.partial(whole, block), block)
        macs.append(fvcore_macs(traced, torch.randn(1, n, dim)))
        for state, (weights, inp) in STATES.items():
            set_grad(trainable, weights)
            x = torch.randn(1, n, dim).requires_grad_(inp)
            f, b, a = count_costs(lambda: whole(block, x), exclude)  # noqa: B023
            for key, v in (("fwd", f), ("bwd", b), ("act", a)):
                meas[state][key].append(v)
    set_grad(trainable, True)

    def fit(ys: list[float], degree: int = 2) -> tuple[float, ...]:
        coef, err = fit_poly(ns, ys, degree)
        errs.append(err)
        return coef

    fwd_macs, fwd_flops = fit(macs), fit(meas["weights_and_input"]["fwd"])
    bwd = {s: fit(meas[s]["bwd"]) for s in STATES}
    act = {"none": (0.0,), **{s: fit(meas[s]["act"]) for s in STATES}}
    select = fit([_select_flops(block, n, pool) for n in ns], 1)
    sel_act, sel_idx = _select_bytes(ns[-1], dim, block)
    fwd_events, bwd_events = _memory_events(block, trainable, ns, dim, lambda ys: fit_poly(ns, ys), _n_value,
                                            _grid(ns), errs, lambda n: whole, _held(rope))
    drop, drop_err = profile_dropping(block, trainable, ns, dim, num_prefix, pool, rope)
    errs.append(drop_err)
    set_grad(trainable, True)
    sizes = [p.numel() * p.element_size() for p in trainable]
    cost = BlockCost(
        index=index, params=sum(p.numel() for p in block.parameters()),
        trainable_params=sum(p.numel() for p in trainable), trainable_bytes=sum(sizes),
        largest_trainable_bytes=max(sizes, default=0), fwd_macs=fwd_macs, fwd_flops=fwd_flops, bwd_flops=bwd,
        select_flops=select, act_bytes=act, select_act_bytes=sel_act, select_index_bytes=sel_idx,
        fwd_events=fwd_events, bwd_events=bwd_events, drop=drop,
    )
    return cost, max(errs)


def _whole(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None, num_prefix: int = 0) -> torch.Tensor:
    """The block on every token of ``x``: a BEiT block as it runs after a drop, biased per image
    (:func:`~runtimes.torch_backend.relpos.beit_forward`; before the first drop timm's forward adds
    one bias for the whole batch, which this counts per image: the same FLOPs, a little more memory)."""
    pos = _pos_for(block, rope, x, num_prefix)
    if is_beit_block(block):
        return beit_forward(block, x, pos)
    return block(x) if pos is None else block(x, rope=pos)


def _held(rope: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return () if rope is None else (rope,)


def _storages(rope: torch.Tensor | None) -> set[int]:
    """The rotary embeddings' storage: the model's, not what the block saves."""
    return set() if rope is None else {rope.untyped_storage().data_ptr()}


def _pos_for(block: nn.Module, rope: torch.Tensor | None, x: torch.Tensor,
             num_prefix: int) -> torch.Tensor | RelativePositions | None:
    """The position input of the block for the first tokens, as many as ``x`` ``[B, N, D]`` holds:
    their rotary embeddings (``rope``: every patch token's), or a BEiT block's relative positions."""
    if is_beit_block(block):
        return leading_positions(block, x)
    return None if rope is None else rope[..., : x.shape[1] - num_prefix, :]


def _select_flops(block: nn.Module, n: int, pool: int | None) -> float:
    """FLOPs of the CLS-attention scores the patched block computes from its qkv output."""
    attn = block.attn
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * attn.num_heads)  # BEiT's has none
    qkv = torch.randn(1, n, 3 * attn.num_heads * head_dim)
    q_norm, k_norm = getattr(attn, "q_norm", nn.Identity()), getattr(attn, "k_norm", nn.Identity())
    with counter() as fc:
        cls_attention_scores(qkv, attn.num_heads, head_dim, attn.scale, q_norm, k_norm, pool=pool)
    return float(fc.get_total_flops())


def _select_bytes(n: int, dim: int, block: nn.Module) -> tuple[float, float]:
    """Bytes token selection keeps for the backward: per entering token, per kept token."""
    x = torch.randn(1, n, dim, requires_grad=True) * 1.0
    keep = max(1, (n - 1) // 2)
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.is_floating_point())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        select_tokens(x, torch.rand(1, n), keep, 1)
    per_in = sum(b for b, fl in seen.values() if fl) / n
    per_kept = sum(b for b, fl in seen.values() if not fl) / keep
    return per_in, per_kept


def _segment(fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module, params: list[nn.Parameter],
             inputs: list[torch.Tensor], ns: list[int] | None, with_input_grad: bool) -> tuple[SegmentCost, float]:
    """Profile the embedding (``ns`` None: one input) or the head (one input per token count)."""
    trainable = [p for p in params if p.requires_grad]
    exclude = param_storages(owner)
    macs, fwd, bwd_w, bwd_wi, act = [], [], [], [], []
    with grad_flags_restored(params, clear_grads=True):
        for x in inputs:
            macs.append(fvcore_macs(AsModule(fn, owner), x))
            set_grad(params, True)
            # the embedding's input is the image batch: counted as input bytes, not as an activation
            skip = exclude | ({x.untyped_storage().data_ptr()} if ns is None else set())
            f, b, a = count_costs(lambda: fn(x), skip)  # noqa: B023
            fwd.append(f), bwd_w.append(b), act.append(a)
            if with_input_grad:
                xi = x.clone().requires_grad_(True)
                bwd_wi.append(count_costs(lambda: fn(xi), exclude)[1])  # noqa: B023
    errs: list[float] = []

    def fit(ys: list[float]) -> tuple[float, ...]:
        if ns is None:
            return (ys[0],)
        coef, err = fit_poly(ns, ys)
        errs.append(err)
        return coef

    m, f = fit(macs), fit(fwd)
    bwd = {"weights_only": fit(bwd_w), **({"weights_and_input": fit(bwd_wi)} if with_input_grad else {})}
    a_fit = fit(act)
    seg = SegmentCost(params=sum(p.numel() for p in params), trainable=bool(trainable),
                      trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
                      largest_trainable_bytes=max((p.numel() * p.element_size() for p in trainable), default=0),
                      fwd_macs=m, fwd_flops=f, bwd_flops=bwd, act_bytes=a_fit)
    return seg, max(errs, default=0.0)


def token_counts(num_patches: int, num_prefix: int) -> list[int]:
    """Sequence lengths to profile at: enough distinct points to fit and check a quadratic."""
    pts = {num_prefix + 1, num_prefix + max(1, num_patches // 4), num_prefix + max(1, num_patches // 2),
           num_prefix + num_patches}
    k = 2
    while len(pts) < 4:
        pts.add(num_prefix + k)
        k += 1
    return sorted(pts)


def profile_model(model: nn.Module, name: str, *, img_size: int, lora: dict[str, Any] | None = None,
                  device: str = "cpu") -> CostModel:
    """Cost model of an instantiated timm ViT (possibly wrapped by peft LoRA), trained on ``device``."""
    vit = timm_model(model)
    vit.train()
    dim = int(vit.embed_dim)
    num_prefix = int(vit.num_prefix_tokens)
    num_patches = int(vit.patch_embed.num_patches)
    ns = token_counts(num_patches, num_prefix)
    blocks, errs, cache = [], [], {}
    for i, blk in enumerate(vit.blocks):
        sig = block_signature(blk)
        if sig not in cache:
            cache[sig] = profile_block(blk, i, ns, dim, num_prefix, summary_pool(vit), block_rope(vit, i))
        cost, err = cache[sig]
        blocks.append(BlockCost(**{**cost.__dict__, "index": i}))
        errs.append(err)
    in_blocks = {id(p) for p in vit.blocks.parameters()}
    embed_params = embedding_parameters(vit)  # what the runtimes freeze with the embeddings
    in_embed = {id(p) for p in embed_params}
    head_params = [p for p in vit.parameters() if id(p) not in in_blocks and id(p) not in in_embed]
    img = torch.randn(1, 3, img_size, img_size)
    embed_fn = functools.partial(stem_tokens, vit)
    embed, e1 = _segment(embed_fn, vit, embed_params, [img], None, with_input_grad=False)
    head_fn = lambda x: vit.forward_head(vit.norm(x))
    head_in = [torch.randn(1, n, dim) for n in ns]
    head, e2 = _segment(head_fn, vit, head_params, head_in, ns, with_input_grad=True)
    num_classes = int(getattr(vit, "num_classes", 0) or 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    cuda = device.startswith("cuda")
    memory = MemoryModel(param_bytes=params, buffer_bytes=buffers, opt_state_bytes_per_param=8,
                         optimizer_temp="all_trained" if cuda else "largest_param",
                         input_bytes_per_sample=3 * img_size * img_size * 4 if cuda else 0,
                         record_bytes_per_sample=_record_bytes(vit), rope_bytes=_rope_bytes(vit),
                         opt_groups=_opt_groups(model, vit, in_embed))
    fused = all(getattr(b.attn, "fused_attn", False) for b in vit.blocks)
    return CostModel(
        model=name, img_size=img_size, num_patches=num_patches, num_prefix_tokens=num_prefix,
        num_classes=num_classes, embed_dim=dim, attention="fused_sdpa" if fused else "matmul",
        embed=embed, blocks=tuple(blocks), head=head, memory=memory, lora=lora, head_reads_prefix=head_reads_prefix(vit),
        inference_selects_inside=all(b.drop is not None for b in blocks),
        token_counts=tuple(ns),
        fit_max_rel_error=max(errs + [e1, e2]),
        provenance={**profile_cache.library_versions(), "device": device,
                    "measured_on": "cpu, batch 1 (costs per sample)"},
    )


def _opt_groups(model: nn.Module, vit: nn.Module, in_embed: set[int]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """:attr:`MemoryModel.opt_groups`: the trainable parameters in the order the runtime's AdamW
    steps them, each with its owner and bytes."""
    owner = {id(p): i for i, blk in enumerate(vit.blocks) for p in blk.parameters()}
    owner.update({i: EMBED for i in in_embed})
    classifier = vit.get_classifier()
    owner.update({id(p): CLASSIFIER for p in (classifier.parameters() if isinstance(classifier, nn.Module) else ())})
    return tuple(tuple((owner.get(id(p), HEAD), p.numel() * p.element_size()) for p in g["params"])
                 for g in param_groups(model, weight_decay=1.0))


def _rope_bytes(vit: nn.Module) -> int:
    """:attr:`MemoryModel.rope_bytes`: the rotary embeddings timm's ``Eva`` computes in a forward."""
    with torch.no_grad():
        rope = rotary_embeddings(vit)
    return 0 if rope is None else rope.untyped_storage().nbytes()


def _record_bytes(vit: nn.Module) -> int:
    """:attr:`MemoryModel.record_bytes_per_sample` of the torch runtime (``StepControl.record_delta``):
    the class token's rows entering the blocks and leaving each, in float32, or one float32 delta per
    block without a class token."""
    rows = len(vit.blocks) + 1 if summary_pool(vit) is None else 0
    return 4 * (rows * int(vit.embed_dim) if rows else len(vit.blocks))


def default_num_classes(name: str) -> int:
    if name in SHIPPED_MODELS:
        return 10
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    return int(getattr(cfg, "num_classes", 0) or 1000)


@functools.lru_cache(maxsize=8)
def _profile_cached(name: str, img_size: int | None, num_classes: int, lora_key: tuple | None, device: str
                    ) -> tuple[CostModel, str]:
    key = profile_cache.cache_key(name=name, img_size=img_size, num_classes=num_classes, lora=lora_key,
                                  device=device)
    hit = profile_cache.read(key)
    if hit is not None:
        return hit[0], f"cached (profiled earlier with this code: {hit[1]})"
    lora = dict(lora_key) if lora_key is not None else None
    if lora is not None:
        lora["targets"] = list(lora["targets"])
    torch.manual_seed(0)
    model = create_model(name, num_classes, pretrained=False, img_size=img_size)  # costs need no weights
    check_patchable(model)  # a model ALaST cannot drive is refused before profiling trips over it
    if lora is not None:
        from runtimes.torch_backend.params import apply_lora

        model = apply_lora(model, **lora)
    size = int(timm_model(model).patch_embed.img_size[0])
    with torch.random.fork_rng():
        cm = profile_model(model, name, img_size=size, lora=lora, device=device)
    profile_cache.write(key, cm)
    return cm, "profiled now (fvcore + torch.utils.flop_counter)"


def profile_with_source(name: str, img_size: int | None = None, num_classes: int | None = None,
                        lora: dict[str, Any] | None = None, device: str = "cpu") -> tuple[CostModel, str]:
    """Build ``name`` (random weights; nothing is downloaded) and profile it, or read the profile
    this machine measured before with the same code and libraries (:mod:`.profile_cache`); cached
    per process too. Returns the cost model and where it came from."""
    key = None if lora is None else tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in lora.items()))
    return _profile_cached(name, img_size, num_classes or default_num_classes(name), key, device)


def profile(name: str, img_size: int | None = None, num_classes: int | None = None,
            lora: dict[str, Any] | None = None, device: str = "cpu") -> CostModel:
    """:func:`profile_with_source`'s cost model."""
    return profile_with_source(name, img_size, num_classes, lora, device)[0]
