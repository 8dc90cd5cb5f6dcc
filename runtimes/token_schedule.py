"""A fixed token schedule at inference: the model is evaluated and deployed as it was trained.

A model fine-tuned with token dropping spent its last steps with few patch tokens in its deep
blocks (at 0.4x FLOPs on a 6-block model, the last block saw 7 of 64). Evaluated on every token, its
deep blocks meet inputs they never trained on. The *schedule* is the number of patch tokens that
survive each block, averaged over the final training steps; evaluation and export keep, after
block ``l``, the ``kept[l]`` patch tokens with the highest CLS attention, exactly as training did.
Inference then also costs fewer FLOPs, and the counts are fixed, so the ONNX graph has static TopK
sizes.

Blocks that are timm's standard block (or ``Eva``'s) select inside (:func:`inside_schedule`):
only the kept tokens are queries and pass the MLP. Other blocks run whole, in forward hooks around
the model's own forward (:func:`selection_hooks`; no upstream code is copied): one on each block's
fused ``qkv`` projection computes the block's CLS-attention row, one on the block replaces its
output by the prefix tokens plus the top patch tokens. The ONNX training graph runs the same
schedules with a dynamic ``keep`` and records per-sample CLS deltas.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .torch_backend.params import input_channels, timm_model
from .torch_backend.patch import (
    forward_selecting,
    patch_positions,
    position_kind,
    rope_at_positions,
    selects_in_block,
)
from .torch_backend.relpos import RelativePositions, beit_forward, sequence_positions, whole_bias
from .torch_backend.tokens import (
    cls_attention_scores,
    cls_delta,
    ranking_scores,
    select_tokens,
    summary_pool,
    take_tokens,
)


def head_reads_prefix(model: nn.Module) -> bool:
    """Whether a timm ViT's head reads only the prefix tokens (class token pooling, as in ViT, DeiT,
    DINOv2, EVA-02 CLIP, the RoPE ViTs): then the last block's patch tokens are never read."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    vit = timm_model(model)  # inside a peft wrapper
    family = next((c for c in (VisionTransformer, Eva) if isinstance(vit, c)), None)
    if family is None or getattr(vit, "attn_pool", None) is not None:
        return False
    own_head = all(getattr(type(vit), f) is getattr(family, f) for f in ("forward_head", "pool"))
    return own_head and vit.global_pool == "token" and int(vit.num_prefix_tokens) >= 1


class ScheduleError(ValueError):
    """A token schedule that does not fit the model (bad input: the message says what fits)."""


def check_schedule(kept: Sequence[int], num_blocks: int, num_patches: int) -> tuple[int, ...]:
    """``kept`` as a tuple of ints, or :class:`ScheduleError`: one count per block, each in
    ``[1, tokens entering the block]`` (dropping is cumulative)."""
    kept = tuple(int(k) for k in kept)
    if len(kept) != num_blocks:
        raise ScheduleError(f"token schedule has {len(kept)} counts for a model with {num_blocks} blocks")
    entering = num_patches
    for i, k in enumerate(kept):
        if not 1 <= k <= entering:
            raise ScheduleError(f"token schedule keeps {k} patch tokens after block {i}, which receives {entering}; "
                                f"each count must lie in [1, {entering}]")
        entering = k
    return kept


def keep_per_block(kept: Sequence[int], num_patches: int) -> tuple[int | None, ...]:
    """Per block, the count to select (None where the block keeps every token it receives)."""
    out, entering = [], num_patches
    for k in kept:
        out.append(int(k) if k < entering else None)
        entering = k
    return tuple(out)


def drops_tokens(kept: Sequence[int] | None, num_patches: int) -> bool:
    return kept is not None and any(k is not None for k in keep_per_block(kept, num_patches))


@contextlib.contextmanager
def selection_hooks(blocks: Sequence[nn.Module], prefix: int, keep: Tensor | Sequence[int | None] | None,
                    deltas: list[Tensor] | None = None, fuse: bool = False, select: str = "top",
                    noise: Tensor | None = None, score: str = "attention", pool: int | None = None
                    ) -> Iterator[None]:
    """Within the block, after block ``l`` keep the ``prefix`` tokens plus the top ``keep[l]`` patch
    tokens (``keep[l]`` None, or ``keep`` None: all of them); with ``deltas``, append each block's
    per-sample CLS delta to it. With ``fuse`` (fixed counts only), the last kept slot holds the
    dropped tokens fused, as in training with ``policy.fuse_tokens``. ``score`` and ``select`` score
    and choose the tokens as ``policy.token_score`` and ``policy.token_select`` say; ``noise``
    (``[L, B, prefix + patches]`` uniform draws; block ``l`` reads the leading columns of
    ``noise[l]``) supplies the draws. ``pool``: how the model is read, its class token (None) or
    its pooled patch tokens (:func:`~runtimes.torch_backend.tokens.summary_pool`)."""
    if fuse and isinstance(keep, Tensor):
        raise ValueError("token fusion needs fixed token counts, not a keep tensor")
    scores: dict[int, Tensor] = {}
    handles = []

    def qkv_hook(i: int, attn: nn.Module):
        def hook(_mod, _inputs, out: Tensor) -> None:
            scores[i] = cls_attention_scores(out, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm,
                                             attn.k_norm, score, pool)
        return hook

    def block_hook(i: int):
        def hook(_mod, inputs, out: Tensor) -> Tensor:
            x, selected = inputs[0], out
            if keep is not None and keep[i] is not None:
                s = scores.pop(i)
                draws = None if noise is None else noise[i, :, :s.shape[1]]
                rank = ranking_scores(s, select, draws)
                selected = select_tokens(out, s, keep[i], prefix, fuse=fuse, rank=rank)
                if deltas is not None and pool is not None:  # a pooled delta reads the kept tokens
                    x, out = select_tokens(x.detach(), s, keep[i], prefix, fuse=fuse, rank=rank), selected
            if deltas is not None:  # the block's input and whole output: the same tokens
                deltas.append(cls_delta(x, out, pool, same_tokens=True))
            return selected
        return hook

    try:
        for i, blk in enumerate(blocks):
            if keep is not None and keep[i] is not None:
                handles.append(blk.attn.qkv.register_forward_hook(qkv_hook(i, blk.attn)))
            if deltas is not None or (keep is not None and keep[i] is not None):
                handles.append(blk.register_forward_hook(block_hook(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def inside_schedule(vit: nn.Module, keep: Sequence[int | None] | Tensor, score: str = "attention", *,
                    deltas: list[Tensor] | None = None, select: str = "top", noise: Tensor | None = None
                    ) -> Iterator[None]:
    """:func:`selection_hooks` where every block selects inside (timm's standard block, and
    ``Eva``'s): a block that drops tokens runs
    :func:`~runtimes.torch_backend.patch.forward_selecting`, where only the kept tokens are queries
    and pass the MLP, as in training; an ``Eva`` block gets the rotary embeddings of the positions
    its tokens hold. Each block's ``forward`` is replaced on the instance within the block (a patched
    or peft-wrapped model too).

    ``keep``: per block, the patch tokens it keeps (None: every token it receives), or an int64
    tensor ``[L]`` (the ONNX training graph's dynamic counts; every block selects, a count equal to
    the tokens entering keeps them all). ``deltas``, ``select`` and ``noise`` as in
    :func:`selection_hooks`: each block's delta is recorded as the torch runtime records it."""
    prefix, pool, kind = int(vit.num_prefix_tokens), summary_pool(vit), position_kind(vit)
    state: dict[str, Tensor | None] = {"positions": None}

    def scheduled(i: int, blk: nn.Module, upstream, x: Tensor, *args, **kwargs) -> Tensor:
        if i == 0:
            state["positions"] = None
        pos, attn_mask, is_causal = None, None, False
        if kind is None:
            attn_mask, is_causal = _vit_arguments(*args, **kwargs)
        elif kind == "rotary":
            pos, attn_mask, is_causal = _eva_arguments(*args, **kwargs)
            if pos is not None and state["positions"] is not None:
                pos = rope_at_positions(pos, state["positions"])
            args, kwargs = (), {"rope": pos, "attn_mask": attn_mask, "is_causal": is_causal}
        elif state["positions"] is not None or keep[i] is not None:  # relative: the biases of the tokens held
            pos = RelativePositions(whole_bias(blk), sequence_positions(state["positions"], prefix))
        if keep[i] is None:
            out = upstream(x, *args, **kwargs) if pos is None or kind == "rotary" else beit_forward(blk, x, pos)
            if deltas is not None:
                deltas.append(cls_delta(x, out, pool, same_tokens=True))
            return out
        if attn_mask is not None or is_causal:
            raise ScheduleError("a token schedule drops tokens only where every token attends to every other")
        out, kept = select_in_block(blk, x, keep[i], prefix, score, pool, pos, select,
                                    None if noise is None else noise[i])
        if deltas is not None:  # a pooled delta compares the kept tokens with their own inputs
            deltas.append(cls_delta(x if pool is None else take_tokens(x.detach(), kept), out, pool))
        if kind is not None:
            state["positions"] = patch_positions(state["positions"], kept, prefix)
        return out

    blocks = list(vit.blocks)
    try:
        for i, blk in enumerate(blocks):
            blk.forward = functools.partial(scheduled, i, blk, blk.forward)
        yield
    finally:
        for blk in blocks:
            blk.__dict__.pop("forward", None)


def select_in_block(blk: nn.Module, x: Tensor, keep: int | Tensor, prefix: int, score: str = "attention",
                    pool: int | None = None, pos: Tensor | RelativePositions | None = None, select: str = "top",
                    noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``blk`` on the prefix and the ``keep`` patch tokens of ``x`` it keeps
    (:func:`~runtimes.torch_backend.patch.forward_selecting`), ranked as ``policy.token_select``
    ``select`` says; ``noise`` ``[B, >= N]``: the draws, read from its leading columns. ``keep``: an
    int, or a 0-d tensor (a graph's dynamic count). Returns the output and the kept positions."""
    rank = None
    if select != "top":
        def rank(s: Tensor) -> Tensor:
            return ranking_scores(s, select, None if noise is None else noise[:, :s.shape[1]])
    out, _, kept = forward_selecting(blk, x, keep if isinstance(keep, Tensor) else int(keep), prefix, score,
                                     rank, pool=pool, pos=pos)
    return out, kept


def _vit_arguments(attn_mask: Tensor | None = None, is_causal: bool = False) -> tuple[Tensor | None, bool]:
    """``Block.forward``'s arguments after ``x``."""
    return attn_mask, is_causal


def _eva_arguments(rope: Tensor | None = None, attn_mask: Tensor | None = None,
                   is_causal: bool = False) -> tuple[Tensor | None, Tensor | None, bool]:
    """``EvaBlock.forward``'s arguments after ``x``."""
    return rope, attn_mask, is_causal


def scheduled_keep(vit: nn.Module, kept: Sequence[int], fuse: bool = False) -> tuple[int | None, ...]:
    """Per block, the count a token schedule ``kept`` selects (:func:`keep_per_block`). Where the
    schedule drops tokens, the blocks select inside and the head reads only the prefix tokens, the
    last block keeps one patch token: its queries are the prefix and that token, every token is
    still a key and a value, and the logits are the schedule's."""
    num_patches = int(vit.patch_embed.num_patches)
    keep = list(keep_per_block(kept, num_patches))
    entering = kept[-2] if len(kept) > 1 else num_patches
    if (entering > 1 and drops_tokens(kept, num_patches) and not fuse and head_reads_prefix(vit)
            and selects_inside(vit)):
        keep[-1] = 1
    return tuple(keep)


def selects_inside(vit: nn.Module) -> bool:
    """Whether every block of ``vit`` selects its tokens inside (:func:`inside_schedule`)."""
    return all(selects_in_block(b) for b in timm_model(vit).blocks)


@contextlib.contextmanager
def token_schedule(vit: nn.Module, kept: Sequence[int] | None, fuse: bool = False,
                   score: str = "attention") -> Iterator[None]:
    """Within the block, forwards of the timm ViT ``vit`` follow the schedule ``kept`` (None: every
    token), keeping the highest-``score`` tokens (``policy.token_score``), with the dropped tokens
    fused into the last kept slot if ``fuse`` (a model trained with ``policy.fuse_tokens`` runs as it
    was trained). Works on a model patched for training or wrapped by peft: only its blocks are
    hooked."""
    if kept is None:
        yield
        return
    num_patches = int(vit.patch_embed.num_patches)
    kept = check_schedule(kept, len(vit.blocks), num_patches)
    if fuse and position_kind(timm_model(vit)) is not None:
        raise ScheduleError("a model whose blocks take the positions of their tokens (timm's Eva or Beit) does not "
                            "fuse dropped tokens")
    if not fuse and selects_inside(vit):
        with inside_schedule(timm_model(vit), scheduled_keep(vit, kept), score):
            yield
        return
    with selection_hooks(list(vit.blocks), int(vit.num_prefix_tokens), keep_per_block(kept, num_patches), fuse=fuse,
                         score=score, pool=summary_pool(vit)):
        yield


def inference_flops(vit: nn.Module, kept: Sequence[int] | None, fuse: bool = False, score: str = "attention") -> float:
    """Counted FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) of one image's forward."""
    from .torch_backend.flops import counter, grad_flags_restored

    img = vit.patch_embed.img_size
    param = next(vit.parameters())
    x = torch.zeros(1, input_channels(vit), img[0], img[1], device=param.device, dtype=param.dtype)
    was_training = vit.training
    # parameters off, not only no_grad: under no_grad a parameter's view (attention pooling's
    # latent query) still reads as requiring grad, and the counter's module hooks refuse it
    vit.eval()
    try:
        with (grad_flags_restored(vit.parameters(), set_to=False), torch.no_grad(),
              token_schedule(vit, kept, fuse, score), counter() as fc):
            vit(x)
    finally:
        vit.train(was_training)
    return float(fc.get_total_flops())
