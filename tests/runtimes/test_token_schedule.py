"""The fixed token schedule of evaluation and export: the model runs exactly as it was trained."""
import pytest
import torch

from planners import schedule_from_steps
from runtimes.token_schedule import (
    ScheduleError,
    check_schedule,
    drops_tokens,
    inference_flops,
    keep_per_block,
    token_schedule,
)
from runtimes.torch_backend.patch import AlastPatch
from tests.conftest import make_tiny_vit


def test_check_schedule_refuses_what_does_not_fit():
    assert check_schedule([12, 12, 6, 3], 4, 16) == (12, 12, 6, 3)
    with pytest.raises(ScheduleError, match="3 counts for a model with 4 blocks"):
        check_schedule([12, 6, 3], 4, 16)
    with pytest.raises(ScheduleError, match="keeps 8 patch tokens after block 2, which receives 6"):
        check_schedule([12, 6, 8, 3], 4, 16)
    with pytest.raises(ScheduleError, match="after block 0"):
        check_schedule([0, 0, 0, 0], 4, 16)
    with pytest.raises(ScheduleError, match="after block 0, which receives 16"):
        check_schedule([17, 16, 16, 16], 4, 16)


def test_keep_per_block_and_window_mean():
    assert keep_per_block([16, 12, 12, 5], 16) == (None, 12, None, 5)
    assert schedule_from_steps([]) is None
    # per block, the rounded mean of the window's logged counts
    assert schedule_from_steps([[12, 9, 6, 4], [13, 10, 6, 3], [12, 9, 5, 3]]) == (12, 9, 6, 3)
    assert not drops_tokens((16, 16, 16, 16), 16) and not drops_tokens(None, 16)
    assert drops_tokens((16, 16, 15, 15), 16)


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_schedule_reproduces_the_training_forward(batch, pool):
    """Evaluation on the schedule computes what a training forward with the same counts computes
    (with a class token, or without one, where the tokens are ranked by the pooled query)."""
    images, _ = batch
    kept = (12, 9, 9, 4)
    model = make_tiny_vit(global_pool=pool)
    patch = AlastPatch(model)
    model.train()  # no dropout or drop-path in the tiny model: train and eval differ only in dropping
    with torch.no_grad(), patch.training_forward(keep_per_block(kept, 16)):
        trained = model(images)
    model.eval()
    with torch.no_grad(), token_schedule(model, kept):
        scheduled = model(images)
    with torch.no_grad():
        every = model(images)
    torch.testing.assert_close(scheduled, trained, rtol=0, atol=1e-6)
    assert (scheduled - every).abs().max() > 1e-3  # dropping changes the logits


def test_no_schedule_is_the_plain_model_and_hooks_leave(batch):
    images, _ = batch
    model = make_tiny_vit().eval()
    with torch.no_grad():
        plain = model(images)
        with token_schedule(model, None):
            same = model(images)
        with token_schedule(model, (16, 16, 16, 16)):
            keep_all = model(images)
        with token_schedule(model, (8, 4, 2, 1)):
            model(images)
        after = model(images)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(keep_all, plain, rtol=0, atol=0)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert not any(blk._forward_hooks or blk.attn.qkv._forward_hooks for blk in model.blocks)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_schedule_with_register_tokens_keeps_the_prefix(batch, pool):
    """The prefix survives every block; a head that reads only the prefix lets the last block keep
    one patch token (its logits are the schedule's: ``test_schedule_reproduces_the_training_forward``)."""
    images, _ = batch
    model = make_tiny_vit(reg_tokens=2, global_pool=pool).eval()
    seen = []
    model.norm.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    with torch.no_grad(), token_schedule(model, (10, 5, 5, 2)):
        model(images)
    prefix = 3 if pool == "token" else 2  # CLS and two registers, or the registers
    assert seen == [prefix + (1 if pool == "token" else 2)]


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_inference_flops_follow_the_schedule(pool):
    model = make_tiny_vit(global_pool=pool)
    model.blocks[0].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    every = inference_flops(model, None)
    half = inference_flops(model, (8, 8, 8, 8))
    assert model.training  # the count leaves the mode as it was, and each parameter's flag
    assert [p.requires_grad for p in model.parameters()] == flags
    assert 0.45 < half / every < 0.75  # block 0 sees every token; the head's FLOPs do not shrink
    assert inference_flops(model, (16, 16, 16, 16)) == every


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_onnx_graph_follows_the_schedule(tmp_path, batch, pool):
    pytest.importorskip("onnxruntime")
    import onnx

    from runtimes.onnx_export import export_inference_bytes, max_logit_diff

    model = make_tiny_vit(global_pool=pool).eval()
    kept = (12, 6, 6, 3)
    path = tmp_path / "s.onnx"
    path.write_bytes(export_inference_bytes(model, kept=kept))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # blocks 0, 1 and 3 select (top-k, then the kept indices sorted: two TopK each); block 2 keeps all
    assert ops.count("TopK") == 6
    assert max_logit_diff(path, model, kept=kept) < 1e-4
    assert max_logit_diff(path, model) > 1e-3  # it is not the every-token model
    assert "TopK" not in [n.op_type for n in onnx.load_from_string(export_inference_bytes(model)).graph.node]


def test_a_hybrid_stem_is_fed_images_with_the_image_channels(tmp_path):
    """A hybrid ViT (a CNN stem, timm's HybridEmbed) counts, exports and verifies: its
    ``patch_embed.proj`` takes the stem's channels, not the image's."""
    import timm

    from runtimes.onnx_export import export_inference_bytes, max_logit_diff
    from runtimes.token_schedule import inference_flops
    from runtimes.torch_backend.params import input_channels

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=128, num_classes=3)
    assert vit.patch_embed.proj.in_channels != 3 and input_channels(vit) == 3
    kept = (16, 16, 16, 12, 12, 12, 8, 8, 8, 4, 4, 4)
    assert 0 < inference_flops(vit, kept) < inference_flops(vit, None)
    path = tmp_path / "hybrid.onnx"
    path.write_bytes(export_inference_bytes(vit, 17, kept=kept))
    assert max_logit_diff(path, vit, kept=kept) < 1e-4


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_the_schedule_selects_inside_the_blocks_as_training_does(batch, pool):
    """A dropping block computes only the tokens it keeps, and a class-token head's last block keeps
    one patch token: the logits of running each block whole, then selecting, at fewer FLOPs."""
    from runtimes.token_schedule import selection_hooks
    from runtimes.torch_backend.flops import counter
    from runtimes.torch_backend.tokens import summary_pool

    images, _ = batch
    model = make_tiny_vit(global_pool=pool).eval()
    kept = (12, 9, 9, 4)
    with torch.no_grad():
        with counter() as inside, token_schedule(model, kept):
            got = model(images)
        with counter() as whole, selection_hooks(list(model.blocks), model.num_prefix_tokens,
                                                 keep_per_block(kept, 16), pool=summary_pool(model)):
            want = model(images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert inside.get_total_flops() < 0.9 * whole.get_total_flops()
