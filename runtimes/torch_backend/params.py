"""The model's parameters as the torch runtime trains them: LoRA adapters (peft), the timm ViT
inside a peft wrapper, the stem feeding block 0, and AdamW's weight-decay groups."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .flops import grad_flags_restored


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``targets``; the head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA target(s) {missing} not found in the model; e.g. qkv, proj, fc1, fc2")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     modules_to_save=["head"])
    return get_peft_model(model, cfg)


def timm_model(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside a (possibly peft-wrapped) model."""
    base = getattr(model, "base_model", None)
    return base.model if base is not None and hasattr(base, "model") else model


def is_adapter(param: nn.Parameter, model: nn.Module) -> bool:
    names = getattr(model, "_alast_adapter_ids", None)
    if names is None:
        names = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        model._alast_adapter_ids = names
    return id(param) in names


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    skip = set(getattr(timm_model(model), "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split("base_model.model.", 1)[-1]
        (no_decay if p.ndim <= 1 or short in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def input_channels(vit: nn.Module) -> int:
    """The image channels a timm ViT takes: those of the first convolution of its patch embedding
    (``patch_embed.proj`` is that convolution in a plain ViT, but the layer after a CNN stem in a
    hybrid one, ``HybridEmbed``, where it may even be an ``Identity``)."""
    return next(m for m in vit.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels


def embedding_parameters(vit: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the blocks that feeds block 0 of a timm ViT: the patch embedding, the
    class, register and distillation tokens, the position embedding, a pre-norm. With them frozen,
    autograd stops at the lowest trained block. Found by autograd on one blank image, so a model
    with a stem parameter of its own is covered too."""
    in_blocks = {id(p) for p in vit.blocks.parameters()}
    outside = [p for p in vit.parameters() if id(p) not in in_blocks]
    ref = next(vit.parameters())
    in_chans = input_channels(vit)
    x = torch.zeros(1, in_chans, *vit.patch_embed.img_size, device=ref.device, dtype=ref.dtype)
    with grad_flags_restored(outside, set_to=True), torch.enable_grad():
        stem = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        grads = torch.autograd.grad(stem.sum(), outside, allow_unused=True)
    return [p for p, g in zip(outside, grads) if g is not None]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW; on CUDA the fused kernel (one launch for all parameters instead of several per
    tensor group), which needs floating-point parameters on the device."""
    groups = _param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = device.type == "cuda" and all(p.is_floating_point() and p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
