"""Patch a timm VisionTransformer, Eva or Beit instance for ALaST, and undo it.

Each block's class is replaced by a subclass of its own class whose ``forward`` calls
``super().forward`` (so LayerScale, drop-path and any upstream change are kept) and then, in
training mode only, records the block's CLS delta and keeps the top-scoring patch tokens.
CLS-attention scores come from a forward hook on the block's fused ``qkv`` projection. A model
without a class token is read through the mean of its patch tokens instead (``pool``, see
:mod:`.tokens`).

A block that drops tokens after it computes its output for the kept tokens only, where it is
timm's standard ``Block`` with timm's ``Attention`` (:func:`selects_in_block`): the tokens are
chosen from the qkv projection, and only the kept tokens are queries and pass the attention's
output projection and the MLP (:func:`forward_selecting`). The dropped tokens still serve as
keys and values, so the kept tokens' outputs are those of the whole block, at a fraction of its
cost. Other block classes compute every token, then drop.

timm's ``Eva`` (EVA-02, DINOv3, the RoPE ViTs, PE) gives every block rotary position embeddings
for the patch tokens. Its blocks always select inside (:func:`eva_selecting_head`,
:func:`eva_selecting_tail`: the queries and keys rotated as timm rotates them, the scores from
them), and once a block has dropped tokens, the blocks after it get the rotary embeddings of the
positions they still hold (:attr:`StepControl.positions`). timm's ``Beit`` (BEiT, BEiT v2) likewise,
with the relative position biases of the pairs of positions its blocks hold (:mod:`.relpos`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .relpos import (
    RelativePositions,
    beit_forward,
    beit_selecting_head,
    beit_selecting_tail,
    is_beit_block,
    is_beit_model,
    sequence_positions,
    whole_bias,
)
from .tokens import (
    cls_attention_scores,
    cls_delta,
    kept_indices,
    ranking_scores,
    row_attention_scores,
    select_tokens,
    summary_pool,
    take_tokens,
)


class PatchError(ValueError):
    """The model cannot be patched for ALaST (the message says why and what to use instead)."""


@dataclass
class StepControl:
    """Per-forward instructions and records, owned by the runtime; one per patched model.

    ``keep`` holds, per block, how many patch tokens survive the block (None: all). The runtime
    sets it for one training forward with :meth:`AlastPatch.training_forward` and reads the
    recorded per-sample deltas and token counts after.
    """

    keep: tuple[int | None, ...] | None = None
    deltas: list[Tensor | None] = field(default_factory=list)  # per block, read through the mean of its tokens
    cls_rows: Tensor | None = None  # [L + 1, B, D] float32: the class token entering block 0, then leaving each
    tokens_in: list[int] = field(default_factory=list)
    scores: list[Tensor | None] = field(default_factory=list)
    eager: bool = False  # run the upstream forward uncompiled (FLOP counting sees every op)
    fuse: bool = False  # fuse the dropped tokens into the last kept slot (EViT), where 2+ are kept
    select: str = "top"  # how kept tokens are chosen from the scores: see tokens.ranking_scores
    score: str = "attention"  # what scores the tokens: see tokens.cls_attention_scores
    generator: torch.Generator | None = None  # the draws of select 'sample' / 'random' (None: torch's default)
    temperature: float = 1.0  # select 'sample': draws in proportion to score ** (1 / temperature)
    # rotary and relative-bias models: the patch positions (in the image's grid) of the patch tokens
    # entering the next block, [B, n]; None while every patch token is still there
    positions: Tensor | None = None
    # a step run in passes (gradient accumulation): per block, the uniform draws of select 'sample' /
    # 'random' for the whole batch, made before the first pass as one pass would make them, and the
    # samples of the pass running; a pass takes its rows, so the passes draw what one pass would
    noise: list[Tensor | None] | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    # a forward that starts above the frozen bottom blocks (:mod:`.frozen_cache`): their per-sample
    # deltas ``[depth, B]``, read from the cache or computed before the step
    bottom_deltas: Tensor | None = None

    def draws(self, i: int) -> Tensor | None:
        """Block ``i``'s draws for the samples of this pass (None: draw them from :attr:`generator`)."""
        return None if self.noise is None or self.noise[i] is None else self.noise[i][self.rows]

    def record_delta(self, i: int, x_in: Tensor, x_out: Tensor, pool: int | None) -> None:
        """Record block ``i``'s update for :meth:`block_deltas`.

        With a class token, one copy of the token leaving the block (and, at block 0, of the one
        entering it) into :attr:`cls_rows`: the blocks run in sequence, so block ``i``'s input class
        token is block ``i - 1``'s output, and all the deltas come out of the rows at once, in three
        kernels, instead of three per block. With ``pool``, :func:`cls_delta` of the tokens given.
        """
        if pool is not None:
            self.deltas[i] = cls_delta(x_in, x_out, pool)
            return
        with torch.no_grad():
            if i == 0:
                self.cls_rows = x_out.new_empty((len(self.deltas) + 1, x_out.shape[0], x_out.shape[-1]),
                                                dtype=torch.float32)
                self.cls_rows[0].copy_(x_in[:, 0])
            elif self.cls_rows is None:
                raise RuntimeError(f"block {i} ran before block 0 in a training forward; ALaST needs the blocks "
                                   "run in sequence")
            self.cls_rows[i + 1].copy_(x_out[:, 0])

    def block_deltas(self) -> Tensor:
        """The per-sample delta of every block, ``[L, B]`` float32 (:func:`cls_delta`'s value)."""
        with torch.no_grad():
            if self.cls_rows is not None:
                d = self.cls_rows[1:] - self.cls_rows[:-1]
                d = d.pow_(2).sum(-1)
                if self.bottom_deltas is not None:
                    d[:len(self.bottom_deltas)] = self.bottom_deltas
                return d
            if any(d is None for d in self.deltas):
                missing = [i for i, d in enumerate(self.deltas) if d is None]
                raise RuntimeError(f"blocks {missing} recorded no delta in this training forward")
            return torch.stack(self.deltas)  # type: ignore[arg-type]


class _AlastBlockMixin:
    """Mixed in front of the block's own class; see the module docstring."""

    _alast_index: int
    _alast_prefix: int
    _alast_pool: int | None  # see tokens.summary_pool
    _alast_control: StepControl
    _alast_in_block: bool  # see selects_in_block
    _alast_positions: str | None  # see position_kind

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:  # type: ignore[override]
        ctl = self._alast_control
        i = self._alast_index
        n_patch = x.shape[1] - self._alast_prefix
        keep = ctl.keep[i] if self.training and ctl.keep is not None else None
        dropping = keep is not None and keep < n_patch
        if self._alast_positions == "rotary":
            return self._alast_eva_forward(ctl, i, x, n_patch, keep if dropping else None, *args, **kwargs)
        if self._alast_positions == "relative":
            return self._alast_beit_forward(ctl, i, x, n_patch, keep if dropping else None, *args, **kwargs)
        if dropping and self._alast_in_block and not ctl.fuse and not args and not kwargs:
            try:
                return self._alast_select_inside(ctl, i, x, n_patch, int(keep))[0]
            finally:
                self.attn.qkv.__dict__.pop("_alast_qkv_out", None)
        qkv = self.attn.qkv
        try:
            out = self._alast_block_compute(x, *args, **kwargs)
            qkv_out = qkv.__dict__.get("_alast_qkv_out")
        finally:
            qkv.__dict__.pop("_alast_qkv_out", None)  # never hold the activation past the block
        if not self.training or ctl.keep is None:
            return out
        ctl.tokens_in[i] = n_patch
        ctl.scores[i] = None
        pool = self._alast_pool
        if not dropping:
            ctl.record_delta(i, x, out, pool)
            return out
        if qkv_out is None:
            raise RuntimeError(f"block {i}: the qkv hook did not run; is this a standard timm Attention?")
        attn = self.attn
        ctl.scores[i] = scores = cls_attention_scores(
            qkv_out, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm, attn.k_norm, ctl.score, pool)
        rank = ranking_scores(scores, ctl.select, ctl.draws(i), ctl.generator, ctl.temperature)
        kept = select_tokens(out, scores, int(keep), self._alast_prefix, fuse=ctl.fuse, rank=rank)
        # a pooled delta compares the kept tokens with their own inputs (selection is linear in x)
        x_kept = x if pool is None else select_tokens(x.detach(), scores, int(keep), self._alast_prefix,
                                                      fuse=ctl.fuse, rank=rank)
        ctl.record_delta(i, x_kept, kept, pool)
        return kept

    def _alast_eva_forward(self, ctl: StepControl, i: int, x: Tensor, n_patch: int, keep: int | None,
                           rope: Tensor | None = None, attn_mask: Tensor | None = None,
                           is_causal: bool = False) -> Tensor:
        """:meth:`forward` of an ``EvaBlock``: the rotary embeddings follow the tokens that remain."""
        if not self.training or ctl.keep is None:
            return self._alast_block_compute(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if i == 0:
            ctl.positions = None
        if rope is not None and ctl.positions is not None:
            rope = rope_at_positions(rope, ctl.positions)
        ctl.tokens_in[i] = n_patch
        ctl.scores[i] = None
        if keep is None:
            out = self._alast_block_compute(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            ctl.record_delta(i, x, out, self._alast_pool)
            return out
        if attn_mask is not None or is_causal:
            raise RuntimeError(f"block {i} was given an attention mask; ALaST drops tokens only where every token "
                               "attends to every other")
        if ctl.fuse:
            raise RuntimeError("fusing the dropped tokens (policy.fuse_tokens) is not supported with rotary "
                               "position embeddings")
        out, kept = self._alast_select_inside(ctl, i, x, n_patch, int(keep), rope)
        ctl.positions = patch_positions(ctl.positions, kept, self._alast_prefix)
        return out

    def _alast_beit_forward(self, ctl: StepControl, i: int, x: Tensor, n_patch: int, keep: int | None,
                            shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        """:meth:`forward` of a BEiT block: the relative position biases follow the tokens that remain."""
        if not self.training or ctl.keep is None:
            return self._alast_block_compute(x, shared_rel_pos_bias=shared_rel_pos_bias)
        if i == 0:
            ctl.positions = None
        ctl.tokens_in[i] = n_patch
        ctl.scores[i] = None
        if keep is None and ctl.positions is None:
            out = self._alast_block_compute(x, shared_rel_pos_bias=shared_rel_pos_bias)
            ctl.record_delta(i, x, out, self._alast_pool)
            return out
        if ctl.fuse:
            raise RuntimeError("fusing the dropped tokens (policy.fuse_tokens) is not supported with relative "
                               "position biases")
        pos = RelativePositions(whole_bias(self), sequence_positions(ctl.positions, self._alast_prefix))
        if keep is None:  # every token it is given, biased for their positions
            parts = None if ctl.eager else self.__dict__.get("_alast_compiled_parts")
            out = beit_forward(self, x, pos, None if parts is None else parts[1])
            ctl.record_delta(i, x, out, self._alast_pool)
            return out
        out, kept = self._alast_select_inside(ctl, i, x, n_patch, int(keep), pos)
        ctl.positions = patch_positions(ctl.positions, kept, self._alast_prefix)
        return out

    def _alast_select_inside(self, ctl: StepControl, i: int, x: Tensor, n_patch: int, keep: int,
                             pos: Tensor | RelativePositions | None = None) -> tuple[Tensor, Tensor]:
        """The block on the ``keep`` patch tokens it keeps (:func:`forward_selecting`), its records
        in ``ctl``; returns its output and the kept positions."""
        out, scores, kept = forward_selecting(
            self, x, keep, self._alast_prefix, ctl.score,
            lambda s: ranking_scores(s, ctl.select, ctl.draws(i), ctl.generator, ctl.temperature),
            parts=None if ctl.eager else self.__dict__.get("_alast_compiled_parts"), pool=self._alast_pool,
            pos=pos)
        ctl.tokens_in[i] = n_patch
        ctl.record_delta(i, x if self._alast_pool is None else take_tokens(x.detach(), kept), out, self._alast_pool)
        ctl.scores[i] = scores
        return out, kept

    def _alast_block_compute(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The upstream block forward; compiled once for all blocks by :meth:`AlastPatch.compile_blocks`."""
        compiled = self.__dict__.get("_alast_compiled")
        if compiled is not None and self.training and not self._alast_control.eager:
            return compiled(self, x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]


def selects_in_block(block: nn.Module) -> bool:
    """Whether ``block`` (patched or not) runs timm's own ``Block.forward`` and ``Attention.forward``
    (or ``EvaBlock.forward`` with ``EvaAttention`` or ``AttentionRope``, or BEiT's ``Block.forward``
    with its ``Attention``), the computation :func:`forward_selecting` reproduces for the kept tokens."""
    from timm.models.vision_transformer import Attention, Block

    base = getattr(block, "_alast_base", type(block))
    return is_eva_block(block) or is_beit_block(block) or (base.forward is Block.forward
                                   and type(getattr(block, "attn", None)).forward is Attention.forward)


@functools.cache
def _eva_forwards() -> tuple[Callable, tuple[Callable, ...]]:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock

    return EvaBlock.forward, (EvaAttention.forward, AttentionRope.forward)


def is_eva_block(block: nn.Module) -> bool:
    """Whether ``block`` (patched or not) runs timm's own ``EvaBlock.forward`` with its
    ``EvaAttention`` or ``AttentionRope`` (:func:`eva_selecting_head` reproduces them)."""
    block_forward, attn_forwards = _eva_forwards()
    base = getattr(block, "_alast_base", type(block))
    return base.forward is block_forward and type(getattr(block, "attn", None)).forward in attn_forwards


def rope_at_positions(rope: Tensor, positions: Tensor) -> Tensor:
    """The rotary embeddings of the patch tokens at ``positions`` ``[B, n]`` (in the image's grid):
    ``rope`` as timm's ``Eva`` gives a block, ``[N, D]``, ``[H, N, D]`` (per head: ``rope_mixed``), or
    with a batch dimension in front (after timm's patch dropout), each with ``N`` on dim -2.
    Returns ``[B, 1 or H, n, D]``, which broadcasts over the queries' and keys' heads."""
    if rope.ndim == 2:
        return rope[positions].unsqueeze(1)
    if rope.ndim == 3:
        return rope[:, positions].transpose(0, 1)
    index = positions[:, None, :, None].expand(-1, rope.shape[1], -1, rope.shape[-1])
    return torch.gather(rope, 2, index)


def rotary_embeddings(model: nn.Module) -> Tensor | None:
    """The rotary embeddings timm's ``Eva`` computes for every patch token (every block's, ``[depth,
    ...]``, in mixed mode), as its ``_pos_embed`` does without augmentation; None without them."""
    rope = getattr(model, "rope", None) if is_eva_model(model) else None
    if rope is None:
        return None
    cached = getattr(rope, "feat_shape", None) is not None  # else timm passes the grid (dynamic_img_size)
    return rope.get_embed() if cached else rope.get_embed(shape=list(model.patch_embed.grid_size))


def block_rope(model: nn.Module, index: int = 0) -> Tensor | None:
    """The rotary embeddings timm's ``Eva`` gives block ``index`` when every patch token is there
    (None for a model without them), without a gradient: for measuring the block's costs."""
    with torch.no_grad():
        emb = rotary_embeddings(model)
    if emb is None:
        return None
    return emb[index] if getattr(model, "rope_mixed", False) else emb


def patch_positions(positions: Tensor | None, kept: Tensor, num_prefix: int) -> Tensor:
    """The grid positions of the patch tokens a selection keeps: ``kept`` ``[B, num_prefix + k]``,
    sequence positions with the prefix first, of tokens at grid ``positions`` (None: every patch
    token, in order)."""
    with torch.no_grad():
        kept_patches = kept[:, num_prefix:] - num_prefix
        return kept_patches if positions is None else torch.gather(positions, 1, kept_patches)


def forward_selecting(block: nn.Module, x: Tensor, keep: int, num_prefix: int, score: str = "attention",
                      rank: Callable[[Tensor], Tensor] | None = None,
                      parts: tuple[Callable, Callable] | None = None, pool: int | None = None,
                      pos: Tensor | RelativePositions | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """timm's ``Block.forward`` on ``x`` ``[B, N, D]`` for the tokens it keeps: the prefix and the
    ``keep`` patch tokens ranked highest by ``rank(scores)`` (default: the scores), in their order.

    The scores (:func:`cls_attention_scores` of the qkv projection) are known before the attention
    runs, so only the kept tokens are queries, and the attention's output projection, the
    residuals and the MLP run on them alone; every token is still a key and a value. The kept
    tokens' outputs equal those of the whole block (``select_tokens(block(x), ...)``): the dropped
    tokens' outputs were never read. Returns ``(out [B, num_prefix + keep, D], scores [B, N],
    kept [B, num_prefix + keep])``, ``kept`` the positions of ``out``'s tokens in ``x``. ``pool``:
    the scores' query (see :mod:`.tokens`). ``block`` must pass :func:`selects_in_block`.

    The block runs in two parts, :func:`selecting_head` (up to the scores) and
    :func:`selecting_tail` (the kept tokens' attention, projection and MLP); ``parts`` replaces
    them, e.g. with their compiled versions (:meth:`AlastPatch.compile_blocks`). The ranking and
    the choice of the kept indices run between them, eagerly. An ``EvaBlock`` runs
    :func:`eva_selecting_head` and :func:`eva_selecting_tail`, with ``pos`` the rotary embeddings
    of ``x``'s patch tokens (as its ``forward`` takes them); a BEiT block runs
    :func:`~.relpos.beit_selecting_head` and :func:`~.relpos.beit_selecting_tail`, with ``pos`` the
    :class:`~.relpos.RelativePositions` of ``x``'s tokens.
    """
    kind = block.__dict__.get("_alast_positions", False)  # a patched block says; else (profiling) ask its class
    if kind is False:
        kind = block_position_kind(block)
    head, tail = parts or SELECTING_PARTS[kind]
    h, qkv, scores = head(block, x, score, pool) if kind is None else head(block, x, score, pool, pos)
    kept = kept_indices(scores if rank is None else rank(scores), keep, num_prefix)
    return tail(block, x, h, qkv, kept), scores, kept


def selecting_head(block: nn.Module, x: Tensor, score: str, pool: int | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The first part of :func:`forward_selecting`: the normed input ``h``, the qkv projection and
    the tokens' scores."""
    attn = block.attn
    h = block.norm1(x)
    qkv = attn.qkv(h)
    scores = cls_attention_scores(qkv, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm, attn.k_norm, score,
                                  pool)
    return h, qkv, scores


def selecting_tail(block: nn.Module, x: Tensor, h: Tensor, qkv: Tensor, kept: Tensor) -> Tensor:
    """The second part of :func:`forward_selecting`: the block's output for the ``kept`` positions
    ``[B, k]``, every token a key and a value."""
    attn = block.attn
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    # One unbind, not three slices: its backward stacks the three gradients in one kernel, where each
    # slice's backward would write a zero-filled copy of the whole projection and then add them up.
    q, k, v = qkv.reshape(b, n, 3, heads, head_dim).unbind(2)
    q = attn.q_norm(take_tokens(q, kept).transpose(1, 2))  # [B, H, kept, d]
    k = attn.k_norm(k.transpose(1, 2))
    v = v.transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if block.training else 0.0,
                                       scale=attn.scale)
    o = o.transpose(1, 2).reshape(b, kept.shape[1], heads * head_dim)
    if hasattr(attn, "norm"):  # timm's scale_norm (an identity unless set)
        o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(take_tokens(h, kept)).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    out = take_tokens(x, kept) + block.drop_path1(block.ls1(o))
    return out + block.drop_path2(block.ls2(block.mlp(block.norm2(out))))


def _eva_qkv(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values of timm's ``EvaAttention`` or ``AttentionRope`` on ``h``, as its
    ``forward`` computes them: ``[B, heads, N, d]`` (keys and values with their own head count under
    grouped-query attention), before the norms and the rotation."""
    b, n, _ = h.shape
    heads = attn.num_heads
    if attn.qkv is None:
        kv_heads = getattr(attn, "num_kv_heads", heads)
        q = attn.q_proj(h).reshape(b, n, heads, -1)
        k = attn.k_proj(h).reshape(b, n, kv_heads, -1)
        v = attn.v_proj(h).reshape(b, n, kv_heads, -1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        qkv = attn.qkv(h)
    else:
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)
    q, k, v = qkv.reshape(b, n, 3, heads, -1).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def eva_selecting_head(block: nn.Module, x: Tensor, score: str, pool: int | None = None,
                       rope: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
    """:func:`selecting_head` of an ``EvaBlock``: the normed input, the queries, keys and values as
    its attention uses them (normed, the patch tokens rotated by ``rope``, the key and value heads
    repeated under grouped-query attention) and the tokens' scores from them."""
    from timm.layers import apply_rot_embed_cat

    attn = block.attn
    h = block.norm1(x)
    q, k, v = _eva_qkv(attn, h)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return h, (q, k, v), row_attention_scores(q, k, v, attn.scale, score, pool)


def eva_selecting_tail(block: nn.Module, x: Tensor, h: Tensor, qkv: tuple[Tensor, Tensor, Tensor],
                       kept: Tensor) -> Tensor:
    """:func:`selecting_tail` of an ``EvaBlock``: its output for the ``kept`` positions."""
    attn = block.attn
    q, k, v = qkv
    q = take_tokens(q.transpose(1, 2), kept).transpose(1, 2)  # [B, H, kept, d]
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if block.training else 0.0,
                                       scale=attn.scale)
    o = attn.norm(o.transpose(1, 2).reshape(x.shape[0], kept.shape[1], -1))
    if attn.gate is not None:
        o = o * attn.gate(take_tokens(h, kept)).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    if block.gamma_1 is not None:
        o = block.gamma_1 * o
    out = take_tokens(x, kept) + block.drop_path1(o)
    m = block.mlp(block.norm2(out))
    if block.gamma_2 is not None:
        m = block.gamma_2 * m
    return out + block.drop_path2(m)


# the two parts of forward_selecting, by the position input a model's blocks take (position_kind)
SELECTING_PARTS: dict[str | None, tuple[Callable, Callable]] = {
    None: (selecting_head, selecting_tail),
    "rotary": (eva_selecting_head, eva_selecting_tail),
    "relative": (beit_selecting_head, beit_selecting_tail),
}


def _qkv_hook(module: nn.Module, _inputs, output: Tensor) -> None:
    """Keep the fused qkv projection's output for the block's CLS-attention scores.

    One module-level function for every block (no per-block closure, no flag read), so a compiled
    block forward traces the same hook for every block and never guards on which block it is.
    """
    module._alast_qkv_out = output


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Alast{cls.__name__}", (_AlastBlockMixin, cls), {"_alast_base": cls})
    return _PATCHED_CLASSES[cls]


class AlastPatch:
    """Handle on a patched model: per-block parameters, the step control, and :meth:`unpatch`."""

    def __init__(self, model: nn.Module) -> None:
        check_patchable(model)
        self.model = model
        self.blocks: list[nn.Module] = list(model.blocks)
        self.num_blocks = len(self.blocks)
        self.num_prefix = int(model.num_prefix_tokens)
        self.pool = summary_pool(model)
        self.num_patches = int(model.patch_embed.num_patches)
        self.control = StepControl()
        self.position_kind = position_kind(model)
        self._hooks = []
        for i, blk in enumerate(self.blocks):
            blk._alast_index = i
            blk._alast_prefix = self.num_prefix
            blk._alast_pool = self.pool
            blk._alast_control = self.control
            blk._alast_in_block = selects_in_block(blk)
            blk._alast_positions = self.position_kind
            blk.__class__ = _patched_class(type(blk))
            if self.position_kind is None:  # an Eva or BEiT block always selects inside: it reads no hook
                self._hooks.append(blk.attn.qkv.register_forward_hook(_qkv_hook))
        model._alast_patch = self

    def unpatch(self) -> nn.Module:
        """Restore the original block classes and remove hooks; returns the plain timm model."""
        for h in self._hooks:
            h.remove()
        for blk in self.blocks:
            blk.__class__ = blk._alast_base
            for attr in ("_alast_index", "_alast_prefix", "_alast_pool", "_alast_control", "_alast_in_block",
                         "_alast_positions", "_alast_compiled", "_alast_compiled_parts"):
                if attr in blk.__dict__:
                    delattr(blk, attr)
        if "_alast_patch" in self.model.__dict__:
            del self.model._alast_patch
        return self.model

    def compile_blocks(self, **options) -> None:
        """Compile the block computations once, shared by every block (training forwards only).

        Three functions are compiled: the upstream block forward (blocks that keep every token,
        and blocks that are not timm's standard block), and the two parts of a block that drops
        tokens inside (:func:`selecting_head`, :func:`selecting_tail`). The ranking, the choice of
        the kept tokens, the deltas and the scores' use stay outside the compiled regions, so
        moving budgets do not recompile: the token dimensions are dynamic (``dynamic=True``) and
        the blocks share the compiled code (dynamo treats each block's parameters as inputs).
        What remains guarded is whether the block's parameters and input require grad: at most
        four graphs per function.
        """
        import torch

        base = self.blocks[0]._alast_base
        if any(b._alast_base is not base for b in self.blocks):
            raise PatchError("blocks of different classes cannot share one compiled forward")
        options = {"dynamic": True, **options}
        compiled = torch.compile(base.forward, **options)
        parts = tuple(torch.compile(part, **options) for part in SELECTING_PARTS[self.position_kind])
        for blk in self.blocks:
            blk._alast_compiled = compiled
            if blk._alast_in_block:
                blk._alast_compiled_parts = parts

    @contextmanager
    def training_forward(self, keep: tuple[int | None, ...], noise: list[Tensor | None] | None = None,
                         rows: slice = slice(None)) -> Iterator[StepControl]:
        """Within the block, training forwards drop tokens per ``keep`` and record deltas. ``noise``
        and ``rows``: a pass of a step run in passes (:attr:`StepControl.noise`)."""
        if len(keep) != self.num_blocks:
            raise ValueError(f"keep has {len(keep)} entries for {self.num_blocks} blocks")
        ctl = self.control
        ctl.keep = tuple(keep)
        ctl.noise, ctl.rows = noise, rows
        ctl.deltas = [None] * self.num_blocks
        ctl.cls_rows = None
        ctl.bottom_deltas = None
        ctl.scores = [None] * self.num_blocks
        ctl.tokens_in = [0] * self.num_blocks
        ctl.positions = None
        try:
            yield ctl
        finally:
            ctl.keep = None
            ctl.scores = [None] * self.num_blocks
            ctl.positions = None
            ctl.noise, ctl.rows = None, slice(None)


POOLED_HEADS = ("avg", "avgmax", "max", "map")  # timm's global_pool values that read every patch token


def is_eva_model(model: nn.Module) -> bool:
    """Whether ``model`` is timm's ``Eva`` (rotary position embeddings: EVA-02, DINOv3, PE, RoPE ViTs)."""
    from timm.models.eva import Eva

    return isinstance(model, Eva)


def position_kind(model: nn.Module) -> str | None:
    """What tells ``model``'s blocks where their tokens sit: ``rotary`` embeddings (timm's ``Eva``),
    ``relative`` position biases (timm's ``Beit``), or None (positions added once, before the
    blocks). Where they do, the blocks after a drop are given the positions of the tokens they hold,
    and dropped tokens cannot be fused into one (it has no position)."""
    if is_eva_model(model):
        return "rotary"
    return "relative" if is_beit_model(model) else None


def block_position_kind(block: nn.Module) -> str | None:
    """:func:`position_kind` of the model a block (patched or not) belongs to, from the block's class."""
    if is_eva_block(block):
        return "rotary"
    return "relative" if is_beit_block(block) else None


def check_patchable(model: nn.Module) -> None:
    """Raise :class:`PatchError` unless ``model`` is a timm ViT/DeiT (or ``Eva``) that ALaST can drive."""
    from timm.models.vision_transformer import VisionTransformer

    name = type(model).__name__
    kind = position_kind(model)
    if not isinstance(model, VisionTransformer) and kind is None:
        raise PatchError(f"{name} is not a timm VisionTransformer, Eva or Beit; ALaST supports timm ViT/DeiT models, "
                         "Eva (EVA-02, DINOv3, RoPE ViTs) and BEiT")
    if getattr(model, "cls_token", None) is None and model.global_pool not in POOLED_HEADS:
        raise PatchError(f"{name} has neither a class token nor a pooled head (global_pool={model.global_pool!r}); "
                         f"ALaST reads a model through its class token or the mean of its patch tokens: use "
                         f"global_pool='avg' or 'map'")
    sequential = nn.Sequential if kind is None else nn.ModuleList  # Eva's and Beit's forward run theirs in order
    if not isinstance(model.blocks, sequential) or len(model.blocks) == 0:
        raise PatchError(f"{name} has no sequential transformer blocks")
    if kind == "rotary":
        _check_eva(model, name)
    if kind == "relative":
        _check_beit(model, name)
    for i, blk in enumerate(model.blocks if kind is None else ()):
        attn = getattr(blk, "attn", None)
        qkv = getattr(attn, "qkv", None)
        linear = getattr(qkv, "base_layer", qkv)  # a peft LoRA layer wraps the original Linear
        if attn is None or not isinstance(linear, nn.Linear) or not hasattr(attn, "num_heads"):
            raise PatchError(f"block {i} of {name} is a {type(blk).__name__}, with no attention module of its own "
                             "that has a qkv projection (block.attn.qkv); ALaST supports standard ViT blocks")
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None or linear.out_features != 3 * attn.num_heads * head_dim:
            raise PatchError(f"block {i} of {name} has {type(attn).__name__}, whose qkv projection is not one query, "
                             "key and value per head; ALaST supports timm's standard Attention")
    if isinstance(model.blocks[0], _AlastBlockMixin):
        raise PatchError("model is already patched for ALaST")


def _check_beit(model: nn.Module, name: str) -> None:
    """The part of :func:`check_patchable` for timm's ``Beit``: blocks that :func:`~.relpos.is_beit_block`,
    each with its own relative position bias (or none)."""
    if getattr(model, "rel_pos_bias", None) is not None:
        raise PatchError(f"{name} shares one relative position bias between its blocks (use_shared_rel_pos_bias); "
                         "ALaST drives Beit models whose blocks have their own, as timm's BEiT and BEiT v2 models do")
    for i, blk in enumerate(model.blocks):
        if not is_beit_block(blk):
            raise PatchError(f"block {i} of {name} is {type(blk).__name__} (attention: "
                             f"{type(getattr(blk, 'attn', None)).__name__}); ALaST drives Beit models whose blocks are "
                             "timm's BEiT Block with its Attention")


def _check_eva(model: nn.Module, name: str) -> None:
    """The part of :func:`check_patchable` for timm's ``Eva``: blocks that :func:`is_eva_block`."""
    for i, blk in enumerate(model.blocks):
        if not is_eva_block(blk):
            raise PatchError(f"block {i} of {name} is {type(blk).__name__} (attention: "
                             f"{type(getattr(blk, 'attn', None)).__name__}); ALaST drives Eva models whose blocks are "
                             "timm's pre-norm EvaBlock with EvaAttention or AttentionRope")
        if blk.attn.num_prefix_tokens != model.num_prefix_tokens:
            raise PatchError(f"block {i} of {name} rotates from token {blk.attn.num_prefix_tokens}, but the model has "
                             f"{model.num_prefix_tokens} prefix tokens")
