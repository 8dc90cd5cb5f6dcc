import pytest
import torch

from planners import Budget
from runtimes.torch_backend.flops import counter, register_cpu_sdpa
from runtimes.torch_backend.runtime import TorchRuntime
from tests.conftest import make_tiny_vit


def make_runtime(model=None, **kw):
    opts = dict(lr=1e-2, weight_decay=0.05, grad_clip=None, device="cpu")
    opts.update(kw)
    return TorchRuntime(model or make_tiny_vit(), **opts)


def test_frozen_blocks_get_no_gradient_and_do_not_change(batch):
    x, y = batch
    rt = make_runtime()
    before = [[p.detach().clone() for p in ps] for ps in rt.block_params]
    budget = Budget((1.0,) * 4, (False, True, False, True))
    res = rt.train_step(x, y, budget, lr=1e-2, step=0)
    assert res.trained_blocks == (1, 3)
    for i, (ps, old) in enumerate(zip(rt.block_params, before)):
        changed = any(not torch.equal(p, o) for p, o in zip(ps, old))
        assert changed == (i in (1, 3)), f"block {i}"
        if i in (0, 2):
            assert all(p.grad is None for p in ps)
    # AdamW state exists only for what was trained (weight decay included)
    state_ids = {id(p) for p in rt.optimizer.state}
    assert not any(id(p) in state_ids for p in rt.block_params[0])


def test_parameter_counts_name_what_the_optimizer_updated(batch):
    x, y = batch
    rt = make_runtime()
    total = sum(p.numel() for p in rt.model.parameters())
    assert rt.parameter_counts() == {"total": total, "trainable": total, "updated": 0}
    rt.train_step(x, y, Budget((1.0,) * 4, (False, True, False, True), train_embeddings=False), 1e-2, 0)
    frozen = sum(p.numel() for i in (0, 2) for p in rt.block_params[i])
    embeddings = sum(p.numel() for p in rt.embed_params)
    assert rt.parameter_counts()["updated"] == total - frozen - embeddings
    rt.train_step(x, y, Budget((1.0,) * 4, (True,) * 4), 1e-2, 1)
    assert rt.parameter_counts()["updated"] == total  # a union over the run's steps
    lora = make_runtime(lora={"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv"]})
    counts = lora.parameter_counts()
    adapters = sum(p.numel() for n, p in lora.model.named_parameters() if "lora_" in n)
    assert counts["total"] == total + adapters and 0 < adapters < counts["trainable"] < total


def test_step_result_reports_tokens_deltas_and_flops(batch):
    x, y = batch
    rt = make_runtime()
    full = rt.train_step(x, y, Budget((1.0,) * 4, (True,) * 4), 1e-3, 0)
    part = rt.train_step(x, y, Budget((0.5,) * 4, (True, True, False, False)), 1e-3, 1)
    assert full.tokens_in == (16,) * 4 and full.kept_tokens == (16,) * 4
    assert part.tokens_in == (16, 8, 4, 2) and part.kept_tokens == (8, 4, 2, 1)
    assert len(part.deltas) == 4 and all(d >= 0 for d in part.deltas)
    assert 0 < part.train_flops < full.train_flops
    assert rt.full_ft_step_flops(6) == pytest.approx(full.train_flops, rel=1e-9)


def _grads(rt) -> list:
    """The parameters' gradients, comparable with ==: the step's own, which a count leaves alone."""
    return [None if p.grad is None else p.grad.detach().clone().tolist() for p in rt.model.parameters()]


def test_full_ft_count_leaves_state_untouched(batch):
    x, y = batch
    rt = make_runtime()
    rt.train_step(x, y, Budget((1.0,) * 4, (True, False, True, False)), 1e-3, 0)
    flags = [p.requires_grad for p in rt.model.parameters()]
    params = [p.detach().clone() for p in rt.model.parameters()]
    grads = _grads(rt)
    rng = torch.get_rng_state()
    rt.full_ft_step_flops(6)
    assert flags == [p.requires_grad for p in rt.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params, rt.model.parameters()))
    assert _grads(rt) == grads
    assert torch.equal(rng, torch.get_rng_state())


LORA = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv"]}


@pytest.mark.parametrize("variant", ["plain", "lora", "eva"])
def test_the_reference_step_counts_alike_on_fake_and_real_tensors(variant, batch):
    """The CPU counts full fine-tuning's reference step on fake tensors, a CUDA device on a real step
    (milliseconds there): both count the same, and neither touches weights, flags, grads or RNG."""
    from tests.conftest import make_tiny_eva

    x, y = batch
    if variant == "eva":
        rt = TorchRuntime(make_tiny_eva("dinov3"), lr=1e-3, weight_decay=0.0, grad_clip=None, device="cpu",
                          memory_probe_steps=lambda s: False)
    else:
        rt = make_runtime(lora=LORA if variant == "lora" else None)
    rt.train_step(x, y, Budget((0.5,) * rt.num_blocks, (True,) + (False,) * (rt.num_blocks - 1)), 1e-3, 0)
    flags = [p.requires_grad for p in rt.model.parameters()]
    params, grads, rng = [p.detach().clone() for p in rt.model.parameters()], _grads(rt), torch.get_rng_state()
    lora = variant == "lora"
    trained = (lambda p: "lora_" not in next(n for n, q in rt.model.named_parameters() if q is p)) if lora else (
        lambda p: True)
    counts = {fake: rt._count_step(6, trained, adapters_off=lora, fake=fake) for fake in (True, False)}
    assert counts[True] == counts[False] > 0
    assert flags == [p.requires_grad for p in rt.model.parameters()] and _grads(rt) == grads
    assert all(torch.equal(a, b) for a, b in zip(params, rt.model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())


def test_every_token_step_flops_is_what_a_lora_step_on_every_token_counts(batch):
    """Under LoRA a step on every block and token computes no weight gradients for the frozen base:
    it costs less than full fine-tuning's, and exactly what the run counts for such a step (what
    lora@matched is sized by). Without LoRA it is full fine-tuning's step."""
    x, y = batch
    plain = make_runtime()
    assert plain.every_token_step_flops(6) == plain.full_ft_step_flops(6)
    rt = make_runtime(lora=LORA)
    every, full = rt.every_token_step_flops(6), rt.full_ft_step_flops(6)
    assert full == plain.full_ft_step_flops(6) and 0 < every < full
    res = rt.train_step(x, y, Budget((1.0,) * 4, (True,) * 4), 1e-3, 0)
    again = rt.train_step(x, y, Budget((1.0,) * 4, (True,) * 4), 1e-3, 1)  # from the per-block cache
    assert res.train_flops == again.train_flops == every
    assert rt.every_token_step_flops(3) < every  # per batch size
    assert rt._every_token_flops == {6: every, 3: rt.every_token_step_flops(3)}  # counted once each
    assert make_runtime(lora=LORA, count_flops="off").every_token_step_flops(6) is None


def test_every_token_count_leaves_state_untouched(batch):
    x, y = batch
    rt = make_runtime(lora=LORA)
    rt.train_step(x, y, Budget((0.5,) * 4, (True, False, True, False)), 1e-3, 0)
    flags = [p.requires_grad for p in rt.model.parameters()]
    params = [p.detach().clone() for p in rt.model.parameters()]
    moments = {id(p): {k: v.clone() for k, v in st.items()} for p, st in rt.optimizer.state.items()}
    rng, eager, grads = torch.get_rng_state(), rt.patch.control.eager, _grads(rt)
    rt.every_token_step_flops(6)
    assert flags == [p.requires_grad for p in rt.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params, rt.model.parameters()))
    assert _grads(rt) == grads
    assert torch.equal(rng, torch.get_rng_state()) and rt.patch.control.eager == eager
    assert {id(p) for p in rt.optimizer.state} == set(moments)
    assert all(torch.equal(v, moments[id(p)][k]) for p, st in rt.optimizer.state.items() for k, v in st.items())
    res = rt.train_step(x, y, Budget((0.5,) * 4, (True, False, True, False)), 1e-3, 1)
    assert res.trained_blocks == (0, 2) and all(p.grad is None for p in rt.block_params[1])


def test_grad_flags_are_restored_when_the_measurement_fails():
    from runtimes.torch_backend.flops import grad_flags_restored

    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"), grad_flags_restored(lin.parameters(), clear_grads=True) as ps:
        for p in ps:
            p.requires_grad_(True)
        lin(torch.ones(1, 3)).sum().backward()
        raise RuntimeError("boom")
    assert [p.requires_grad for p in lin.parameters()] == [True, False]
    assert lin.weight.grad is None and lin.bias.grad is None


def test_fused_attention_is_counted_on_cpu():
    register_cpu_sdpa()
    q = torch.randn(2, 2, 17, 16, requires_grad=True)
    with counter() as c:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    # forward: 2 matmuls of 2*B*H*N*N*d; backward counts the flash recomputation too
    fwd = 2 * (2 * 2 * 2 * 17 * 17 * 16)
    assert c.get_total_flops() > fwd * 2


def test_nan_loss_raises_with_step(batch):
    from runtimes.protocol import NonFiniteLoss

    x, y = batch
    rt = make_runtime()
    with pytest.raises(NonFiniteLoss, match="step 4"):
        rt.train_step(x * float("nan"), y, Budget((1.0,) * 4, (True,) * 4), 1e-3, 4)


def test_lora_trains_only_adapters_and_head(batch):
    x, y = batch
    rt = make_runtime(lora=dict(rank=2, alpha=4.0, dropout=0.0, targets=["qkv"]))
    trainable = [n for n, p in rt.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "head" in n for n in trainable)
    assert all(len(ps) == 2 for ps in rt.block_params)  # lora_A, lora_B per block
    res = rt.train_step(x, y, Budget((0.5,) * 4, (True, False, True, False)), 1e-2, 0)
    assert res.kept_tokens == (8, 4, 2, 1)
    plain = rt.export_model()
    assert type(plain).__name__ == "VisionTransformer"
    assert not any("lora" in n for n, _ in plain.named_parameters())
    rt.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), rt.model(x), atol=1e-5)


def test_export_model_is_unpatched_copy(batch):
    x, y = batch
    rt = make_runtime()
    rt.train_step(x, y, Budget((0.5,) * 4, (True,) * 4), 1e-2, 0)
    plain = rt.export_model()
    assert all(not type(b).__name__.startswith("Alast") for b in plain.blocks)
    assert all(type(b).__name__.startswith("Alast") for b in rt.timm_model.blocks)
    rt.train_step(x, y, Budget((0.5,) * 4, (True,) * 4), 1e-2, 1)  # still trains after export


def test_a_budget_rounding_tokens_differently_from_the_runtime_is_refused():
    from runtimes.protocol import check_budget

    rt = TorchRuntime(make_tiny_vit(), lr=1e-3, weight_decay=0.0, grad_clip=None, token_multiple=8)
    dropping = Budget((0.5,) * 4, (True,) * 4)
    with pytest.raises(ValueError, match="multiples of 1.*multiples of 8"):
        check_budget(rt, dropping)
    check_budget(rt, Budget((0.5,) * 4, (True,) * 4, token_multiple=8))
    check_budget(rt, Budget((1.0,) * 4, (True,) * 4))  # nothing dropped: nothing to round


def test_a_step_that_freezes_the_embeddings_stops_its_backward_at_the_lowest_trained_block(batch):
    """ALaST's dense final phase: the top blocks train, the embeddings do not, and the backward (counted,
    and as the cost model predicts it) does not reach the blocks below."""
    from alast.planning.profile import profile_model
    from planners.simulate import StepShape, step_cost
    from runtimes.torch_backend.params import embedding_parameters

    x, y = batch
    rt = make_runtime()
    cm = profile_model(make_tiny_vit(), "tiny", img_size=32)
    stem = [p.detach().clone() for p in embedding_parameters(rt.timm_model)]
    top = (False, False, True, True)
    res = rt.train_step(x, y, Budget((1.0,) * 4, top, train_embeddings=False), 1e-2, 0)
    assert not res.embeddings_trained
    assert all(torch.equal(a, b) for a, b in zip(stem, embedding_parameters(rt.timm_model)))
    assert all(p.grad is None for p in embedding_parameters(rt.timm_model))
    predicted = step_cost(cm, StepShape((16,) * 4, (16,) * 4, top, embed_trained=False), x.shape[0]).train_flops
    assert res.train_flops == pytest.approx(predicted, rel=1e-6)
    with_stem = rt.train_step(x, y, Budget((1.0,) * 4, top), 1e-2, 1)
    assert with_stem.embeddings_trained and with_stem.train_flops > res.train_flops
    assert with_stem.train_flops == pytest.approx(step_cost(cm, StepShape((16,) * 4, (16,) * 4, top),
                                                            x.shape[0]).train_flops, rel=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(stem, embedding_parameters(rt.timm_model)))


def test_a_step_after_evaluation_or_an_inference_count_trains_in_training_mode(batch):
    """The step switches the model to training mode only where it is not (the switch visits every
    module); after an evaluation, an inference FLOP count of the timm model, or a caller's eval(),
    the next step still drops tokens and draws dropout as a training step does."""
    from runtimes.token_schedule import inference_flops

    x, y = batch
    rt = make_runtime()
    budget = Budget((0.5,) * 4, (True,) * 4)
    for leave_eval in (lambda: rt.evaluate([(x, y)]), lambda: inference_flops(rt.timm_model, None),
                       lambda: rt.timm_model.eval(), lambda: rt.patch.blocks[-1].eval()):
        leave_eval()
        seen = []
        hook = rt.timm_model.norm.register_forward_hook(lambda m, i, o, seen=seen: seen.append((m.training, o.shape[1])))
        res = rt.train_step(x, y, budget, 1e-3, 0)
        hook.remove()
        assert seen == [(True, 2)]  # the prefix and one kept token leave the last block
        assert res.kept_tokens == (8, 4, 2, 1)
        assert all(m.training for m in rt.model.modules())
