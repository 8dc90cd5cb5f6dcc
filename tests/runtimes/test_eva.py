"""timm's ``Eva`` (rotary position embeddings: EVA-02, DINOv3, the RoPE ViTs, PE) under ALaST: the
selection inside the block, the positions that follow the kept tokens, the token schedule at
inference and its ONNX graph, and what such a model refuses (what holds alike for ``Beit``:
``test_position_models.py``)."""
import pytest
import torch

from runtimes.torch_backend.patch import AlastPatch, PatchError, check_patchable, forward_selecting
from runtimes.torch_backend.tokens import take_tokens
from tests.conftest import EVA_VARIANTS, make_tiny_eva
from tests.runtimes.positions import eva_block_rope, eva_stem

VARIANTS = sorted(EVA_VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_selecting_inside_an_eva_block_equals_the_whole_block_then_selection(variant, batch):
    """Only the kept tokens are queries and pass the MLP; their outputs and every gradient are those
    of timm's own block (its queries and keys rotated) followed by the selection."""
    model = make_tiny_eva(variant).train()
    x, rope = eva_stem(model, batch[0])
    blk, npt = model.blocks[1], model.num_prefix_tokens
    r = eva_block_rope(model, rope, 1)
    whole = blk(x, rope=r)
    out, scores, kept = forward_selecting(blk, x, 16, npt, pos=r)
    assert torch.equal(kept[:, npt:], torch.arange(npt, npt + 16).expand(x.shape[0], -1))
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    out, scores, kept = forward_selecting(blk, x, 5, npt, pos=r)
    assert scores.shape == (x.shape[0], npt + 16) and kept.shape == (x.shape[0], npt + 5)
    ref = take_tokens(whole, kept)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), list(blk.parameters()), allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), list(blk.parameters()), allow_unused=True)
    for (name, _), a, b in zip(blk.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_the_exports_repeat_interleave_symbolic_is_removed_afterwards(monkeypatch):
    """The export registers its own symbolic for repeat_interleave only while it runs."""
    from torch.onnx import symbolic_opset13

    from runtimes.onnx_export import REPEAT_INTERLEAVE, ExportError, _symbolics, export_inference_bytes

    def current():
        return _symbolics(REPEAT_INTERLEAVE).get(17)

    assert current() is symbolic_opset13.repeat_interleave
    export_inference_bytes(make_tiny_eva("mixed").eval())
    assert current() is symbolic_opset13.repeat_interleave

    def fails(*args, **kwargs):
        assert current() is not symbolic_opset13.repeat_interleave  # registered while the exporter runs
        raise RuntimeError("the exporter failed")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", fails)
        with pytest.raises(ExportError, match="the exporter failed"):
            export_inference_bytes(make_tiny_eva("mixed").eval())
    assert current() is symbolic_opset13.repeat_interleave

    def own(g, self, repeats, dim=None, output_size=None):  # a user's own symbolic: used, then kept
        calls.append(dim)
        return symbolic_opset13.repeat_interleave(g, self, repeats, dim, output_size)

    calls = []
    torch.onnx.register_custom_op_symbolic(REPEAT_INTERLEAVE, own, 17)
    try:
        export_inference_bytes(make_tiny_eva("mixed").eval())
        assert calls and current() is own
    finally:
        torch.onnx.unregister_custom_op_symbolic(REPEAT_INTERLEAVE, 17)
    assert current() is symbolic_opset13.repeat_interleave


def test_what_an_eva_cannot_run_is_refused_in_one_line():
    from timm.models.eva import Eva

    from alast.config import build_config
    from alast.training.build import create_runtime
    from runtimes.torch_backend.params import lora_target_pattern

    post = Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_post_norm=True)
    with pytest.raises(PatchError, match=r"block 0 of Eva is EvaBlockPostNorm \(attention: EvaAttention\); ALaST "
                                         "drives Eva models whose blocks are timm's pre-norm EvaBlock"):
        check_patchable(post)
    with pytest.raises(ValueError, match="a fused token has no position; set policy.fuse_tokens=false"):
        create_runtime(build_config({"policy": {"fuse_tokens": True}}), make_tiny_eva())
    with pytest.raises(ValueError, match=r"'qkv' of Eva is applied through its weight alone .* e\.g\. \[proj, "):
        lora_target_pattern(make_tiny_eva("eva02"), ["qkv"])
    assert "qkv" in lora_target_pattern(make_tiny_eva("dinov3"), ["qkv"])  # no separate biases: the layer is called


@pytest.mark.parametrize("variant", ["dinov3", "gap"])
def test_lora_on_an_eva_trains_its_adapters_where_tokens_drop(variant, batch):
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    targets = ["qkv", "fc2"] if variant == "dinov3" else ["q_proj", "v_proj"]
    rt = TorchRuntime(make_tiny_eva(variant), lr=1e-2, weight_decay=0.0, grad_clip=None, device="cpu",
                      lora={"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": targets})
    adapters = {n: p.detach().clone() for n, p in rt.model.named_parameters() if "lora_B" in n}
    assert len(adapters) == 2 * 3
    res = rt.train_step(x, y, Budget((0.5,) * 3, (False, True, True)), 1e-2, 0)
    assert res.kept_tokens == (8, 4, 2)
    moved = {n for n, p in rt.model.named_parameters() if n in adapters and not torch.equal(p, adapters[n])}
    assert moved == {n for n in adapters if ".blocks.0." not in n}  # the selecting path calls the adapted layers


def test_trimming_the_last_eva_block_of_a_class_token_head_changes_no_logit_nor_gradient(batch):
    from runtimes.token_schedule import head_reads_prefix
    from runtimes.torch_backend.flops import counter

    x, y = batch
    assert not head_reads_prefix(make_tiny_eva("dinov3"))  # its head averages the patch tokens
    model = make_tiny_eva("mixed").train()
    assert head_reads_prefix(model)
    patch = AlastPatch(model)

    def run(keep):
        model.zero_grad()
        with patch.training_forward(keep):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with counter() as whole:
        ref = run((8, None, None))
    with counter() as trimmed:
        got = run((8, None, 1))
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-6)
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert trimmed.get_total_flops() < whole.get_total_flops()
