"""Token math for ALaST on tensors: CLS deltas, token scores from the CLS attention, selection.

Pure functions with no model code, shared by the eager backend and the ONNX training graph.

The paper reads a block's importance and the tokens' ranks from the class token. A model without
one (global average or attention pooling, as in SigLIP or timm's ``*_gap_*`` ViTs) is read through
its pooled patch tokens instead: ``pool`` is the position its patch tokens start at (after any
register tokens), and the mean of the tokens from there on takes the class token's place, in the
delta (:func:`cls_delta`) and as the query that ranks the tokens (:func:`cls_attention_scores`).
``pool=None`` is the class token at position 0 (:func:`summary_pool` says which a model needs).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def summary_pool(vit: torch.nn.Module) -> int | None:
    """``pool`` for a timm ViT: None where it has a class token, else where its patch tokens start."""
    return None if getattr(vit, "cls_token", None) is not None else int(vit.num_prefix_tokens)


def cls_delta(x_in: Tensor, x_out: Tensor, pool: int | None = None, same_tokens: bool = False) -> Tensor:
    """Per-sample ``||CLS_out - CLS_in||^2`` (shape ``[B]``, float32, no gradient).

    With ``pool`` (a model without a class token), the squared norm of the mean update of the
    tokens from position ``pool`` on: ``||mean_j (out_j - in_j)||^2``, ``x_in`` holding the same
    tokens as ``x_out`` (a dropping block's kept tokens, selected from its input as from its output).
    ``same_tokens``: ``x_in`` and ``x_out`` hold the same tokens (a block that kept them all); an ONNX
    graph then takes the class token from the whole difference (the same numbers), as ONNX Runtime
    Training mis-shapes the gradient of a block output whose class token is gathered beside a head's
    slice of the other tokens (EVA-02's average-pooled head) and refuses the graph.
    """
    with torch.no_grad():
        if pool is None:
            if same_tokens and torch.onnx.is_in_onnx_export():
                return (x_out.float() - x_in.float())[:, 0].pow(2).sum(-1)
            return (x_out[:, 0].float() - x_in[:, 0].float()).pow(2).sum(-1)
        if x_in.shape != x_out.shape:
            raise ValueError(f"a pooled delta needs the block's input and output for the same tokens, "
                             f"got {tuple(x_in.shape)} and {tuple(x_out.shape)}")
        return (x_out[:, pool:].float() - x_in[:, pool:].float()).mean(1).pow(2).sum(-1)


TOKEN_SCORES = ("attention", "contribution")
TOKEN_SELECTIONS = ("top", "sample", "random")


def _check_known(what: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"unknown token {what} {value!r}; use one of {', '.join(known)}")


def check_temperature(temperature: float) -> None:
    """Refuse (ValueError) a token temperature that is not a positive finite number."""
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"policy.token_temperature must be a positive number, got {temperature}")


def check_token_choice(select: str, score: str) -> None:
    """Refuse (ValueError) a token selection or score this module does not know."""
    _check_known("selection", select, TOKEN_SELECTIONS)
    _check_known("score", score, TOKEN_SCORES)


def cls_attention_scores(qkv: Tensor, num_heads: int, head_dim: int, scale: float,
                         q_norm: torch.nn.Module, k_norm: torch.nn.Module, score: str = "attention",
                         pool: int | None = None) -> Tensor:
    """Per-token scores from the CLS query's attention, from the fused qkv projection.

    ``qkv`` is the output of the attention's qkv linear, ``[B, N, 3 * heads * head_dim]``.
    Returns ``[B, N]``, averaged over heads: with ``score="attention"`` row 0 of the softmax
    attention map (the paper); with ``"contribution"`` that row times the norm of each token's value
    vector, the size of what the token adds to the class token's update (Kobayashi et al., 2020,
    "Attention is not only a weight"; Fayyaz et al., 2022, ATS).

    With ``pool`` (a model without a class token) the query is the mean of the queries of the
    tokens from position ``pool`` on: one attention row, as cheap as the class token's. (The mean of
    every token's attention row would cost a second attention map per block.)
    """
    _check_known("score", score, TOKEN_SCORES)
    with torch.no_grad():
        b, n, _ = qkv.shape
        qkv = qkv.detach().reshape(b, n, 3, num_heads, head_dim)
        if pool is None:
            q = q_norm(qkv[:, :1, 0].transpose(1, 2))  # [B, H, 1, d]
        else:
            q = q_norm(qkv[:, pool:, 0].transpose(1, 2)).mean(dim=2, keepdim=True)
        k = k_norm(qkv[:, :, 1].transpose(1, 2))  # [B, H, N, d]
        # In the activations' dtype (the product is one row per head); softmax in float32.
        attn = ((q * scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).squeeze(2)  # [B, H, N]
        if score == "contribution":
            v_norm = torch.linalg.vector_norm(qkv[:, :, 2], dim=-1, dtype=torch.float32)  # ||v_j||: [B, N, H]
            attn = attn * v_norm.transpose(1, 2)
        return attn.mean(dim=1)


def row_attention_scores(q: Tensor, k: Tensor, v: Tensor, scale: float, score: str = "attention",
                         pool: int | None = None, bias: Tensor | None = None) -> Tensor:
    """:func:`cls_attention_scores` from a block's queries, keys and values ``[B, H, N, d]``, as
    the attention uses them (normed, rotated where the model has rotary position embeddings);
    ``bias`` ``[B, H, 1, N]``: what the attention adds to the row's logits (BEiT's relative
    position bias)."""
    _check_known("score", score, TOKEN_SCORES)
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        row = q[:, :, :1] if pool is None else q[:, :, pool:].mean(dim=2, keepdim=True)  # [B, H, 1, d]
        logits = (row * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        attn = logits.float().softmax(dim=-1).squeeze(2)  # [B, H, N]
        if score == "contribution":
            attn = attn * torch.linalg.vector_norm(v.detach(), dim=-1, dtype=torch.float32)
        return attn.mean(dim=1)


def tempered(noise: Tensor, temperature: float) -> Tensor:
    """Uniform draws ``u`` in [0, 1) turned into the draws that make ``sample`` keep tokens in
    proportion to ``score ** (1 / temperature)`` (:func:`ranking_scores`): ``u' = exp(-(-log u) **
    temperature)``, under which ``log u' / s`` ranks as ``s ** (1 / T) / (-log u)``. Below 1 the draw
    leans to the top scores, above 1 towards a uniform draw; at 1 ``u`` itself. A draw of 0 stays 0
    (it ranks last)."""
    if temperature == 1.0:
        return noise
    return noise.log().neg_().pow_(temperature).neg_().exp_()


def ranking_scores(scores: Tensor, select: str, noise: Tensor | None = None,
                   generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
    """Scores whose top-k is the kept set, from non-negative token ``scores`` ``[B, N]``.

    ``top``: the scores themselves (the paper's top-k). ``sample``: a draw of k tokens without
    replacement with probability proportional to the score: each token's score over an exponential
    draw ``-log(u)``, whose top-k is the Gumbel-top-k of the scores' logarithm with the same draws
    (``log s - log(-log u)``, a monotone function of it): four kernels with the draw, not nine.
    ``random``: uniform noise, a random subset. ``noise``: the uniform draws in [0, 1) to use, shaped
    like ``scores`` (an ONNX graph takes them as an input, :func:`tempered` by the runtime); default:
    drawn here from ``generator`` (torch's default generator if None). ``temperature``
    (``policy.token_temperature``): ``sample`` draws in proportion to ``score ** (1 / temperature)``,
    ranking by ``-(-log u) ** T / s``, which ranks as ``log u' / s`` with ``u'`` the :func:`tempered`
    draws, without their exp and log (two kernels fewer per dropping block, each step).
    """
    if select == "top":
        return scores
    _check_known("selection", select, TOKEN_SELECTIONS)
    with torch.no_grad():
        if noise is None:
            noise = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
        if select == "random":
            return noise
        # select == "sample": log(u) / s ranks as s / (-log u). A zero score ranks below every positive
        # one and is drawn among its equals (the clamp); u = 0 ranks last (-inf).
        if temperature != 1.0:
            return noise.log().neg_().pow_(temperature).div_(scores.clamp_min(1e-30)).neg_()
        return noise.log() / scores.clamp_min(1e-30)


class _TakeTokens(torch.autograd.Function):
    """``torch.gather`` along the token axis whose backward keeps only the indices.

    ``torch.gather`` saves its whole input for the backward, although the gradient needs only the
    input's shape: here every entering token would stay alive until the backward. This keeps the
    indices alone (``index`` is an expanded view of ``[B, k, 1, ...]``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return torch.gather(x, 1, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.input_shape).scatter_(1, index, grad), None  # indices are distinct


def _top_in_order(rank: Tensor, keep: int | Tensor) -> Tensor:
    """Indices of the ``keep`` highest entries of each row of ``rank``, in ascending order."""
    return rank.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values


_PREFIX_MASKS: dict[tuple[int, torch.device], Tensor] = {}


def _prefix_mask(n: int, num_prefix: int, like: Tensor) -> Tensor:
    """``[n]`` bool, True at the prefix positions, on ``like``'s device: a view of a mask built once
    per prefix and device (and again only for a longer sequence), so that new token counts launch no
    kernel. For fake tensors (FLOPs counted on shapes alone) a mask of their own, not kept."""
    device = like.device
    if type(like) is not Tensor and is_fake(like):
        return torch.arange(n, device=device) < num_prefix
    key = (num_prefix, device)
    mask = _PREFIX_MASKS.get(key)
    if mask is None or mask.shape[0] < n:
        mask = _PREFIX_MASKS[key] = torch.arange(max(n, 1024), device=device) < num_prefix
    return mask[:n]


def kept_indices(rank: Tensor, keep: int, num_prefix: int) -> Tensor:
    """Sequence positions a selection keeps, ``[B, num_prefix + keep]``: the prefix tokens, then
    the ``keep`` patch tokens ranked highest by ``rank`` ``[B, N]``, in their original order.

    The prefix is ranked first (+inf) and taken by the same top-k: three kernels, where the patch
    tokens' top-k, an offset and a concatenation with the prefix positions took five."""
    if num_prefix == 0:
        return _top_in_order(rank, keep)
    with torch.no_grad():
        ranked = rank.masked_fill(_prefix_mask(rank.shape[1], num_prefix, rank), float("inf"))
    return _top_in_order(ranked, num_prefix + keep)


_ROWS_BY_GATHER_ND = False  # inside rows_by_gather_nd(): ONNX training graphs take tokens by GatherND


@contextlib.contextmanager
def rows_by_gather_nd() -> Iterator[None]:
    """Within it, :func:`take_tokens` exports as one ``GatherND`` (``batch_dims=1``): for ONNX
    Runtime *training* graphs. ORT's CPU gradient of a ``Gather`` takes a mutex for every element
    it adds, so its threads queue on it; ``GatherND``'s gradient is a serial loop without one.
    Inference graphs keep the plain ``Gather``, which more runtimes support."""
    global _ROWS_BY_GATHER_ND
    outer = _ROWS_BY_GATHER_ND
    _ROWS_BY_GATHER_ND = True
    try:
        yield
    finally:
        _ROWS_BY_GATHER_ND = outer


def _take_rows(x: Tensor, positions: Tensor, row: tuple[int, ...]) -> Tensor:
    """``x[b, positions[b]]`` by one ``index_select`` on the flattened rows (an ONNX ``Gather``)."""
    b, n = x.shape[0], x.shape[1]
    rows = positions + torch.arange(b, device=positions.device).unsqueeze(1) * n
    out = x.reshape(b * n, -1).index_select(0, rows.reshape(-1))
    return out.reshape(b, positions.shape[1], *row)


class _TakeRowsByGatherND(torch.autograd.Function):
    """ONNX export only: :func:`_take_rows` as one ``GatherND`` with ``batch_dims=1``."""

    @staticmethod
    def forward(ctx, x: Tensor, positions: Tensor, row: tuple[int, ...]) -> Tensor:  # the trace's values
        return _take_rows(x, positions, row)

    @staticmethod
    def symbolic(g, x, positions, row):
        from torch.onnx import symbolic_helper

        index = symbolic_helper._unsqueeze_helper(g, positions, [-1])
        out = g.op("GatherND", x, index, batch_dims_i=1)
        # ONNX's shape inference loses GatherND's rank here: a Reshape to (B, K, row) gives it back
        shape = g.op("Constant", value_t=torch.tensor([0, -1, *row], dtype=torch.int64))
        return g.op("Reshape", out, shape)


def take_tokens(x: Tensor, positions: Tensor) -> Tensor:
    """``x[b, positions[b]]`` along dim 1 of ``x`` ``[B, N, ...]``; its backward keeps only the
    positions (see :class:`_TakeTokens`). Under ONNX export: one ``Gather`` of the flattened rows,
    or within :func:`rows_by_gather_nd` one ``GatherND``."""
    if torch.onnx.is_in_onnx_export():
        row = tuple(int(d) for d in x.shape[2:])
        if _ROWS_BY_GATHER_ND:
            return _TakeRowsByGatherND.apply(x, positions, row)
        return _take_rows(x, positions, row)
    index = positions
    for _ in range(x.ndim - 2):
        index = index.unsqueeze(-1)
    index = index.expand(-1, -1, *x.shape[2:])
    if not x.requires_grad:
        return torch.gather(x, 1, index)
    return _TakeTokens.apply(x, index)


def select_tokens(x: Tensor, scores: Tensor, keep: int | Tensor, num_prefix: int, fuse: bool = False,
                  rank: Tensor | None = None) -> Tensor:
    """Keep the prefix tokens and the ``keep`` patch tokens with the highest scores.

    Each sample keeps its own indices (in their original order); the count is shared by the
    batch. Gradients flow to the kept tokens only; the backward keeps the indices, not ``x``.

    With ``fuse`` (EViT's token fusion), the last of the ``keep`` slots holds one token fused from
    the dropped ones instead: their mean weighted by score. The sequence length (so the cost of
    the blocks after) is the same; the dropped tokens' content stays in the sequence, and gradients
    reach them through the fused token. A fused token entering a later selection is ranked like
    any patch token (dropped again, it is fused again). With ``keep < 2`` there is no slot to
    spare, and the tokens are only selected.

    ``rank`` (default: ``scores``) ranks the tokens; ``scores`` weighs the fused token.
    """
    fuse = fuse and int(keep) >= 2
    patch_scores = scores[:, num_prefix:]
    patch_rank = patch_scores if rank is None else rank[:, num_prefix:]
    top = keep - 1 if fuse else keep
    idx = _top_in_order(patch_rank, top)
    patches = x[:, num_prefix:]
    parts = [x[:, :num_prefix], take_tokens(patches, idx)]
    if fuse:
        with torch.no_grad():
            w = patch_scores.scatter(1, idx, 0.0)  # the dropped tokens' scores; zero where kept
            w = (w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)).to(x.dtype)
        parts.append(torch.bmm(w.unsqueeze(1), patches))  # [B, 1, D]; its backward needs w only
    return torch.cat(parts, dim=1)
