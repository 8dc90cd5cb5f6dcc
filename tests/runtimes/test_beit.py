"""timm's ``Beit`` (relative position biases: BEiT, BEiT v2) under ALaST: the selection inside the
block and its scores, the biases that follow the kept tokens, the token schedule at inference and
its ONNX graph, the costs, and what such a model refuses.

The reference for the blocks after a drop is timm's own forward on every token, with the dropped
tokens masked out as keys (a ``-inf`` added to their columns through the block's shared-bias
argument): the kept tokens' outputs are then those of a model that holds only them."""
import copy

import pytest
import torch

from runtimes.torch_backend.patch import AlastPatch, PatchError, check_patchable, forward_selecting
from runtimes.torch_backend.relpos import RelativePositions, whole_bias
from runtimes.torch_backend.tokens import take_tokens
from tests.conftest import BEIT_VARIANTS, make_tiny_beit

VARIANTS = sorted(BEIT_VARIANTS)


def _stem(model, x):
    tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), model.patch_embed(x)), dim=1)
    return tokens if model.pos_embed is None else tokens + model.pos_embed


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
    x = _stem(model, batch[0])
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


def _reference_features(model, images, keep0):
    """Block 0 keeps ``keep0`` patch tokens, chosen as the patched block chooses them; the blocks
    after run timm's forward on every token with the dropped ones masked out as keys; the kept
    tokens' rows."""
    x = _stem(model, images)
    blk0 = model.blocks[0]
    _, _, kept = forward_selecting(blk0, x, keep0, 1, pos=RelativePositions(whole_bias(blk0), None))
    out = blk0(x)
    dropped = torch.ones(out.shape[:2], dtype=torch.bool).scatter_(1, kept, False)
    mask = torch.zeros(out.shape[:2]).masked_fill(dropped, float("-inf"))[:, None, None, :]  # [B, 1, 1, N]
    for blk in model.blocks[1:]:
        out = blk(out, shared_rel_pos_bias=mask)
    return model.norm(take_tokens(out, kept))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_blocks_after_a_drop_get_the_biases_of_the_kept_positions(variant, batch):
    model = make_tiny_beit(variant).train()
    ref = _reference_features(model, batch[0], 6)
    patch = AlastPatch(model)
    with patch.training_forward((6, None, None)) as ctl:
        got = model.forward_features(batch[0])
    assert ctl.tokens_in == [16, 6, 6]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    deltas = ctl.block_deltas()
    assert deltas.shape == (3, batch[0].shape[0]) and bool((deltas > 0).all())
    with patch.training_forward((6, 3, None)) as ctl:  # a second drop: the positions gather twice
        assert model.forward_features(batch[0]).shape == (batch[0].shape[0], 4, 32)
    assert ctl.tokens_in == [16, 6, 3]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_patched_beit_keeps_its_outputs_in_eval_and_at_full_budget(variant, batch):
    model = make_tiny_beit(variant).train()
    torch.manual_seed(3)
    ref = model(batch[0])
    patch = AlastPatch(model)
    torch.manual_seed(3)
    with patch.training_forward((None, None, None)):
        full = model(batch[0])
    torch.testing.assert_close(full, ref, rtol=0, atol=0)
    model.eval()
    with patch.training_forward((2, 2, 1)):
        evaluated = model(batch[0])  # eval mode: every token, whatever the control says
    assert torch.equal(evaluated, patch.unpatch().eval()(batch[0]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_beits_token_schedule_runs_at_inference_and_in_its_onnx_graph(variant, batch, tmp_path):
    from runtimes.onnx_export import export_inference_bytes, max_logit_diff
    from runtimes.token_schedule import inference_flops, token_schedule

    model = make_tiny_beit(variant).eval()
    x = batch[0]
    with torch.no_grad():
        with token_schedule(model, (6, 6, 6)):
            got = model.forward_features(x)
        ref = _reference_features(model, x, 6)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert model.forward_features(x).shape == (x.shape[0], 17, 32)  # the schedule is gone after its block
    assert inference_flops(model, (6, 6, 3)) < 0.6 * inference_flops(model, None)
    path = tmp_path / "m.onnx"
    for kept in ((6, 6, 3), (16, 8, 4), None):
        path.write_bytes(export_inference_bytes(model, kept=kept))
        assert max_logit_diff(path, model, kept=kept) < 1e-4


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_beit_trains_with_dropped_tokens_and_frozen_blocks(variant, batch):
    """Where tokens drop, the trained blocks' bias tables learn (the biases of the pairs they hold),
    the frozen block's stays."""
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    rt = TorchRuntime(make_tiny_beit(variant), lr=1e-2, weight_decay=0.05, grad_clip=None, device="cpu")
    full = rt.train_step(x, y, Budget((1.0,) * 3, (True,) * 3), 1e-3, 0)
    before = [[p.detach().clone() for p in ps] for ps in rt.block_params]
    part = rt.train_step(x, y, Budget((0.5,) * 3, (False, True, True)), 1e-3, 1)
    assert part.tokens_in == (16, 8, 4) and part.kept_tokens == (8, 4, 2)
    assert part.trained_blocks == (1, 2) and 0 < part.train_flops < 0.6 * full.train_flops
    for i, (ps, old) in enumerate(zip(rt.block_params, before)):
        assert any(not torch.equal(p, o) for p, o in zip(ps, old)) == (i > 0), f"block {i}"
    for i, blk in enumerate(rt.timm_model.blocks):
        table = blk.attn.relative_position_bias_table
        if table is not None:
            old = next(o for p, o in zip(rt.block_params[i], before[i]) if p is table)
            assert torch.equal(table, old) == (i == 0), f"block {i}'s bias table"
    assert rt.patch.control.positions is None  # nothing of a step's positions outlives it


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("freeze_embeddings", [True, False])
def test_a_beits_step_costs_what_its_cost_model_says(variant, freeze_embeddings, batch):
    """Counted FLOPs equal the profile's prediction for steps that drop tokens and freeze blocks."""
    from alast.planning.profile import profile_model
    from planners import Budget
    from planners.simulate import StepShape, step_cost
    from runtimes.torch_backend.runtime import TorchRuntime

    rt = TorchRuntime(make_tiny_beit(variant), lr=1e-3, weight_decay=0.0, grad_clip=None, device="cpu",
                      freeze_embeddings=freeze_embeddings, memory_probe_steps=lambda s: False)
    cm = profile_model(rt.model, "tiny_beit", img_size=32)
    assert cm.inference_selects_inside and all(b.drop is not None for b in cm.blocks)
    images, labels = batch
    for ratios, trained in [((1.0,) * 3, (True,) * 3), ((0.6, 0.8, 0.5), (False, True, True)),
                            ((0.3,) * 3, (False, False, True)), ((1.0, 0.5, 1.0), (True, True, True))]:
        budget = Budget(ratios, trained, train_embeddings=not freeze_embeddings)
        counted = rt.train_step(images, labels, budget, 1e-3, 0).train_flops
        predicted = step_cost(cm, StepShape.from_budget(budget, cm.num_patches), images.shape[0]).train_flops
        assert predicted == pytest.approx(counted, rel=1e-6), (ratios, trained)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_beit_trains_on_the_ort_backend_as_on_torch(variant):
    """The ort graph's blocks select inside with the biases of the kept positions, as the torch
    runtime's: the same losses, deltas, kept tokens and counted FLOPs."""
    pytest.importorskip("onnxruntime.training")
    from alast.config import build_config
    from alast.training.build import create_runtime
    from planners import Budget

    model = make_tiny_beit(variant, depth=4)
    rts = {b: create_runtime(build_config({"backend": {"name": b, "device": "cpu"},
                                           "policy": {"token_select": "top"}}), copy.deepcopy(model))
           for b in ("torch", "ort")}
    g = torch.Generator().manual_seed(1)
    budgets = [Budget((1.0,) * 4, (True,) * 4), Budget((0.75, 0.5, 1.0, 0.5), (False, True, False, True)),
               Budget((0.5, 0.75, 0.75, 0.5), (False, False, True, True), train_embeddings=False)]
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in budgets]
    losses = []
    for step, ((x, y), budget) in enumerate(zip(batches + batches[:1], budgets + budgets[:1])):
        res = {b: rt.train_step(x, y, budget, 1e-3, step) for b, rt in rts.items()}
        assert res["ort"].kept_tokens == res["torch"].kept_tokens
        assert res["ort"].loss == pytest.approx(res["torch"].loss, rel=1e-5)
        assert res["ort"].deltas == pytest.approx(res["torch"].deltas, rel=1e-4)
        assert res["ort"].train_flops == pytest.approx(res["torch"].train_flops, rel=2e-3)
        losses.append(res["ort"].loss)
    assert abs(losses[-1] - losses[0]) > 1e-4  # the first batch again, after three updates


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


@pytest.mark.slow  # inductor on the CPU: about a minute
def test_a_compiled_beit_step_matches_eager(batch):
    """The compiled BEiT selecting parts compute what the eager ones do (`backend.compile`)."""
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    b = Budget((0.75, 0.5, 1.0), (True, False, True))
    eager, comp = (TorchRuntime(make_tiny_beit(), lr=1e-2, weight_decay=0.0, grad_clip=None, device="cpu",
                                count_flops="off", compile=c) for c in (False, True))
    for step in range(2):
        r1, r2 = eager.train_step(x, y, b, 1e-2, step), comp.train_step(x, y, b, 1e-2, step)
        assert r2.loss == pytest.approx(r1.loss, rel=1e-5) and r2.kept_tokens == r1.kept_tokens
    assert comp.compile_time_s > 0


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
