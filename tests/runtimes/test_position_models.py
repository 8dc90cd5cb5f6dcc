"""What holds alike for the models whose blocks take the positions of their tokens: timm's ``Eva``
(rotary embeddings, in the layouts of ``EVA_VARIANTS``) and ``Beit`` (relative position biases, in
those of ``BEIT_VARIANTS``). Each family's own behaviour is tested in ``test_eva.py`` and
``test_beit.py``."""
import copy

import pytest
import torch

from runtimes.torch_backend.patch import AlastPatch
from tests.conftest import BEIT_VARIANTS, EVA_VARIANTS, make_tiny_beit, make_tiny_eva
from tests.runtimes.positions import beit_features_after_a_drop, eva_features_after_a_drop

MAKERS = {"eva": make_tiny_eva, "beit": make_tiny_beit}
REFERENCES = {"eva": eva_features_after_a_drop, "beit": beit_features_after_a_drop}
MODELS = [("eva", v) for v in sorted(EVA_VARIANTS)] + [("beit", v) for v in sorted(BEIT_VARIANTS)]


def make(family: str, variant: str, **kwargs):
    return MAKERS[family](variant, **kwargs)


@pytest.mark.parametrize("family,variant", MODELS)
def test_the_blocks_after_a_drop_get_the_positions_of_the_kept_tokens(family, variant, batch):
    """Against timm's own blocks (``tests/runtimes/positions.py``): rotary embeddings gathered as
    its patch dropout gathers them; BEiT's blocks on every token with the dropped ones masked out."""
    model = make(family, variant).train()
    ref = REFERENCES[family](model, batch[0], 6)
    patch = AlastPatch(model)
    with patch.training_forward((6, None, None)) as ctl:
        got = model.forward_features(batch[0])
    assert ctl.tokens_in == [16, 6, 6]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    deltas = ctl.block_deltas()
    assert deltas.shape == (3, batch[0].shape[0]) and bool((deltas > 0).all())
    npt = model.num_prefix_tokens
    with patch.training_forward((6, 3, None)) as ctl:  # a second drop: the positions gathered twice
        assert model.forward_features(batch[0]).shape == (batch[0].shape[0], npt + 3, 32)
    assert ctl.tokens_in == [16, 6, 3]


@pytest.mark.parametrize("family,variant", MODELS)
def test_a_token_schedule_runs_at_inference_and_in_its_onnx_graph(family, variant, batch, tmp_path):
    from runtimes.onnx_export import export_inference_bytes, max_logit_diff
    from runtimes.token_schedule import head_reads_prefix, inference_flops, token_schedule

    model = make(family, variant).eval()
    x, npt = batch[0], model.num_prefix_tokens
    with torch.no_grad():
        with token_schedule(model, (6, 6, 3)):  # a head that reads the prefix: the last block keeps one
            assert model.forward_features(x).shape == (x.shape[0], npt + (1 if head_reads_prefix(model) else 3), 32)
        with token_schedule(model, (6, 6, 6)):
            got = model.forward_features(x)
        ref = REFERENCES[family](model, x, 6)
    if head_reads_prefix(model):  # the last block's queries are the prefix and one token: compare what the head reads
        got, ref = got[:, :npt], ref[:, :npt]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert model.forward_features(x).shape == (x.shape[0], npt + 16, 32)  # the schedule is gone after its block
    assert inference_flops(model, (6, 6, 3)) < 0.6 * inference_flops(model, None)
    path = tmp_path / "m.onnx"
    for kept in ((6, 6, 3), None):  # mixed mode too: its repeat_interleave no longer rewrites the expand's -1
        path.write_bytes(export_inference_bytes(model, kept=kept))
        assert max_logit_diff(path, model, kept=kept) < 1e-4


@pytest.mark.parametrize("family,variant", MODELS)
def test_a_patched_model_keeps_its_outputs_in_eval_and_at_full_budget(family, variant, batch):
    model = make(family, variant).train()
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


@pytest.mark.parametrize("family,variant", MODELS)
def test_it_trains_with_dropped_tokens_and_frozen_blocks(family, variant, batch):
    """The trained blocks learn where tokens drop (a BEiT block's bias table among their parameters:
    the biases of the pairs it holds), the frozen one stays, and no step's positions outlive it."""
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    rt = TorchRuntime(make(family, variant), lr=1e-2, weight_decay=0.05, grad_clip=None, device="cpu")
    full = rt.train_step(x, y, Budget((1.0,) * 3, (True,) * 3), 1e-3, 0)
    before = [[p.detach().clone() for p in ps] for ps in rt.block_params]
    part = rt.train_step(x, y, Budget((0.5,) * 3, (False, True, True)), 1e-3, 1)
    assert part.tokens_in == (16, 8, 4) and part.kept_tokens == (8, 4, 2)
    assert part.trained_blocks == (1, 2) and 0 < part.train_flops < 0.6 * full.train_flops
    for i, (ps, old) in enumerate(zip(rt.block_params, before)):
        assert [not torch.equal(p, o) for p, o in zip(ps, old)] == [i > 0] * len(ps), f"block {i}"
    tables = [getattr(blk.attn, "relative_position_bias_table", None) for blk in rt.timm_model.blocks]
    assert all(any(p is t for p in ps) for t, ps in zip(tables, rt.block_params) if t is not None)
    assert rt.patch.control.positions is None


@pytest.mark.parametrize("family,variant", MODELS)
def test_it_trains_on_the_ort_backend_as_on_torch(family, variant):
    """The ort graph's blocks select inside with the positions of the kept tokens (rotary embeddings,
    relative position biases), as the torch runtime's: the same losses, deltas, kept tokens and (but
    for the scores of the blocks that keep every token, which the graph computes) counted FLOPs,
    dense steps and dropping ones."""
    pytest.importorskip("onnxruntime.training")
    from alast.config import build_config
    from alast.training.build import create_runtime
    from planners import Budget

    model = make(family, variant, depth=4)
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


# the embeddings trained, on the layouts whose embeddings differ: an absolute position embedding
# (EVA-02), learned rotary frequencies (mixed), a relative bias table per block (BEiT v2)
EMBEDDINGS_TRAINED = [("eva", "eva02"), ("eva", "mixed"), ("beit", "beitv2")]


@pytest.mark.parametrize("family,variant,freeze_embeddings",
                         [(*m, True) for m in MODELS] + [(*m, False) for m in EMBEDDINGS_TRAINED])
def test_a_step_costs_what_its_cost_model_says(family, variant, freeze_embeddings, batch):
    """Counted FLOPs equal the profile's prediction for steps that drop tokens and freeze blocks,
    with the embeddings frozen (the default: learned rotary frequencies freeze with them, so no
    backward runs below the lowest trained block) and trained. A BEiT block's bias trains with it,
    which sends the attention to another kernel: a drop after a dense trained block counts that."""
    from alast.planning.profile import profile_model
    from planners import Budget
    from planners.simulate import StepShape, step_cost
    from runtimes.torch_backend.runtime import TorchRuntime

    rt = TorchRuntime(make(family, variant), lr=1e-3, weight_decay=0.0, grad_clip=None, device="cpu",
                      freeze_embeddings=freeze_embeddings, memory_probe_steps=lambda s: False)
    cm = profile_model(rt.model, f"tiny_{family}", img_size=32)
    assert cm.inference_selects_inside and all(b.drop is not None for b in cm.blocks)
    assert cm.embed.trainable is not freeze_embeddings
    images, labels = batch
    for ratios, trained in [((1.0,) * 3, (True,) * 3), ((0.6, 0.8, 0.5), (False, True, True)),
                            ((0.3,) * 3, (False, False, True)), ((1.0, 0.5, 1.0), (True,) * 3)]:
        budget = Budget(ratios, trained, train_embeddings=not freeze_embeddings)
        counted = rt.train_step(images, labels, budget, 1e-3, 0).train_flops
        predicted = step_cost(cm, StepShape.from_budget(budget, cm.num_patches), images.shape[0]).train_flops
        assert predicted == pytest.approx(counted, rel=1e-6), (ratios, trained)


@pytest.mark.slow  # inductor on the CPU: about a minute per model
@pytest.mark.parametrize("family,variant", [("eva", "dinov3"), ("beit", "beitv2")])
def test_a_compiled_step_matches_eager(family, variant, batch):
    """The compiled selecting parts (rotary, relative-bias) compute what the eager ones do
    (`backend.compile`)."""
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    x, y = batch
    b = Budget((0.75, 0.5, 1.0), (True, False, True))
    eager, comp = (TorchRuntime(make(family, variant), lr=1e-2, weight_decay=0.0, grad_clip=None, device="cpu",
                                count_flops="off", compile=c) for c in (False, True))
    for step in range(2):
        r1, r2 = eager.train_step(x, y, b, 1e-2, step), comp.train_step(x, y, b, 1e-2, step)
        assert r2.loss == pytest.approx(r1.loss, rel=1e-5) and r2.kept_tokens == r1.kept_tokens
    assert comp.compile_time_s > 0
