"""timm's ``Eva`` (rotary position embeddings: EVA-02, DINOv3, the RoPE ViTs, PE) under ALaST: the
selection inside the block, the positions that follow the kept tokens, the token schedule at
inference and its ONNX graph, and what such a model refuses."""
import copy

import pytest
import torch

from runtimes.torch_backend.patch import AlastPatch, PatchError, check_patchable, forward_selecting
from runtimes.torch_backend.tokens import summary_pool, take_tokens
from tests.conftest import EVA_VARIANTS, make_tiny_eva

VARIANTS = sorted(EVA_VARIANTS)


def _stem(model, x):
    tokens, rope = model._pos_embed(model.patch_embed(x))
    return model.norm_pre(tokens), rope


def _block_rope(model, rope, i):
    return rope[i] if getattr(model, "rope_mixed", False) else rope


@pytest.mark.parametrize("variant", VARIANTS)
def test_selecting_inside_an_eva_block_equals_the_whole_block_then_selection(variant, batch):
    """Only the kept tokens are queries and pass the MLP; their outputs and every gradient are those
    of timm's own block (its queries and keys rotated) followed by the selection."""
    model = make_tiny_eva(variant).train()
    x, rope = _stem(model, batch[0])
    blk, npt = model.blocks[1], model.num_prefix_tokens
    r = _block_rope(model, rope, 1)
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


def _reference_features(model, images, keep0):
    """Block 0 keeps ``keep0`` patch tokens, chosen as the patched block chooses them; the blocks
    after run timm's forward on them, with the rotary embeddings gathered by timm's own patch
    dropout helper (``apply_keep_indices_nlc``)."""
    from timm.layers import apply_keep_indices_nlc

    x, rope = _stem(model, images)
    npt = model.num_prefix_tokens
    out, _, kept = forward_selecting(model.blocks[0], x, keep0, npt, pos=_block_rope(model, rope, 0),
                                     pool=summary_pool(model))
    keep_idx = kept[:, npt:] - npt
    for i, blk in enumerate(model.blocks[1:], 1):
        r = _block_rope(model, rope, i)
        if r.ndim == 2:
            r = apply_keep_indices_nlc(out, r, keep_idx).unsqueeze(1)  # [B, 1, n, D], as timm's patch dropout
        else:  # per head: [H, N, D] -> [B, H, n, D]
            r = torch.stack([apply_keep_indices_nlc(out, r[h], keep_idx) for h in range(r.shape[0])], dim=1)
        out = type(blk).forward(blk, out, rope=r)
    return model.norm(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_blocks_after_a_drop_get_the_rotary_embeddings_of_the_kept_positions(variant, batch):
    model = make_tiny_eva(variant).train()
    ref = _reference_features(model, batch[0], 6)
    patch = AlastPatch(model)
    with patch.training_forward((6, None, None)) as ctl:
        got = model.forward_features(batch[0])
    assert ctl.tokens_in == [16, 6, 6]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    deltas = ctl.block_deltas()
    assert deltas.shape == (3, batch[0].shape[0]) and bool((deltas > 0).all())


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_patched_eva_keeps_its_outputs_in_eval_and_at_full_budget(variant, batch):
    model = make_tiny_eva(variant).train()
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
def test_an_evas_token_schedule_runs_at_inference_and_in_its_onnx_graph(variant, batch, tmp_path):
    from runtimes.onnx_export import export_inference_bytes, max_logit_diff
    from runtimes.token_schedule import head_reads_prefix, inference_flops, token_schedule

    model = make_tiny_eva(variant).eval()
    x, npt = batch[0], model.num_prefix_tokens
    with torch.no_grad():
        with token_schedule(model, (6, 6, 3)):  # a head that reads the prefix: the last block keeps one
            assert model.forward_features(x).shape == (x.shape[0], npt + (1 if head_reads_prefix(model) else 3), 32)
        with token_schedule(model, (6, 6, 6)):
            got = model.forward_features(x)
        ref = _reference_features(model, x, 6)
    if head_reads_prefix(model):  # the last block's queries are the prefix and one token: compare what the head reads
        got, ref = got[:, :npt], ref[:, :npt]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert model.forward_features(x).shape == (x.shape[0], npt + 16, 32)  # the schedule is gone after its block
    assert inference_flops(model, (6, 6, 3)) < 0.6 * inference_flops(model, None)
    path = tmp_path / "m.onnx"
    for kept in ((6, 6, 3), None):  # mixed mode too: its repeat_interleave no longer rewrites the expand's -1
        path.write_bytes(export_inference_bytes(model, kept=kept))
        assert max_logit_diff(path, model, kept=kept) < 1e-4


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_eva_trains_on_the_ort_backend_as_on_torch(variant):
    """The ort graph's blocks select inside with the rotary embeddings of the kept positions, as the
    torch runtime's: the same losses, deltas, kept tokens and (but for the scores of the blocks that
    keep every token, which the graph computes) counted FLOPs, dense steps and dropping ones."""
    pytest.importorskip("onnxruntime.training")
    from alast.config import build_config
    from alast.training.build import create_runtime
    from planners import Budget

    model = make_tiny_eva(variant, depth=4)
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_eva_trains_with_dropped_tokens_and_frozen_blocks(variant, batch):
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    rt = TorchRuntime(make_tiny_eva(variant), lr=1e-2, weight_decay=0.05, grad_clip=None, device="cpu")
    before = [[p.detach().clone() for p in ps] for ps in rt.block_params]
    full = rt.train_step(x, y, Budget((1.0,) * 3, (True,) * 3), 1e-3, 0)
    before = [[p.detach().clone() for p in ps] for ps in rt.block_params]
    part = rt.train_step(x, y, Budget((0.5,) * 3, (False, True, True)), 1e-3, 1)
    assert part.tokens_in == (16, 8, 4) and part.kept_tokens == (8, 4, 2)
    assert part.trained_blocks == (1, 2) and 0 < part.train_flops < 0.6 * full.train_flops
    for i, (ps, old) in enumerate(zip(rt.block_params, before)):
        assert any(not torch.equal(p, o) for p, o in zip(ps, old)) == (i > 0), f"block {i}"
    assert rt.patch.control.positions is None  # nothing of a step's positions outlives it


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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("freeze_embeddings", [True, False])
def test_an_evas_step_costs_what_its_cost_model_says(variant, freeze_embeddings, batch):
    """Counted FLOPs equal the profile's prediction for steps that drop tokens and freeze blocks,
    with the embeddings frozen (the default: learned rotary frequencies freeze with them, so no
    backward runs below the lowest trained block) and trained."""
    from alast.planning.profile import profile_model
    from planners import Budget
    from planners.simulate import StepShape, step_cost
    from runtimes.torch_backend.runtime import TorchRuntime

    rt = TorchRuntime(make_tiny_eva(variant), lr=1e-3, weight_decay=0.0, grad_clip=None, device="cpu",
                      freeze_embeddings=freeze_embeddings, memory_probe_steps=lambda s: False)
    cm = profile_model(rt.model, "tiny_eva", img_size=32)
    assert cm.inference_selects_inside and all(b.drop is not None for b in cm.blocks)
    assert cm.embed.trainable is not freeze_embeddings
    images, labels = batch
    for ratios, trained in [((1.0,) * 3, (True,) * 3), ((0.6, 0.8, 0.5), (False, True, True)),
                            ((0.3,) * 3, (False, False, True))]:
        budget = Budget(ratios, trained, train_embeddings=not freeze_embeddings)
        counted = rt.train_step(images, labels, budget, 1e-3, 0).train_flops
        predicted = step_cost(cm, StepShape.from_budget(budget, cm.num_patches), images.shape[0]).train_flops
        assert predicted == pytest.approx(counted, rel=1e-6), (ratios, trained)


@pytest.mark.slow  # inductor on the CPU: about a minute per model
def test_a_compiled_eva_step_matches_eager(batch):
    """The compiled rotary selecting parts compute what the eager ones do (`backend.compile`)."""
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    b = Budget((0.75, 0.5, 1.0), (True, False, True))
    eager, comp = (TorchRuntime(make_tiny_eva("dinov3"), lr=1e-2, weight_decay=0.0, grad_clip=None, device="cpu",
                                count_flops="off", compile=c) for c in (False, True))
    for step in range(2):
        r1, r2 = eager.train_step(x, y, b, 1e-2, step), comp.train_step(x, y, b, 1e-2, step)
        assert r2.loss == pytest.approx(r1.loss, rel=1e-5) and r2.kept_tokens == r1.kept_tokens
    assert comp.compile_time_s > 0
