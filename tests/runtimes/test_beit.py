"""timm's ``Beit`` (relative position biases: BEiT, BEiT v2) under ALaST: the selection inside the
block and its scores, the biases that follow the kept tokens, the token schedule at inference and
its ONNX graph, LoRA, a checkpoint at another size, and what such a model refuses (what holds
alike for ``Eva``: ``test_position_models.py``).
"""
import pytest
import torch

from runtimes.torch_backend.patch import PatchError, check_patchable, forward_selecting
from runtimes.torch_backend.relpos import RelativePositions, whole_bias
from runtimes.torch_backend.tokens import take_tokens
from tests.conftest import BEIT_VARIANTS, make_tiny_beit
from tests.runtimes.positions import beit_stem

VARIANTS = sorted(BEIT_VARIANTS)


def _timm_cls_attention(blk, x):
    """The class token's attention, averaged over the heads, as timm's (unfused) attention computes
    it: the probabilities entering its attention dropout."""
    seen = []
    handle = blk.attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    fused, blk.attn.fused_attn = blk.attn.fused_attn, False
    try:
        blk(x)
    finally:
        blk.attn.fused_attn = fused
        handle.remove()
    return seen[0][:, :, 0].mean(dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_selecting_inside_a_beit_block_equals_the_whole_block_then_selection(variant, batch):
    """Only the kept tokens are queries and pass the MLP; their outputs and every gradient are those
    of timm's own block followed by the selection, and the scores are its class token's attention,
    relative position bias included."""
    model = make_tiny_beit(variant).train()
    x = beit_stem(model, batch[0])
    blk = model.blocks[1]
    whole = blk(x)
    pos = RelativePositions(whole_bias(blk), None)
    out, scores, kept = forward_selecting(blk, x, 16, 1, pos=pos)
    assert torch.equal(kept[:, 1:], torch.arange(1, 17).expand(x.shape[0], -1))
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    out, scores, kept = forward_selecting(blk, x, 5, 1, pos=pos)
    torch.testing.assert_close(scores, _timm_cls_attention(blk, x), rtol=1e-5, atol=1e-7)
    assert kept.shape == (x.shape[0], 6) and torch.equal(kept[:, 1:], scores[:, 1:].topk(5).indices.sort().values + 1)
    ref = take_tokens(whole, kept)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    params = list(blk.parameters())
    got = torch.autograd.grad((out * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_what_a_beit_cannot_run_is_refused_in_one_line():
    from timm.models.beit import Beit, Block

    from alast.config import build_config
    from alast.training.build import create_runtime
    from runtimes.token_schedule import ScheduleError, token_schedule

    class OwnBlock(Block):
        def forward(self, x, shared_rel_pos_bias=None):
            return super().forward(x, shared_rel_pos_bias) * 1.0

    with pytest.raises(PatchError, match=r"^Beit shares one relative position bias between its blocks "
                                         r"\(use_shared_rel_pos_bias\); ALaST drives Beit models whose blocks have"):
        check_patchable(Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             use_shared_rel_pos_bias=True))
    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model.blocks[1].__class__ = OwnBlock
    with pytest.raises(PatchError, match=r"block 1 of Beit is OwnBlock \(attention: Attention\); ALaST drives Beit "
                                         "models whose blocks are timm's BEiT Block"):
        check_patchable(model)
    with pytest.raises(ValueError, match=r"has relative position biases \(timm's Beit\): a fused token has no "
                                         "position; set policy.fuse_tokens=false"):
        create_runtime(build_config({"policy": {"fuse_tokens": True}}), make_tiny_beit())
    with (pytest.raises(ScheduleError, match=r"\(timm's Eva or Beit\) does not fuse dropped tokens"),
          token_schedule(make_tiny_beit(), (8, 4, 2), fuse=True)):
        pass


def test_lora_on_a_beit_trains_its_adapters_where_tokens_drop(batch):
    """Adapters on the attention's projection and the MLP train through the selecting path; the
    fused qkv, which BEiT applies through its weight alone (query and value biases), is refused."""
    from planners import Budget
    from runtimes.torch_backend.params import lora_target_pattern
    from runtimes.torch_backend.runtime import TorchRuntime

    with pytest.raises(ValueError, match=r"'qkv' of Beit is applied through its weight alone .* e\.g\. \[proj, "):
        lora_target_pattern(make_tiny_beit(), ["qkv"])
    x, y = batch
    rt = TorchRuntime(make_tiny_beit(), lr=1e-2, weight_decay=0.0, grad_clip=None, device="cpu",
                      lora={"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["proj", "fc2"]})
    adapters = {n: p.detach().clone() for n, p in rt.model.named_parameters() if "lora_B" in n}
    assert len(adapters) == 2 * 3
    res = rt.train_step(x, y, Budget((0.5,) * 3, (False, True, True)), 1e-2, 0)
    assert res.kept_tokens == (8, 4, 2)
    moved = {n for n, p in rt.model.named_parameters() if n in adapters and not torch.equal(p, adapters[n])}
    assert moved == {n for n in adapters if ".blocks.0." not in n}


def test_a_beit_model_name_is_known_to_take_relative_positions_before_it_is_built():
    from alast.models import model_position_kind

    assert model_position_kind("beitv2_base_patch16_224") == "relative"
    assert model_position_kind("eva02_tiny_patch14_224") == "rotary"
    assert model_position_kind("vit_tiny_patch16_224") is None


def test_a_beit_checkpoint_for_another_input_size_loads_with_its_bias_tables_resized(tmp_path, batch):
    """As timm loads its own BEiT weights at another size (its checkpoint filter resizes each
    block's table), then the model trains on target shapes."""
    from timm.models.beit import Beit

    from alast.models import load_weights
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    path = tmp_path / "beit48.pth"
    torch.save(Beit(img_size=48, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5,
                    **BEIT_VARIANTS["beitv2"]).state_dict(), path)
    model = make_tiny_beit()  # 32 px: a 4 x 4 grid where the checkpoint has 6 x 6
    old = model.blocks[0].attn.relative_position_bias_table.detach().clone()
    with pytest.warns(UserWarning):  # timm's interpolation warns about its own indexing
        load_weights(model, path, timm_filter=True)
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.shape == old.shape == (7 * 7 + 3, 2) and not torch.equal(table, old)
    rt = TorchRuntime(model, lr=1e-2, weight_decay=0.0, grad_clip=None, device="cpu")
    assert rt.train_step(*batch, Budget((0.5,) * 3, (False, True, True)), 1e-2, 0).kept_tokens == (8, 4, 2)
