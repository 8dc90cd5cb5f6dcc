"""ViTs normalised by RMSNorm (timm's ``norm_layer='rmsnorm'``: AIMv2, ``test_vit4``): the TorchScript
exporter has no symbolic for ``aten::rms_norm`` below opset 23, so ``alast export`` and the ort
backend write it as the ops it is made of (the ort backend's training: ``test_ort.py``)."""
from __future__ import annotations

import onnx
import pytest
import torch

from runtimes.onnx_export import RMS_NORM, _symbolics, export_inference_bytes, max_logit_diff
from tests.conftest import make_tiny_vit


def _registered(opset: int):
    group = _symbolics(RMS_NORM)
    return None if group is None else group.get(opset)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_a_vit_with_rms_norm_exports_on_every_token_and_its_schedule(global_pool, tmp_path):
    model = make_tiny_vit(norm_layer="rmsnorm", global_pool=global_pool).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # gains away from one, so a dropped weight would show
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "m.onnx"
    # every opset `alast export --opset` takes: ReduceMean's axes are an input from opset 18
    for opset, kept in ((17, None), (17, (16, 12, 8, 4)), (14, None), (18, None), (21, (16, 12, 8, 4))):
        path.write_bytes(export_inference_bytes(model, opset=opset, kept=kept))
        assert max_logit_diff(path, model, kept=kept) < 1e-4, opset
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"ReduceMean", "Sqrt", "Div"} <= ops and "LayerNormalization" not in ops
        assert _registered(opset) is None  # registered only while the exporter ran


def test_a_symbolic_registered_before_is_the_one_used_and_kept(tmp_path):
    from torch.onnx import symbolic_helper

    calls = []

    def own(g, x, normalized_shape, weight=None, eps=None):  # a user's own: x * weight, no norm
        calls.append(1)
        return g.op("Mul", x, weight) if not symbolic_helper._is_none(weight) else x

    torch.onnx.register_custom_op_symbolic(RMS_NORM, own, 17)
    try:
        export_inference_bytes(make_tiny_vit(norm_layer="rmsnorm").eval())
        assert calls and _registered(17) is own
    finally:
        torch.onnx.unregister_custom_op_symbolic(RMS_NORM, 17)
