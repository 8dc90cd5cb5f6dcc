"""timm's BEiT (``Beit``: BEiT, BEiT v2) under ALaST: relative position biases that follow the kept tokens.

Every BEiT block adds a learned bias to its attention logits, one per head and per pair of
positions (the class token's row and column included), looked up in the block's own table. Once
a block has dropped tokens, the tokens that remain sit at scattered positions of the grid,
different in every image, so the blocks after it need the bias of exactly those pairs:
:func:`pair_bias` gathers it per image from the block's whole bias. A block that drops tokens
selects inside (:func:`beit_selecting_head`, :func:`beit_selecting_tail`): its scores are the
class token's attention with the bias (what the block itself computes), and only the kept tokens
are queries and pass the MLP.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import row_attention_scores, take_tokens


class RelativePositions(NamedTuple):
    """A BEiT block's position input: ``bias``, its whole relative position bias ``[H, N, N]`` over
    every token of the image (None for a block without one), and ``tokens``, the sequence positions
    (in that whole sequence, the prefix first) of the tokens it is given, ``[B, n]`` (None: every
    token, in order)."""

    bias: Tensor | None
    tokens: Tensor | None


@functools.cache
def _beit_classes() -> tuple[type, Callable, Callable]:
    from timm.models.beit import Attention, Beit, Block

    return Beit, Block.forward, Attention.forward


def is_beit_model(model: nn.Module) -> bool:
    """Whether ``model`` is timm's ``Beit`` (relative position biases: BEiT, BEiT v2)."""
    return isinstance(model, _beit_classes()[0])


def is_beit_block(block: nn.Module) -> bool:
    """Whether ``block`` (patched or not) runs timm's own BEiT ``Block.forward`` with its
    ``Attention`` (:func:`beit_selecting_head` reproduces them)."""
    _, block_forward, attn_forward = _beit_classes()
    base = getattr(block, "_alast_base", type(block))
    return base.forward is block_forward and type(getattr(block, "attn", None)).forward is attn_forward


def whole_bias(block: nn.Module) -> Tensor | None:
    """The relative position bias block ``block`` adds to its attention logits over every token,
    ``[H, N, N]``, from its table (timm's ``_get_rel_pos_bias``); None where it has none. (A model
    whose blocks share one is refused by ``check_patchable``.)"""
    attn = block.attn
    return attn._get_rel_pos_bias()[0] if attn.relative_position_bias_table is not None else None


def pair_bias(bias: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """The bias ``[B or 1, H, m, n]`` between the tokens at sequence positions ``rows`` ``[B, m]``
    (the queries) and ``cols`` ``[B, n]`` (the keys) of the whole bias ``bias`` ``[H, N, N]``; None
    stands for every token, in order. One gather from the flattened bias (an ONNX ``Gather``)."""
    if rows is None and cols is None:
        return bias.unsqueeze(0)
    n = bias.shape[-1]
    if rows is None or cols is None:
        every = torch.arange(n, device=bias.device).expand((cols if rows is None else rows).shape[0], -1)
        rows, cols = (every, cols) if rows is None else (rows, every)
    flat = rows[:, :, None] * n + cols[:, None, :]  # [B, m, n]
    picked = bias.flatten(1).index_select(1, flat.flatten())  # [H, B * m * n]
    return picked.view(bias.shape[0], *flat.shape).transpose(0, 1)


def leading_positions(block: nn.Module, x: Tensor) -> RelativePositions:
    """The position input of a BEiT block given the first tokens of the image, as many as ``x``
    ``[B, n, D]`` holds (for measuring and counting the block at ``n`` tokens)."""
    return RelativePositions(whole_bias(block), torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1))


def sequence_positions(positions: Tensor | None, num_prefix: int) -> Tensor | None:
    """The sequence positions of the prefix and of the patch tokens at grid ``positions`` ``[B, n]``
    (None: every token, in order)."""
    if positions is None:
        return None
    prefix = torch.arange(num_prefix, device=positions.device).expand(positions.shape[0], -1)
    return torch.cat([prefix, positions + num_prefix], dim=1)


def _qkv(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values ``[B, H, N, d]`` of timm's BEiT ``Attention`` on ``h``, its
    query and value biases added as its ``forward`` adds them."""
    b, n, _ = h.shape
    if attn.q_bias is None:
        qkv = attn.qkv(h)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def beit_selecting_head(block: nn.Module, x: Tensor, score: str, pool: int | None = None,
                        pos: RelativePositions | None = None
                        ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, RelativePositions | None], Tensor]:
    """:func:`~.patch.selecting_head` of a BEiT block: the normed input, the queries, keys and
    values (with ``pos``, for the tail) and the tokens' scores, the class token's attention (or the
    pooled patch tokens') with the relative position bias of ``pos``."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = _qkv(attn, h)
    row_bias = None
    if pos is not None and pos.bias is not None:
        with torch.no_grad():
            tokens = pos.tokens
            if tokens is None:  # every token, in order: the bias's own rows, for the whole batch
                rows = pos.bias[:, :1] if pool is None else pos.bias[:, pool:]
                row_bias = rows.detach().mean(dim=1, keepdim=True).unsqueeze(0)  # [1, H, 1, N]
            else:
                rows = tokens[:, :1] if pool is None else tokens[:, pool:]
                row_bias = pair_bias(pos.bias.detach(), rows, tokens).mean(dim=2, keepdim=True)  # [B, H, 1, N]
    return h, (q, k, v, pos), row_attention_scores(q, k, v, attn.scale, score, pool, bias=row_bias)


def beit_selecting_tail(block: nn.Module, x: Tensor, h: Tensor,
                        qkv: tuple[Tensor, Tensor, Tensor, RelativePositions | None], kept: Tensor | None) -> Tensor:
    """:func:`~.patch.selecting_tail` of a BEiT block: its output for the ``kept`` positions
    ``[B, k]`` (None: every token), the attention biased for the pairs of tokens it holds."""
    attn = block.attn
    q, k, v, pos = qkv
    mask = None
    if pos is not None and pos.bias is not None:
        rows = pos.tokens if kept is None else kept if pos.tokens is None else torch.gather(pos.tokens, 1, kept)
        mask = pair_bias(pos.bias, rows, pos.tokens)
    if kept is not None:
        q = take_tokens(q.transpose(1, 2), kept).transpose(1, 2)  # [B, H, kept, d]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if block.training else 0.0,
                                       scale=attn.scale)
    o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(x.shape[0], q.shape[2], -1)))
    if block.gamma_1 is not None:
        o = block.gamma_1 * o
    out = (x if kept is None else take_tokens(x, kept)) + block.drop_path1(o)
    m = block.mlp(block.norm2(out))
    if block.gamma_2 is not None:
        m = block.gamma_2 * m
    return out + block.drop_path2(m)


def beit_forward(block: nn.Module, x: Tensor, pos: RelativePositions, tail: Callable | None = None) -> Tensor:
    """A BEiT block on every token of ``x``, biased for the positions ``pos`` its tokens hold (the
    blocks after a drop, where timm's forward would add the bias of the whole grid). ``tail``: the
    :func:`beit_selecting_tail` to run (the compiled one)."""
    h = block.norm1(x)
    return (tail or beit_selecting_tail)(block, x, h, (*_qkv(block.attn, h), pos), None)
