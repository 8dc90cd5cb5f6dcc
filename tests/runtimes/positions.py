"""Reference computations for the models whose blocks take the positions of their tokens, built
from timm's own code: the stems, and the features a model gives when block 0 keeps some patch
tokens, for timm's ``Eva`` (rotary embeddings) and ``Beit`` (relative position biases)."""
import torch

from runtimes.torch_backend.patch import forward_selecting
from runtimes.torch_backend.relpos import RelativePositions, whole_bias
from runtimes.torch_backend.tokens import summary_pool, take_tokens


def eva_stem(model, x):
    tokens, rope = model._pos_embed(model.patch_embed(x))
    return model.norm_pre(tokens), rope


def eva_block_rope(model, rope, i):
    return rope[i] if getattr(model, "rope_mixed", False) else rope


def beit_stem(model, x):
    tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), model.patch_embed(x)), dim=1)
    return tokens if model.pos_embed is None else tokens + model.pos_embed


def eva_features_after_a_drop(model, images, keep0):
    """Block 0 keeps ``keep0`` patch tokens, chosen as the patched block chooses them; the blocks
    after run timm's forward on them, with the rotary embeddings gathered by timm's own patch
    dropout helper (``apply_keep_indices_nlc``)."""
    from timm.layers import apply_keep_indices_nlc

    x, rope = eva_stem(model, images)
    npt = model.num_prefix_tokens
    out, _, kept = forward_selecting(model.blocks[0], x, keep0, npt, pos=eva_block_rope(model, rope, 0),
                                     pool=summary_pool(model))
    keep_idx = kept[:, npt:] - npt
    for i, blk in enumerate(model.blocks[1:], 1):
        r = eva_block_rope(model, rope, i)
        if r.ndim == 2:
            r = apply_keep_indices_nlc(out, r, keep_idx).unsqueeze(1)  # [B, 1, n, D], as timm's patch dropout
        else:  # per head: [H, N, D] -> [B, H, n, D]
            r = torch.stack([apply_keep_indices_nlc(out, r[h], keep_idx) for h in range(r.shape[0])], dim=1)
        out = type(blk).forward(blk, out, rope=r)
    return model.norm(out)


def beit_features_after_a_drop(model, images, keep0):
    """Block 0 keeps ``keep0`` patch tokens, chosen as the patched block chooses them; the blocks
    after run timm's forward on every token with the dropped ones masked out as keys (a ``-inf``
    added to their columns through the block's shared-bias argument), which gives the kept tokens
    the outputs of a model that holds only them; the kept tokens' rows."""
    x = beit_stem(model, images)
    blk0 = model.blocks[0]
    _, _, kept = forward_selecting(blk0, x, keep0, 1, pos=RelativePositions(whole_bias(blk0), None))
    out = blk0(x)
    dropped = torch.ones(out.shape[:2], dtype=torch.bool).scatter_(1, kept, False)
    mask = torch.zeros(out.shape[:2]).masked_fill(dropped, float("-inf"))[:, None, None, :]  # [B, 1, 1, N]
    for blk in model.blocks[1:]:
        out = blk(out, shared_rel_pos_bias=mask)
    return model.norm(take_tokens(out, kept))
