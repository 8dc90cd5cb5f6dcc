"""torch.compile of the block compute (no recompiles as budgets move), the per-block FLOP cache,
token counts rounded to a multiple, and the fused optimizer switch."""
from __future__ import annotations

import random

import pytest
import torch

from planners import Budget, kept_token_counts
from runtimes.torch_backend.params import make_optimizer
from runtimes.torch_backend.runtime import TorchRuntime
from tests.conftest import make_tiny_vit


def make_runtime(global_pool="token", **kw):
    opts = dict(lr=1e-2, weight_decay=0.05, grad_clip=1.0, device="cpu", memory_probe_steps=lambda s: False)
    return TorchRuntime(make_tiny_vit(global_pool=global_pool), **{**opts, **kw})


def moving_budgets(n: int, seed: int = 0, freeze_stem: bool = False):
    rng = random.Random(seed)
    for i in range(n):
        ratios = tuple(rng.choice([1.0, 0.9, 0.75, 0.6, 0.5]) for _ in range(4))
        trained = tuple(rng.random() < 0.75 for _ in range(4))
        yield Budget(ratios, trained, train_embeddings=not (freeze_stem and i % 3 == 0))


@pytest.mark.slow  # dynamo traces for about 20 s; the compiled step's numbers: test_compiled_step_matches_eager
def test_compiled_run_stops_recompiling_after_warm_up(batch, monkeypatch):
    """New token counts and trained sets after warm-up compile nothing. Whether dynamo traces a
    new graph is decided by its guards, before any backend runs, so the test compiles with
    ``aot_eager`` (forward and backward traced, no code generated: a quarter of inductor's time);
    :func:`test_compiled_step_matches_eager` runs inductor itself."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **{**options, "backend": "aot_eager"}))
    torch._dynamo.reset()
    counters.clear()
    x, y = batch
    rt = make_runtime(compile=True, count_flops="off")
    budgets = list(moving_budgets(20))
    graphs, results = [], []
    for step, b in enumerate(budgets):
        results.append(rt.train_step(x, y, b, 1e-2, step))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2, "the dropping blocks' parts were not compiled"
    # three functions (whole block, the selecting block's two parts) x trained/frozen x input
    # grad, shared by all blocks
    assert graphs[-1] == graphs[8] <= 12
    assert len({r for b in budgets[9:] for r in kept_token_counts(b.keep_ratios, 16)[1]}) > 3
    assert not counters["graph_break"]
    assert rt.compile_time_s > 0
    assert sum(r.compile_time_s for r in results) == pytest.approx(rt.compile_time_s)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_compiled_step_matches_eager(batch, pool):
    """The compiled parts of a block that drops tokens inside compute what the eager ones do (with
    a class token, and without one: the pooled query and deltas)."""
    x, y = batch
    b = Budget((0.75, 1.0, 0.5, 1.0), (True, False, True, True))
    eager = make_runtime(pool, count_flops="off")
    comp = make_runtime(pool, compile=True, count_flops="off")
    assert all(blk._alast_in_block for blk in comp.patch.blocks)
    for step in range(2):
        r1, r2 = eager.train_step(x, y, b, 1e-2, step), comp.train_step(x, y, b, 1e-2, step)
        assert r2.loss == pytest.approx(r1.loss, rel=1e-5)
        assert r2.deltas == pytest.approx(r1.deltas, rel=1e-4)
        assert r2.kept_tokens == r1.kept_tokens
        for (name, p1), p2 in zip(eager.model.named_parameters(), comp.model.parameters()):
            assert (p1.grad is None) == (p2.grad is None), name
            if p1.grad is not None:  # gradients, not weights: AdamW magnifies float noise in near-zero ones
                torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_counted_flops_equal_eager(batch):
    """A compiled run counts (once per shape, eagerly) what an eager run counts."""
    x, y = batch
    eager, comp = make_runtime(), make_runtime(compile=True)
    for step, b in enumerate(moving_budgets(6, seed=3)):
        assert comp.train_step(x, y, b, 1e-2, step).train_flops == eager.train_step(x, y, b, 1e-2, step).train_flops


def test_cached_flops_equal_a_fresh_count(batch):
    """A step assembled from cached per-block pieces reports what counting it would."""
    x, y = batch
    cached, fresh = make_runtime(), make_runtime()
    for step, b in enumerate(moving_budgets(12, seed=1, freeze_stem=True)):
        cached.train_step(x, y, b, 1e-2, step)
    hits = 0
    for step, b in enumerate(moving_budgets(12, seed=2, freeze_stem=True)):
        keys = cached._flops.keys(6, *kept_token_counts(b.keep_ratios, 16), b.trained, b.train_embeddings)
        hit = cached._flops.lookup(keys)
        fresh._flops = type(fresh._flops)(fresh._flops.block_names)  # always count
        expected = fresh.train_step(x, y, b, 1e-2, step).train_flops
        assert cached.train_step(x, y, b, 1e-2, step).train_flops == expected
        hits += hit is not None
    assert hits > 0


def random_budgets(n: int, blocks: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield Budget(tuple(rng.uniform(0.4, 1.0) for _ in range(blocks)),
                     tuple(rng.random() < 0.6 for _ in range(blocks)), train_embeddings=rng.random() < 0.5)


# avg slow: the eva variant (DINOv3's layout) reads the mean of the patch tokens through the same counts
@pytest.mark.parametrize("variant", ["token", pytest.param("avg", marks=pytest.mark.slow), "lora", "fuse", "eva"])
def test_solved_step_counts_equal_a_fresh_count(variant, batch):
    """Under moving budgets almost every step has a block shape never counted; the runtime solves
    those from counted shapes of the same kind (planners.countfit) instead of counting the step,
    and what it reports is what counting the step reports: with a class token, with average
    pooling, with LoRA, with fused tokens (whose count has a term only where two or more tokens are
    kept), on an EVA."""
    from tests.conftest import make_tiny_eva

    kw = {"lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv"]}} if variant == "lora" else {}
    kw |= {"fuse_tokens": True} if variant == "fuse" else {}

    def build():
        model = make_tiny_eva("dinov3") if variant == "eva" else make_tiny_vit(
            global_pool="avg" if variant == "avg" else "token", depth=6)
        return TorchRuntime(model, lr=1e-3, weight_decay=0.05, grad_clip=1.0, device="cpu",
                            memory_probe_steps=lambda s: False, **kw)

    x, y = batch
    rt, fresh = build(), build()
    solved = counted = 0
    for step, b in enumerate(random_budgets(30, rt.num_blocks)):
        keys = rt._flops.keys(x.shape[0], *kept_token_counts(b.keep_ratios, rt.num_patches), b.trained,
                              b.train_embeddings and bool(rt.embed_params))
        exact = rt._flops.counts.blocks.exact
        before = rt._flops.lookup(keys)
        got = rt.train_step(x, y, b, 1e-3, step).train_flops
        if before is None:
            counted += 1
            continue
        fresh._flops = type(fresh._flops)(fresh._flops.block_names)  # always count
        assert got == before == fresh.train_step(x, y, b, 1e-3, step).train_flops, step
        solved += any(k not in exact for k in keys[0])
    assert solved >= 8 and counted <= 22, (solved, counted)


@pytest.mark.parametrize("multiple,min_tokens,expected", [
    (1, 1, (176, 158, 79, 23)),     # floor(r * n): today's exact counts
    (8, 1, (176, 152, 72, 16)),     # each rounded down to a multiple of 8
    (8, 20, (176, 152, 72, 20)),    # ... but never below min_tokens
    (8, 200, (196, 196, 196, 196)),  # min_tokens above what is there: keep all
])
def test_token_multiple_rounds_down_but_never_below_min_tokens(multiple, min_tokens, expected):
    _, out = kept_token_counts((0.9, 0.9, 0.5, 0.3), 196, min_tokens, multiple)
    assert out == expected


def test_runtime_applies_the_token_multiple(batch):
    x, y = batch
    rt = make_runtime(token_multiple=8)
    res = rt.train_step(x, y, Budget((0.9, 1.0, 0.6, 1.0), (True,) * 4), 1e-2, 0)
    assert res.kept_tokens == kept_token_counts((0.9, 1.0, 0.6, 1.0), 16, 1, 8)[1] == (8, 8, 1, 1)
    with pytest.raises(ValueError, match="token_multiple"):
        make_runtime(token_multiple=0)


def test_fused_adamw_only_on_cuda():
    model = make_tiny_vit()
    opt = make_optimizer(model, 1e-3, 0.05, torch.device("cpu"))
    assert not opt.defaults.get("fused")
    if torch.cuda.is_available():
        opt = make_optimizer(model.cuda(), 1e-3, 0.05, torch.device("cuda"))
        assert opt.defaults["fused"]
