"""The ONNX inference graph of a timm ViT (every token, or a fixed token schedule), and its check
against PyTorch.

Shared by ``alast export`` (which adds run metadata and writes the file) and the ONNX Runtime
backend (which evaluates its live weights through this graph).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .token_schedule import token_schedule
from .torch_backend.params import input_channels
from .torch_backend.patch import is_eva_model

INPUT, OUTPUT = "images", "logits"


class ExportError(ValueError):
    """Bad input for export or ONNX evaluation (missing run, corrupt weights, not an ONNX model)."""


class _ImagesOnly(nn.Module):
    """``model``'s forward on the images alone. The TorchScript exporter makes every default of
    ``forward``'s signature a graph input, and timm's ``Eva`` has a bool one (``is_causal``), which
    the attention then refuses as a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


REPEAT_INTERLEAVE = "aten::repeat_interleave"


def _symbolics(name: str) -> Any:
    """The TorchScript exporter's symbolic functions of ``name``, by opset (every opset's registered
    first: the exporter registers them when it starts)."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:  # torch before 2.9
        from torch.onnx import utils
        from torch.onnx._internal.registration import registry
    utils._trigger_symbolic_function_registration()
    return registry.get_function_group(name)


@contextlib.contextmanager
def repeat_interleave_keeps_its_constants(opset: int) -> Iterator[None]:
    """torch's TorchScript symbolic of ``repeat_interleave`` (opset 13 on) makes a negative ``dim``
    positive by adding the rank in place to the tensor of ``dim``'s constant, and the tracer shares
    one constant between every use of the same number. In timm's mixed-mode RoPE (``Eva`` with
    ``rope_type='mixed'``) the rotary tables' ``repeat_interleave(x, 2, -1)`` on a rank-4 tensor thus
    turned the class token's ``expand(B, -1, -1)`` into ``expand(B, 3, 3)``, a graph onnxruntime
    refuses at any batch. Within this the symbolic the export would use (torch's, or one registered
    before) gets a constant of its own; on leaving, the registration is as it was."""
    if opset < 13:
        yield
        return
    from torch.onnx import symbolic_helper

    group = _symbolics(REPEAT_INTERLEAVE)
    previous = group.get(opset)

    def symbolic(g, self, repeats, dim=None, output_size=None):
        value = None if symbolic_helper._is_none(dim) else symbolic_helper._maybe_get_const(dim, "i")
        if isinstance(value, int):
            dim = g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))
        return previous(g, self, repeats, dim, output_size)

    torch.onnx.register_custom_op_symbolic(REPEAT_INTERLEAVE, symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(REPEAT_INTERLEAVE, opset)
        if group.get(opset) is not previous:  # it was someone's own at this opset, which ours replaced
            torch.onnx.register_custom_op_symbolic(REPEAT_INTERLEAVE, previous, opset)


RMS_NORM = "aten::rms_norm"


def _rms_norm_symbolic(opset: int):
    """``torch.nn.functional.rms_norm`` (timm's ``RmsNorm``: AIMv2, ``norm_layer='rmsnorm'`` ViTs) as
    the ONNX ops it is made of, ``x / sqrt(mean(x^2) + eps) * weight``: the TorchScript exporter has
    no symbolic of its own for it below opset 23. The square is a ``Pow``, as in the pattern that
    onnxruntime fuses into its ``SimplifiedLayerNormalization`` (whose gradient ORT Training has; with
    ``Mul(x, x)`` the fusion half-matched and the training graph failed to build)."""
    from torch.onnx import symbolic_helper

    try:
        from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType
    except ImportError:  # torch before 2.9
        from torch.onnx._type_utils import JitScalarType

    def symbolic(g, x, normalized_shape, weight=None, eps=None):
        dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
        axes = list(range(-len(dims), 0))
        dtype = JitScalarType.from_value(x, JitScalarType.FLOAT).dtype()
        value = None if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
        value = torch.finfo(dtype).eps if value is None else value  # torch's default
        square = g.op("Pow", x, g.op("Constant", value_t=torch.tensor(2.0, dtype=dtype)))
        if opset >= 18:  # axes became an input
            mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)),
                        keepdims_i=1)
        else:
            mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
        rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(value, dtype=dtype))))
        out = g.op("Div", x, rms)
        return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)

    return symbolic


@contextlib.contextmanager
def rms_norm_decomposed(opset: int) -> Iterator[None]:
    """Within this the exporter writes ``aten::rms_norm`` as :func:`_rms_norm_symbolic`'s ops, where it
    has no symbolic at ``opset`` (one of torch's, or a user's, is left alone); on leaving, the
    registration is as it was."""
    group = _symbolics(RMS_NORM)
    if group is not None and group.get(opset) is not None:
        yield
        return
    torch.onnx.register_custom_op_symbolic(RMS_NORM, _rms_norm_symbolic(opset), opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(RMS_NORM, opset)


@contextlib.contextmanager
def exporter_symbolics(opset: int) -> Iterator[None]:
    """What the TorchScript exporter needs of this module at ``opset`` to export the models ALaST
    drives: :func:`repeat_interleave_keeps_its_constants` and :func:`rms_norm_decomposed`."""
    with repeat_interleave_keeps_its_constants(opset), rms_norm_decomposed(opset):
        yield


def export_inference_bytes(model: nn.Module, opset: int = 17, constant_folding: bool = True,
                           kept: Sequence[int] | None = None, fuse: bool = False, score: str = "attention") -> bytes:
    """The serialized eval-mode graph ``images [B,3,H,W] -> logits [B,C]``, on every token or,
    with ``kept``, on the token schedule (:mod:`runtimes.token_schedule`; TopK with fixed sizes;
    ``fuse``: the dropped tokens fused into the last kept slot; ``score``: the token score).

    With ``constant_folding=False`` every parameter stays an initializer under its state-dict
    name (the ORT runtime overrides them with its live buffers).
    """
    was_training = model.training
    model.eval()
    img = model.patch_embed.img_size
    x = torch.zeros(2, input_channels(model), img[0], img[1])
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), token_schedule(model, kept, fuse, score), \
                exporter_symbolics(opset):
            warnings.simplefilter("ignore")
            traced = _ImagesOnly(model) if is_eva_model(model) else model  # a ViT's names stay the state dict's
            torch.onnx.export(traced, (x,), buf, dynamo=False, opset_version=opset, export_params=True,
                              do_constant_folding=constant_folding, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    except Exception as exc:  # any exporter failure means the model cannot be exported
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise ExportError(f"{type(model).__name__} cannot be exported to ONNX ({reason})") from None
    finally:
        model.train(was_training)
    return buf.getvalue()


def max_logit_diff(onnx_path: Path, model: nn.Module, batch: int = 3, seed: int = 0,
                   kept: Sequence[int] | None = None, fuse: bool = False, score: str = "attention") -> float:
    """Max |logit difference| between onnxruntime on ``onnx_path`` and ``model`` (on the token
    schedule ``kept``, if given) on a random batch.

    The batch size differs from the export's example batch (2), so the dynamic axis is exercised.
    """
    import onnxruntime as ort

    img = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, input_channels(model), img[0], img[1], generator=g)
    with torch.no_grad(), token_schedule(model, kept, fuse, score):
        ref = model.eval()(x).float()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    try:
        got = torch.from_numpy(sess.run([OUTPUT], {INPUT: x.numpy()})[0])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors: the graph does not run at this batch
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else exc.__class__.__name__
        raise ExportError(f"the ONNX graph of {type(model).__name__} does not run at batch {batch} in onnxruntime "
                          f"({reason})") from None
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).abs().max())
