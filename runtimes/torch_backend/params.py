"""The model's parameters as the torch runtime trains them: LoRA adapters (peft), the timm ViT
inside a peft wrapper, the stem feeding block 0, and AdamW's weight-decay groups."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .flops import grad_flags_restored
from .patch import rotary_embeddings
from .relpos import is_beit_model


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the blocks' Linear layers named ``targets``; every
    classifier head (:func:`classifier_names`) stays fully trainable, as it is new for the task."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_pattern(model, targets),
                     modules_to_save=classifier_names(model))
    return get_peft_model(model, cfg)


def classifier_names(model: nn.Module) -> list[str]:
    """The names of the model's classifier heads: what ``get_classifier()`` returns (a tuple for a
    distilled DeiT: ``head`` and ``head_dist``, whose logits it averages) and any other top-level
    ``head*`` module with parameters. Each is re-made for the task's classes, so each must train."""
    found = getattr(model, "get_classifier", lambda: ())()
    ids = {id(m) for m in (found if isinstance(found, tuple) else (found,))}
    return [n for n, m in model.named_children()
            if (id(m) in ids or n.startswith("head")) and next(m.parameters(), None) is not None]


def lora_target_pattern(model: nn.Module, targets: list[str]) -> str:
    """peft's ``target_modules`` for ``policy.lora.targets``: a regex that peft full-matches against
    module names, so that a target names a layer inside ``blocks.N.`` only (bare names would also
    match by suffix outside them: ``proj`` is the patch embedding's convolution too, and a SigLIP
    pooling head has ``proj``, ``fc1`` and ``fc2``). A ValueError in one line, naming the setting,
    for an empty list or a target that is not a Linear layer in the blocks."""
    linear = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.blocks[0].named_modules()
                                if isinstance(m, nn.Linear)))
    choose = f"name Linear layers inside the blocks, e.g. [{', '.join(linear)}]"
    if not targets:
        raise ValueError(f"policy.lora.targets is empty: LoRA would adapt nothing; {choose}")
    for t in targets:
        found = [m for blk in model.blocks for n, m in blk.named_modules() if n == t or n.endswith("." + t)]
        other = sorted({type(m).__name__ for m in found if not isinstance(m, nn.Linear)})
        if other:
            raise ValueError(f"policy.lora.targets: {t!r} is a module of type {'/'.join(other)}, not a Linear "
                             f"layer; {choose}")
        bypassed = [m for blk in model.blocks for n, m in blk.named_modules()
                    if (n == t or n.endswith("." + t)) and _weight_read_alone(blk, m)]
        if bypassed:
            raise ValueError(f"policy.lora.targets: {t!r} of {type(model).__name__} is applied through its weight alone "
                             "(its attention adds the query and value biases in F.linear, as timm's Eva and BEiT do), "
                             "so a LoRA adapter on it would never run; "
                             f"{choose.replace(t + ', ', '').replace(', ' + t + ']', ']')}")
        if found:
            continue
        if t.split(".")[0].startswith("head") or t in classifier_names(model):
            raise ValueError(f"policy.lora.targets: {t!r} is the classifier, which trains in full under LoRA; {choose}")
        outside = next((n for n, _ in model.named_modules() if n == t or n.endswith("." + t)), None)
        where = f"{t!r} is not inside a block (the model's {outside})" if outside else f"no layer {t!r} in the blocks"
        raise ValueError(f"policy.lora.targets: {where}; {choose}")
    return r"blocks\.\d+\.(?:.*\.)?(?:" + "|".join(re.escape(t) for t in targets) + ")"


def _weight_read_alone(block: nn.Module, layer: nn.Module) -> bool:
    """Whether ``layer`` is the fused ``qkv`` of timm's ``EvaAttention`` (or BEiT's ``Attention``) with query
    and value biases, whose forward calls ``F.linear`` on the layer's weight instead of calling the layer."""
    attn = getattr(block, "attn", None)
    return (layer is getattr(attn, "qkv", None) and getattr(attn, "q_bias", None) is not None
            and not getattr(attn, "qkv_bias_separate", True))


def timm_model(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer (or Eva) inside a (possibly peft-wrapped) model."""
    base = getattr(model, "base_model", None)
    return base.model if base is not None and hasattr(base, "model") else model


def is_adapter(param: nn.Parameter, model: nn.Module) -> bool:
    names = getattr(model, "_alast_adapter_ids", None)
    if names is None:
        names = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        model._alast_adapter_ids = names
    return id(param) in names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups, in the order it steps them: the weights with decay, then the biases,
    norms and the parameters timm exempts (``no_weight_decay``) without."""
    skip = set(getattr(timm_model(model), "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split("base_model.model.", 1)[-1]
        (no_decay if p.ndim <= 1 or short in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def block_signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures compute alike on the same shapes (the profile measures one of
    them, the ORT backend counts one): their modules' types, parameters (names, shapes, whether
    trainable), buffers, heads and attention kernel."""
    attn = getattr(block, "attn", None)
    return (tuple(type(m).__name__ for m in block.modules()),
            tuple((n, tuple(p.shape), p.requires_grad) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in block.named_buffers()),
            getattr(attn, "fused_attn", None), getattr(attn, "num_heads", None))


def input_channels(vit: nn.Module) -> int:
    """The image channels a timm ViT takes: those of the first convolution of its patch embedding
    (``patch_embed.proj`` is that convolution in a plain ViT, but the layer after a CNN stem in a
    hybrid one, ``HybridEmbed``, where it may even be an ``Identity``)."""
    return next(m for m in vit.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels


def embedding_parameters(vit: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the blocks that feeds block 0 of a timm ViT: the patch embedding, the
    class, register and distillation tokens, the position embedding, a pre-norm, learned rotary
    frequencies (they feed every block). With them frozen, autograd stops at the lowest trained
    block. Found by autograd on one blank image, so a model with a stem parameter of its own is
    covered too."""
    in_blocks = {id(p) for p in vit.blocks.parameters()}
    outside = [p for p in vit.parameters() if id(p) not in in_blocks]
    ref = next(vit.parameters())
    in_chans = input_channels(vit)
    x = torch.zeros(1, in_chans, *vit.patch_embed.img_size, device=ref.device, dtype=ref.dtype)
    with grad_flags_restored(outside, set_to=True), torch.enable_grad():
        stem = stem_tokens(vit, x).sum()
        rope = rotary_embeddings(vit)
        if rope is not None and rope.requires_grad:  # learned frequencies (timm's mixed mode) feed every block
            stem = stem + rope.sum()
        grads = torch.autograd.grad(stem, outside, allow_unused=True)
    return [p for p, g in zip(outside, grads) if g is not None]


def stem_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens a timm ViT's stem feeds block 0 from images ``x``: the patch embedding, the prefix
    tokens, the position embedding, patch dropout and the pre-norm (timm's ``Eva`` returns its rotary
    embeddings beside the tokens, and drops patches inside ``_pos_embed``; timm's ``Beit`` adds its
    class token and position embedding in ``forward_features``, as here)."""
    if is_beit_model(vit):
        tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), vit.patch_embed(x)), dim=1)
        return vit.pos_drop(tokens if vit.pos_embed is None else tokens + vit.pos_embed)
    tokens = vit._pos_embed(vit.patch_embed(x))
    if isinstance(tokens, tuple):
        tokens = tokens[0]
    else:
        tokens = vit.patch_drop(tokens)
    return vit.norm_pre(tokens)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW; on CUDA the fused kernel (one launch for all parameters instead of several per
    tensor group), which needs floating-point parameters on the device."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = device.type == "cuda" and all(p.is_floating_point() and p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def parameter_counts(model: nn.Module, trainable: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter counts for the run's summary: ``total`` (every parameter training works on: under
    LoRA the frozen base weights and the adapters, with peft's frozen copy of the classifier left
    out, since the trained copy replaces it), ``trainable`` (those the policy may train: with LoRA
    the adapters and the classifier; frozen embeddings left out) and ``updated`` (those the
    optimizer stepped at least once: AdamW keeps state only for a parameter that had a gradient,
    and a checkpoint carries that state across a resume)."""
    stepped = {id(p) for p, state in optimizer.state.items() if state}
    params = [p for n, p in model.named_parameters() if ".original_module." not in n]
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in {id(p): p for p in trainable}.values()),
            "updated": sum(p.numel() for p in params if id(p) in stepped)}
