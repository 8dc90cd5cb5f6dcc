"""Model creation: any timm ViT/DeiT, with timm's pretrained weights, a local checkpoint, or one of
the backbones alast pre-trains itself (``alast_demo_vit``, ``alast_vit12``)."""
from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import math
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alast.training.checkpoint import FORMAT as CHECKPOINT_FORMAT  # a run's training checkpoints

DEMO_MODEL = "alast_demo_vit"
ASSETS = Path(__file__).parent / "assets"
DEMO_WEIGHTS = ASSETS / "alast_demo_vit.safetensors"

# The demo backbone: a small ViT for 32x32 images, pre-trained by examples/pretrain_demo_backbone.py.
DEMO_ARCH: dict[str, Any] = dict(
    img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=3.0, qkv_bias=True,
)
DEMO_PRETRAINED_CFG: dict[str, Any] = dict(
    input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
    crop_pct=1.0, crop_mode="center", num_classes=0,
)


VIT12_MODEL = "alast_vit12"
VIT12_WEIGHTS = ASSETS / "alast_vit12_fdsl.safetensors"

# The paper-depth backbone: 12 blocks and 14x14 = 196 patch tokens like ViT-B/16 at 224 px, narrower
# than ViT-Tiny (dim 128, two heads of 64) so that CPU fine-tuning runs take minutes. Pre-trained on
# formula-driven fractals (alast/data/formula.py) by examples/pretrain_vit12_backbone.py.
VIT12_ARCH: dict[str, Any] = dict(
    img_size=112, patch_size=8, embed_dim=128, depth=12, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
)
VIT12_PRETRAINED_CFG: dict[str, Any] = dict(DEMO_PRETRAINED_CFG, input_size=(3, 112, 112))


class ModelError(ValueError):
    """The requested model cannot be built (unknown name, missing or bad weights)."""


@dataclass(frozen=True)
class ShippedModel:
    """A backbone alast pre-trains itself: timm ``VisionTransformer`` kwargs, preprocessing, weights."""

    arch: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    weights: Path
    missing: str  # the error when ``weights`` is absent: what to do instead


SHIPPED_MODELS: dict[str, ShippedModel] = {
    DEMO_MODEL: ShippedModel(DEMO_ARCH, DEMO_PRETRAINED_CFG, DEMO_WEIGHTS,
                             f"demo backbone weights missing at {DEMO_WEIGHTS}; reinstall alast or run "
                             "examples/pretrain_demo_backbone.py"),
    VIT12_MODEL: ShippedModel(VIT12_ARCH, VIT12_PRETRAINED_CFG, VIT12_WEIGHTS,
                              f"{VIT12_MODEL} weights missing at {VIT12_WEIGHTS}; reinstall alast, pre-train "
                              "with `python examples/pretrain_vit12_backbone.py`, or pass --no-pretrained"),
}


def build_shipped_model(name: str, num_classes: int, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """One of :data:`SHIPPED_MODELS`; with ``pretrained`` its backbone weights come from its safetensors."""
    from timm.models.vision_transformer import VisionTransformer

    spec = SHIPPED_MODELS[name]
    model = VisionTransformer(num_classes=num_classes, **{**spec.arch, **overrides})
    model.pretrained_cfg = dict(spec.pretrained_cfg, architecture=name)
    if pretrained:
        if not spec.weights.exists():
            raise ModelError(spec.missing)
        load_weights(model, spec.weights, skip_head=True)
    return model


def build_demo_model(num_classes: int, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """The demo ViT; with ``pretrained`` its backbone weights come from the shipped safetensors."""
    return build_shipped_model(DEMO_MODEL, num_classes, pretrained, **overrides)


def _not_found(path: Path) -> str:
    return f"checkpoint not found: {path}; pass the path of a weights file (.safetensors/.pth/.bin), or drop --checkpoint"


# Where training scripts keep the EMA (exponential moving average) weights beside the trained ones:
# timm's train.py (``state_dict_ema``, ``state_dict_ema_v2`` for a second EMA), DeiT's (``model_ema``).
EMA_KEYS = ("state_dict_ema", "state_dict_ema_v2", "model_ema")


def _ema_key(state: Any) -> str | None:
    """The first of :data:`EMA_KEYS` that holds a state dict in ``state``, None where there is none."""
    return next((k for k in EMA_KEYS if isinstance(state, dict) and isinstance(state.get(k), dict)), None)


def _held(state: Any) -> str:
    """What a loaded checkpoint holds, in a few words (for an error that must say it)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"a bare state dict of {len(state)} tensors"
    keys = [str(k) for k in state]
    return "keys " + ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _select_ema(state: Any, path: Path, ema: bool) -> Any:
    """``state``'s EMA weights where ``ema``, else ``state`` as it is, with a note where it also holds EMA
    weights (which a user may have meant to fine-tune from)."""
    key = _ema_key(state)
    if ema and key is None:
        raise ModelError(f"checkpoint {path} holds no EMA weights (none of {', '.join(EMA_KEYS)}; it holds "
                         f"{_held(state)}); drop model.checkpoint_ema to load its weights")
    if ema:
        return state[key]
    if key is not None:
        from alast.data.common import say_once

        say_once([(f"checkpoint {path} also holds EMA weights ({key}): its non-EMA weights are loaded; "
                   "--set model.checkpoint_ema=true loads the EMA ones")])
    return state


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def weights_in_directory(path: Path) -> Path:
    """The weights file a ``--checkpoint`` directory holds (a Hugging Face hub snapshot of a timm
    model, a folder of one's own): its one weights file, or its one ``.safetensors`` where the others
    are other formats (the hub's ``model.safetensors`` beside ``pytorch_model.bin``)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safe = [p for p in files if p.suffix == ".safetensors"]
    if len(files) == 1:
        return files[0]
    if len(safe) == 1:
        return safe[0]
    if not files:
        raise ModelError(f"checkpoint {path} is a directory with no weights file in it (.safetensors, .pth, .pt, "
                         ".bin); pass the weights file")
    names = ", ".join(p.name for p in files[:6]) + (", ..." if len(files) > 6 else "")
    raise ModelError(f"checkpoint {path} is a directory with several weights files ({names}); pass the one to load")


def _read_state_dict(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, unwrapped and unprefixed; ``ema``: its EMA weights instead."""
    if not path.exists():
        raise ModelError(_not_found(path))
    if path.is_dir():
        raise ModelError(f"checkpoint {path} is a directory; pass the weights file in it (.safetensors/.pth)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as f:
                training_checkpoint = (f.metadata() or {}).get("format") == CHECKPOINT_FORMAT
            if training_checkpoint:  # a run's state (model, optimizer, budgets) under other keys
                run = path.parent.parent
                raise ModelError(f"{path} is a training checkpoint of the run {run}, not weights: continue that run "
                                 f"with `alast train --resume --out {run}`, or start from its fine-tuned weights, "
                                 f"--checkpoint {run / 'final_model.safetensors'}")
            state = load_file(str(path))
        else:
            import argparse

            # timm's train.py stores its arguments beside the weights: allowed, as timm's own loader allows them
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # corrupt file, wrong format
        reader = "safetensors" if path.suffix == ".safetensors" else "torch.load"
        raise ModelError(f"cannot read checkpoint {path} as weights ({reader} failed: {exc.__class__.__name__}); "
                         "pass a complete weights file (.safetensors, .pth or .bin)") from None
    state = _select_ema(state, path, ema)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} holds no state dict of tensors; save the model's state_dict() "
                         "(torch.save(model.state_dict(), FILE)) and pass that")
    return _unprefixed(state)


WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP / DataParallel, Lightning, torch.compile


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a prefix every key carries from a wrapper (``module.`` of DDP, ``model.`` of a
    Lightning module, ``_orig_mod.`` of torch.compile), however many are nested."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _fit_position_grid(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resample the checkpoint's position embedding to the model's patch grid where they differ (a
    model built at another ``img_size``), as timm does when it loads its own weights."""
    pos, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape or pos.ndim != 3 or pos.shape[-1] != own.shape[-1]:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    grid = pos.shape[1] - prefix
    side = round(grid ** 0.5)
    if side * side != grid:
        return  # not a square grid: left to the shape check below, which names it
    state["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=list(model.patch_embed.grid_size),
                                                old_size=[side, side], num_prefix_tokens=prefix)


def load_weights(model: nn.Module, path: Path, skip_head: bool = False, timm_filter: bool = False,
                 ema: bool = False) -> None:
    """Load a state dict, dropping the classifier head when its shape differs (or ``skip_head``; the
    run is told which head it trains anew); a position embedding for another input size is resampled
    to the model's grid. ``timm_filter``: first the checkpoint filter of the model's timm module, as
    timm applies it to its own weights (a patch embedding for another patch size resized, other
    layouts of ViT weights, e.g. OpenAI CLIP's, converted). Every other key must match: a checkpoint
    that leaves weights unset, or brings weights the model lacks, is refused. ``ema``: the checkpoint's
    EMA weights (timm's ``state_dict_ema``, :data:`EMA_KEYS`) instead of its trained ones, checked alike."""
    state = _read_state_dict(Path(path), ema)
    if timm_filter:
        module = sys.modules.get(type(model).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
    own = model.state_dict()
    head_keys = [k for k in state if k.startswith("head.")]
    head_differs = any(k in own and own[k].shape != state[k].shape for k in head_keys)
    if head_differs and not skip_head:
        from alast.data.common import say_once

        outputs = state.get("head.weight", state[head_keys[0]]).shape[0]
        say_once([(f"the checkpoint's classifier head has {outputs} outputs, this run's "
                   f"{own['head.weight'].shape[0]} classes: a new head is trained on them")])
    if skip_head or head_differs:
        for k in head_keys:
            state.pop(k)
    _fit_position_grid(state, model)
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ModelError(f"checkpoint {path} does not fit the model: {k} is {tuple(state[k].shape)} there, "
                         f"{tuple(own[k].shape)} here; is it for this architecture? pass the model it was trained "
                         "as with --model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"checkpoint {path} does not fit the model ({what}); is it for this architecture?")


def initial_weights(name: str, pretrained: bool | None, checkpoint: Path | None, ema: bool = False) -> str:
    """Where :func:`create_model`'s weights come from, in words (the run's first line says it);
    ``ema``: the checkpoint's EMA weights."""
    if checkpoint is not None:
        return f"weights from {checkpoint}" + (" (EMA)" if ema else "")
    if name in SHIPPED_MODELS:
        return "random initialisation (--no-pretrained)" if pretrained is False else "the shipped pre-trained backbone"
    if pretrained:
        return "timm's pretrained weights"
    return "random initialisation (pass --pretrained or --checkpoint PATH to start from weights)"


MAX_PATCH_TOKENS = 256 * 256  # a 4096 px image at patch 16: far beyond any ViT fine-tuning, and a sure hang


def run_initial_weights(model_cfg: Any) -> str:
    """:func:`initial_weights` of a run's ``model`` config section."""
    m = model_cfg
    return initial_weights(m.name, m.pretrained, m.checkpoint, m.checkpoint_ema)


def _check_img_size(name: str, img_size: int | None, patch: int, own: int) -> None:
    """Refuse an image size below the patch size, or not a multiple of it (the patch grid would drop
    the last pixels of every row and column without a word)."""
    if img_size is not None and img_size < patch:
        raise ModelError(f"image size {img_size} is smaller than {name}'s patch size {patch}; use --img-size "
                         f"{patch} or more ({name}'s own: {own})")
    if img_size is not None and (img_size // patch) ** 2 > MAX_PATCH_TOKENS:
        most = math.isqrt(MAX_PATCH_TOKENS) * patch
        raise ModelError(f"image size {img_size} gives {(img_size // patch) ** 2:,} patch tokens per image at "
                         f"{name}'s patch size {patch}, more than the {MAX_PATCH_TOKENS:,} alast accepts (attention "
                         f"grows with their square); use --img-size {most} or less ({name}'s own: {own})")
    if img_size is not None and img_size % patch:
        low = img_size - img_size % patch
        raise ModelError(f"image size {img_size} is not a multiple of {name}'s patch size {patch}: its patches would "
                         f"leave out the last {img_size - low} pixels of every row and column; use --img-size {low} "
                         f"or {low + patch}")


def _drivable(name: str) -> bool:
    """Whether alast can drive ``name`` (a shipped model, or a timm ViT that passes the patch check)."""
    if name in SHIPPED_MODELS:
        return True
    try:
        _check_architecture(name, None)
    except Exception:  # noqa: BLE001 - any failure to build or patch: not a suggestion
        return False
    return True


@functools.lru_cache(maxsize=32)
def model_position_kind(name: str) -> str | None:
    """:func:`~runtimes.torch_backend.patch.position_kind` of the model ``name`` (rotary embeddings,
    relative position biases or neither), from its architecture alone (built on the meta device:
    no weights)."""
    import timm

    if name in SHIPPED_MODELS or not timm.is_model(name):  # an unknown name is refused where it is built
        return None
    from runtimes.torch_backend.patch import position_kind

    with torch.device("meta"):
        return position_kind(timm.create_model(name, pretrained=False, num_classes=0))


def _check_architecture(name: str, img_size: int | None) -> None:
    """Refuse a timm model ALaST cannot drive, and an ``img_size`` below its patch size, before any
    weights are downloaded or built (a ResNet has no patch embedding to read a patch size from)."""
    import timm

    from runtimes.torch_backend.patch import check_patchable

    with torch.device("meta"):  # the architecture only: no weights allocated or initialised
        arch = timm.create_model(name, pretrained=False, num_classes=0)
    check_patchable(arch)
    if img_size is not None:
        _check_img_size(name, img_size, max(arch.patch_embed.patch_size), max(arch.patch_embed.img_size))


def create_model(name: str, num_classes: int, *, pretrained: bool | None = None, checkpoint: Path | None = None,
                 img_size: int | None = None, drop_path_rate: float = 0.0, checkpoint_ema: bool = False) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head: fresh, or a ``checkpoint``'s own where it has that shape.

    ``pretrained`` downloads timm's weights (or, for alast's own models, uses the shipped backbone; the
    default for those); ``checkpoint`` loads local weights instead (:func:`load_weights`, strictly but
    for the head, with timm's checkpoint filter for timm models); ``checkpoint_ema``: its EMA weights
    (ignored without a ``checkpoint``: a resumed run rebuilt from its own checkpoint has none).
    """
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise ModelError(f"checkpoint {checkpoint} is a directory; pass the weights file in it (.safetensors/.pth)")
    if name in SHIPPED_MODELS:
        _check_img_size(name, img_size, SHIPPED_MODELS[name].arch["patch_size"], SHIPPED_MODELS[name].arch["img_size"])
        extra = {"img_size": img_size} if img_size is not None else {}
        use_shipped = checkpoint is None and pretrained is not False
        model = build_shipped_model(name, num_classes, pretrained=use_shipped, drop_path_rate=drop_path_rate,
                                    **extra)
        if checkpoint is not None:
            load_weights(model, Path(checkpoint), ema=checkpoint_ema)
        return model
    import timm

    if not timm.is_model(name):
        # the closest names first, each built on the meta device until five alast can drive (up to a second each)
        candidates = difflib.get_close_matches(name, [*SHIPPED_MODELS, *timm.list_models()], n=12, cutoff=0.6)
        close = list(itertools.islice(filter(_drivable, candidates), 5))
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; use a timm ViT/DeiT name such as vit_base_patch16_224")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise ModelError(_not_found(checkpoint))
        # read here, not by timm's pretrained_cfg_overlay: timm loads a file whose head differs from its
        # pretrained config's without strictness, so weights it cannot place were left at random silently
        pretrained = False
    _check_architecture(name, img_size)
    try:
        with _hub_access(bool(pretrained) and checkpoint is None) as offline:
            model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [exc.__class__.__name__]
        reason = " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:300].rstrip(".")  # torch: "Error(s):"
        if "weights_only" in str(exc):  # torch.load refused to unpickle it: not a weights file
            reason = "not a state dict torch can load safely (a .safetensors or .pth file of tensors)"
        where = f"checkpoint {checkpoint}" if checkpoint else "timm's pretrained weights (needs internet)"
        if offline:
            reason = f"{offline} cannot be reached and the weights are not in the local cache"
        remedy = (f"; are these weights of {name}? pass the model they were trained as with --model" if checkpoint
                  else "; run once where the Hugging Face hub is reachable (timm caches the weights), "
                       "or pass --checkpoint PATH to local weights, or --no-pretrained")
        raise ModelError(f"cannot load {where} for {name}: {reason}{remedy}") from None
    except Exception as exc:  # torch.load of a file that is no checkpoint can raise anything
        if checkpoint is None:
            raise
        raise ModelError(f"cannot load checkpoint {checkpoint} for {name}: not a weights file "
                         f"({exc.__class__.__name__}); pass a .safetensors or .pth state dict") from None
    if checkpoint is not None:
        load_weights(model, Path(checkpoint), timm_filter=True, ema=checkpoint_ema)
    return model


HUB_PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_host() -> tuple[str, int] | None:
    """The Hugging Face hub's host and port, None where it is reached through a proxy (which a direct
    probe cannot judge) or huggingface_hub is already offline or absent."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    from urllib.parse import urlsplit

    url = urlsplit(constants.ENDPOINT)
    return (url.hostname, url.port or (443 if url.scheme == "https" else 80)) if url.hostname else None


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_access(download: bool) -> Iterator[str | None]:
    """Load timm's weights from the local cache alone where the Hugging Face hub cannot be reached:
    huggingface_hub retries each file for about 50 s before it falls back on its cache or fails, at
    every start of an offline machine. Yields the unreachable host, or None where the hub is used as usual."""
    host = _hub_host() if download else None
    if host is None or _reachable(*host):
        yield None
        return
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        yield host[0]
    finally:
        constants.HF_HUB_OFFLINE = False


