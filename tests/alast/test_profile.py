"""Cost model: profile vs closed form, vs torch.utils.flop_counter, JSON round trip, closed-form
expectations of the simulator and the target solver."""
import itertools
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from alast.planning.measure import STATES, fit_poly, fvcore_macs
from alast.planning.profile import profile_model
from planners.costmodel import COST_MODEL_VERSION, CostModel, CostModelError, load_cost_model, poly
from planners.simulate import (
    StepShape,
    block_states,
    expected_step_flops,
    full_step_flops,
    state_probabilities,
    step_cost,
)
from planners.target import TargetError, solve_target
from runtimes.torch_backend.flops import counter
from tests.conftest import make_tiny_vit


def _vit(dim=32, heads=2, mlp_ratio=2.0, patch=8, depth=2, reg_tokens=0, init_values=None):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=mlp_ratio, num_classes=5, qkv_bias=True, reg_tokens=reg_tokens,
                             init_values=init_values)


@pytest.fixture(scope="module")
def tiny_cm():
    return profile_model(make_tiny_vit(), "tiny", img_size=32)


@pytest.mark.parametrize("dim,heads,mlp_ratio,patch", [(32, 2, 2.0, 8), (48, 4, 4.0, 8), (32, 1, 3.0, 16)])
def test_profile_matches_the_closed_form_of_a_block(dim, heads, mlp_ratio, patch):
    """Per sample at n tokens: projections and MLP n*D^2*(4 + 2h) MACs, attention 2*n^2*D MACs;
    backward: trained 2x the linear part + 2.5x attention (flash backward recomputes scores),
    frozen 1x linear + 2.5x attention; CLS scores n*D MACs."""
    cm = profile_model(_vit(dim, heads, mlp_ratio, patch), "closed-form", img_size=32)
    lin = dim * dim * (4 + 2 * mlp_ratio)
    blk = cm.blocks[0]
    assert blk.fwd_macs == pytest.approx((0.0, lin, 2 * dim), abs=1e-6)
    assert blk.fwd_flops == pytest.approx((0.0, 2 * lin, 4 * dim), abs=1e-6)
    assert blk.bwd_flops["weights_and_input"] == pytest.approx((0.0, 4 * lin, 10 * dim), abs=1e-6)
    assert blk.bwd_flops["input_only"] == pytest.approx((0.0, 2 * lin, 10 * dim), abs=1e-6)
    assert poly(blk.select_flops, 17) == pytest.approx(2 * dim * 17)
    n_patches = (32 // patch) ** 2
    assert cm.embed.fwd_macs[0] == pytest.approx(n_patches * 3 * patch * patch * dim)
    assert poly(cm.head.fwd_macs, 5) == pytest.approx(dim * 5)
    assert cm.fit_max_rel_error < 1e-9


def test_fvcore_counts_fused_attention():
    """fvcore ignores scaled_dot_product_attention; our handle must count it like the matmul path."""
    import timm.layers

    vit = _vit(depth=1)
    x = torch.randn(1, 17, 32)
    assert vit.blocks[0].attn.fused_attn
    fused = fvcore_macs(vit.blocks[0], x)
    vit.blocks[0].attn.fused_attn = False
    try:
        plain = fvcore_macs(vit.blocks[0], x)
    finally:
        vit.blocks[0].attn.fused_attn = timm.layers.use_fused_attn()
    assert fused == pytest.approx(plain) and fused > 17 * 32 * 32 * 8


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"init_values": 1e-5}, {"mlp_ratio": 4.0, "heads": 4}])
def test_profile_reproduces_torch_flop_counter_on_a_timm_vit(kw):
    vit = _vit(depth=3, **kw)
    cm = profile_model(vit, "vit", img_size=32)
    vit.train()
    with counter() as fc:
        vit(torch.randn(3, 3, 32, 32)).sum().backward()
    assert full_step_flops(cm) * 3 == pytest.approx(fc.get_total_flops(), rel=0.01)
    assert full_step_flops(cm) * 3 == pytest.approx(fc.get_total_flops(), rel=1e-9)


def test_two_flops_per_mac_convention(tiny_cm):
    for blk in tiny_cm.blocks:
        assert poly(blk.fwd_flops, 17) == pytest.approx(2 * poly(blk.fwd_macs, 17))


@pytest.mark.parametrize("trained,embed,expected", [
    ((True, True), True, ["weights_and_input", "weights_and_input"]),
    ((False, True), True, ["input_only", "weights_and_input"]),
    ((False, True, False), False, ["none", "weights_only", "input_only"]),
    ((True, False), False, ["weights_only", "input_only"]),
])
def test_block_states(trained, embed, expected):
    assert block_states(trained, embed) == expected


@pytest.mark.parametrize("L,k,embed", [(4, 1, False), (4, 3, False), (6, 2, False), (4, 2, True)])
def test_state_probabilities_match_enumeration(L, k, embed):
    counts = [dict.fromkeys(("weights_and_input", "weights_only", "input_only", "none"), 0) for _ in range(L)]
    subsets = list(itertools.combinations(range(L), k))
    for s in subsets:
        for i, st in enumerate(block_states([i in s for i in range(L)], embed)):
            counts[i][st] += 1
    for probs, c in zip(state_probabilities(L, k, embed), counts):
        for st, p in probs.items():
            assert p == pytest.approx(c[st] / len(subsets))


def test_expected_cost_is_the_mean_over_trained_sets(tiny_cm):
    L, N = tiny_cm.num_blocks, tiny_cm.num_patches
    from planners.rules import kept_token_counts

    tin, tout = kept_token_counts([0.7] * L, N)
    costs = [step_cost(tiny_cm, StepShape(tin, tout, tuple(i in s for i in range(L))), 1).train_flops
             for s in itertools.combinations(range(L), 2)]
    assert expected_step_flops(tiny_cm, 0.7, 2) == pytest.approx(sum(costs) / len(costs))


def test_json_round_trip_and_checks(tiny_cm, tmp_path):
    path = tiny_cm.save(tmp_path / "cost.json")
    back = load_cost_model(path, model="tiny", img_size=32)
    assert back == tiny_cm
    with pytest.raises(CostModelError, match="is for 'tiny', not 'vit_base_patch16_224'"):
        load_cost_model(path, model="vit_base_patch16_224")
    with pytest.raises(CostModelError, match="image size 32, not 224"):
        load_cost_model(path, img_size=224)
    data = json.loads(path.read_text())
    data["version"] = COST_MODEL_VERSION + 1
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(CostModelError, match="version"):
        load_cost_model(tmp_path / "v.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CostModelError, match="cannot read"):
        load_cost_model(tmp_path / "bad.json")
    with pytest.raises(CostModelError, match="not found"):
        load_cost_model(tmp_path / "missing.json")


def test_head_scales_with_classes(tiny_cm):
    cm10 = tiny_cm.with_num_classes(10)
    assert poly(cm10.head.fwd_flops, 17) == pytest.approx(2 * poly(tiny_cm.head.fwd_flops, 17))


@pytest.mark.parametrize("trained", [(True,) * 4, (False, True, False, True), (False, False, False, True)])
def test_the_optimizer_steps_temporaries_are_predicted_for_the_parameters_it_steps(trained):
    """Single-tensor AdamW (the CPU runtime's) holds two temporaries of a parameter's size while the
    one before it in its group is still bound: the cost model's parameter order and sizes predict
    what a step allocates beyond its state, for the blocks a step trains (the head always)."""
    from planners.simulate import _adamw_temp
    from runtimes.torch_backend.memory import frozen_aware_mem_tracker
    from runtimes.torch_backend.params import make_optimizer

    model = _vit(dim=32, heads=2, mlp_ratio=6.0, depth=4)  # fc1 and fc2 the largest, one after the other
    cm = profile_model(model, "opt", img_size=32)
    opt = make_optimizer(model, 1e-3, 0.05, torch.device("cpu"))
    in_blocks = {id(p): i for i, b in enumerate(model.blocks) for p in b.parameters()}
    embed = {id(p) for p in (model.cls_token, model.pos_embed, *model.patch_embed.parameters())}
    for _ in range(2):  # the first step creates the state; the second allocates only temporaries
        opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            i = in_blocks.get(id(p))
            if (trained[i] if i is not None else id(p) not in embed):
                p.grad = torch.randn_like(p)
        mt = frozen_aware_mem_tracker()
        mt.track_external(model, opt)
        with mt:
            before = next(iter(mt.get_tracker_snapshot("current").values()))["Total"]
            opt.step()
        peak = next(iter(mt.get_tracker_snapshot("peak").values()))["Total"]
    shape = StepShape((16,) * 4, (16,) * 4, trained)
    assert _adamw_temp(cm, shape, False, 0) == peak - before
    assert cm.memory.opt_groups[0][:2] == ((-1, 32 * 3 * 8 * 8 * 4), (0, 3 * 32 * 32 * 4))  # the patch conv, qkv


def _leaves(value, path=""):
    if isinstance(value, dict):
        for k, v in sorted(value.items()):
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("profiled,wanted", [(1000, 25), (25, 1000)])
def test_a_head_for_other_classes_equals_one_profiled_for_them(profiled, wanted):
    """Every FLOP and memory figure, the parameter bytes and the head's largest tensor included."""
    scaled = profile_model(make_tiny_vit(num_classes=profiled), "tiny", img_size=32).with_num_classes(wanted)
    direct = profile_model(make_tiny_vit(num_classes=wanted), "tiny", img_size=32)
    got, want = dict(_leaves(scaled.to_dict())), dict(_leaves(direct.to_dict()))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, rel=1e-9, abs=1e-6) if isinstance(value, float) else value), key


@pytest.mark.parametrize("policy,target", [("alast", 0.5), ("alast", 0.8), ("alast", 1.0), ("tokens", 0.6),
                                          ("freeze", 0.9), ("random", 0.95)])
def test_target_solver_hits_the_target(tiny_cm, policy, target):
    sol = solve_target(tiny_cm, policy, target, {"min_tokens": 1})
    assert sol.predicted_ratio == pytest.approx(target, rel=0.05)
    lo, hi = sol.ratio_range  # per step: with 16 patches one token of a trained block is ~2% of a step
    assert target * 0.94 <= lo <= hi <= target * 1.05
    if policy == "alast":
        k = sol.knobs
        assert k["b_min"] <= k["b_init"] <= k["b_max"] <= 1.0 and 1 <= k["k_trained"] <= tiny_cm.num_blocks


@pytest.mark.parametrize("policy,target,message", [
    ("alast", 0.05, r"cheapest setting .* costs 0\.\d+x, \d+% of it in the patch embedding and head"),
    ("tokens", 0.1, "out of reach"),
    ("freeze", 0.5, "input gradient"),
    ("full", 0.5, "no knob"),
    ("alast", 1.5, r"\(0, 1\]"),
    ("alast", 0.0, r"\(0, 1\]"),
])
def test_unreachable_targets_name_the_floor(tiny_cm, policy, target, message):
    with pytest.raises(TargetError, match=message):
        solve_target(tiny_cm, policy, target, {"min_tokens": 1})


def test_planner_modules_import_without_torch():
    code = ("import sys; import planners.costmodel, planners.simulate, planners.target; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cost_model_type_is_plain_numbers(tiny_cm):
    d = tiny_cm.to_dict()
    assert d["format"] == "alast-cost-model" and "macs" in d["units"] and "flops" in d["units"]
    assert isinstance(CostModel.from_dict(json.loads(json.dumps(d))), CostModel)
    assert math.isfinite(full_step_flops(tiny_cm))


@pytest.mark.parametrize("lora,pool", [(None, "token"), ({"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["qkv"]},
                                                      "token"), (None, "avg")])
def test_step_cost_matches_the_runtime_count(lora, pool, batch):
    """Token dropping, frozen blocks, and with LoRA blocks below the lowest trained one (no backward);
    also a model without a class token (global average pooling)."""
    from planners import Budget
    from runtimes.torch_backend.runtime import TorchRuntime

    rt = TorchRuntime(make_tiny_vit(global_pool=pool), lr=1e-3, weight_decay=0.0, grad_clip=None, device="cpu",
                      lora=lora, memory_probe_steps=lambda s: False)
    cm = profile_model(rt.model, "tiny", img_size=32, lora=lora)
    assert cm.embed.trainable is (lora is None)
    images, labels = batch
    for ratios, trained in [((1.0,) * 4, (True,) * 4), ((0.6, 0.8, 1.0, 0.5), (False, True, False, True)),
                            ((1.0,) * 4, (False, False, True, False)), ((0.3,) * 4, (False, False, False, True))]:
        budget = Budget(ratios, trained)
        counted = rt.train_step(images, labels, budget, 1e-3, 0).train_flops
        predicted = step_cost(cm, StepShape.from_budget(budget, cm.num_patches), images.shape[0]).train_flops
        assert predicted == pytest.approx(counted, rel=1e-6), (ratios, trained)


def test_step_flops_are_the_step_costs_flops_exactly(tiny_cm):
    """The target projection prices FLOPs alone (``step_flops``) dozens of times a step: they must be
    the step cost's to the bit, or a projected step and its simulation would part."""
    from planners.rules import kept_token_counts
    from planners.simulate import step_flops

    L, N = tiny_cm.num_blocks, tiny_cm.num_patches
    rng = random.Random(0)
    for cm in (tiny_cm, tiny_cm.selecting_after_blocks()):
        for _ in range(200):
            tin, tout = kept_token_counts([rng.choice((1.0, rng.random())) for _ in range(L)], N,
                                          rng.choice((1, 2)))
            shape = StepShape(tin, tout, tuple(rng.random() < 0.5 for _ in range(L)), rng.random() < 0.5)
            batch = rng.choice((1, 3, 64))
            assert step_flops(cm, shape, batch) == step_cost(cm, shape, batch).train_flops


def test_blocks_that_select_inside_cost_their_kept_tokens(tiny_cm):
    """Both runtimes select inside timm's blocks: a dropping step costs less than the same step run as
    whole blocks (token fusion), and exactly the whole block where nothing drops."""
    from alast.config import AlastConfig
    from alast.planning.plan import _policy_runtime

    assert all(b.drop is not None for b in tiny_cm.blocks)
    whole = tiny_cm.selecting_after_blocks()
    assert all(b.drop is None for b in whole.blocks)
    drop = StepShape((16, 12, 6, 3), (12, 6, 3, 2), (False, True, True, True))
    dense = StepShape((16,) * 4, (16,) * 4, (False, True, True, True))
    assert step_cost(tiny_cm, drop, 8).train_flops < 0.9 * step_cost(whole, drop, 8).train_flops
    assert step_cost(tiny_cm, dense, 8) == step_cost(whole, dense, 8)
    blk = whole.blocks[1]
    f, _, s, _ = blk.dropping("weights_and_input", 13, 7)
    assert (f, s) == (blk.forward_flops(13), poly(blk.select_flops, 13))
    for overrides, inside in [({}, True), ({"backend": {"name": "ort"}}, True),
                              ({"policy": {"fuse_tokens": True}}, False), ({"backend": {"compile": True}}, True)]:
        cm = _policy_runtime(tiny_cm, AlastConfig.model_validate(overrides))
        assert all((b.drop is not None) is inside for b in cm.blocks), overrides


@pytest.mark.parametrize("matmul_attention", [False, True])
def test_memory_events_predict_the_forward_and_backward_peaks_at_other_batches_and_tokens(matmul_attention):
    """Measured at batches 4 and 16 and four token counts, a block's memory events predict the
    peaks of its forward (every state) and backward (every backward state) at batch 48 and token
    counts it was not measured at: whole, and selecting inside with one patch token kept, about a
    third, all but one. Exact: every tensor's bytes are linear in the batch and polynomial in the
    tokens, and the events are the ops of the same code at every count."""
    from alast.planning.measure import memory_timeline
    from runtimes.torch_backend.patch import forward_selecting

    model = _vit(dim=48, heads=4, mlp_ratio=4.0, patch=4, depth=1)  # 64 patch tokens
    model.blocks[0].attn.fused_attn = not matmul_attention
    cm = profile_model(model, "events", img_size=32)
    blk, cost = model.blocks[0], cm.blocks[0]
    params = list(blk.parameters())
    for state in ("weights_and_input", "weights_only", "input_only", "none"):
        for n in (24, 65):
            fwd, bwd = memory_timeline(blk, lambda b, x: b(x), params, state, torch.randn(48, n, 48))
            assert cost.forward_excess(state, n, n, 48) == pytest.approx(max(b for _, b in fwd), abs=64), (state, n)
            assert cost.transient(state, n, 48) == pytest.approx(max((b for _, b in bwd), default=0), abs=64)
            for keep in (1, n // 3, n - 2):
                fn = lambda b, x: forward_selecting(b, x, keep, 1)[0]  # noqa: B023
                fwd, bwd = memory_timeline(blk, fn, params, state, torch.randn(48, n, 48))
                assert cost.forward_excess(state, n, 1 + keep, 48) == pytest.approx(max(b for _, b in fwd), abs=64)
                assert cost.dropping_transient(state, n, 1 + keep, 48) == pytest.approx(
                    max((b for _, b in bwd), default=0), abs=64), (state, n, keep)
    assert cm.fit_max_rel_error < 1e-9


def test_a_timeline_holds_after_every_op_what_memtracker_holds(monkeypatch):
    """The profile's timeline tracker (its own walk of each op's outputs, no module snapshots) gives
    after every op of a forward and a backward the same bytes as MemTracker's own dispatch, for a
    whole block and a selecting one, a Eva block with its rotary embeddings held, in every state."""
    from alast.planning import measure
    from runtimes.torch_backend.patch import forward_selecting
    from tests.conftest import make_tiny_eva, upstream_mem_tracker_cls

    class Reference(upstream_mem_tracker_cls()):
        record = None

        def total(self):
            return sum(s["Total"] for s in self._curr_mem_snap.values())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.record is not None:
                self.record.append((str(func), self.total()))
            return out

    vit, eva = _vit(dim=48, heads=4, mlp_ratio=4.0, patch=4, depth=1), make_tiny_eva("mixed", depth=1)
    cases = [(vit.blocks[0], lambda b, x: b(x), 48, 65),
             (vit.blocks[0], lambda b, x: forward_selecting(b, x, 20, 1)[0], 48, 65),
             (eva.blocks[0], lambda b, x: forward_selecting(b, x, 5, 1)[0], 32, 17)]
    for blk, fn, dim, n in cases:
        params = list(blk.parameters())
        fn(blk, torch.randn(2, n, dim))  # what a first call computes once (the rotary embeddings' table)
        for state in ("weights_and_input", "weights_only", "input_only", "none"):
            x = torch.randn(8, n, dim)
            ours = measure.memory_timeline(blk, fn, params, state, x.clone())
            with monkeypatch.context() as m:
                m.setattr(measure, "_timeline_tracker_cls", lambda: Reference)
                theirs = measure.memory_timeline(blk, fn, params, state, x.clone())
            assert ours == theirs and len(ours[0]) > 10, state
            assert (len(ours[1]) > 10) == (state != "none")


def test_memory_events_recover_every_op_that_can_lead_and_only_those():
    """Each op's bytes ``c(n) + batch * s(n)``: the fit keeps the ops that hold the most at some
    token count and batch (weight gradients at small batches, activation gradients at large ones),
    exactly, and drops one that never leads; an op that runs at one count only is left out."""
    from alast.planning.measure import fit_events
    from alast.planning.profile import _n_value

    ns = [2, 17, 33, 65]
    ops = {"mm": ((1000.0, 0.0, 0.0), (0.0, 8.0, 0.0)),  # weight gradients: no batch
           "bmm": ((0.0, 0.0, 0.0), (0.0, 64.0, 0.5)),  # activations, with attention's n^2
           "add": ((0.0, 0.0, 0.0), (0.0, 16.0, 0.0))}  # never the most
    lines = [[(op, poly(c, n), poly(s, n)) for op, (c, s) in ops.items()] for n in ns]
    fit = lambda ys: fit_poly(ns, ys)
    events, err = fit_events(ns, lines, fit, _n_value, list(range(2, 66)))
    assert sorted(events) == sorted((*c, *s) for op, (c, s) in ops.items() if op != "add") and err < 1e-12
    lines[2].insert(1, ("topk", 1e9, 0.0))  # a kernel one count picks, and there the most: its error shows
    events_again, err = fit_events(ns, lines, fit, _n_value, list(range(2, 66)))
    assert events_again == events and err > 0.5


def _old_format(data, version):
    """A version-4 cost model as a version-2 or 3 file holds it: backward transients ``(g, c[, c0])``
    (version 3: two planes for a selecting block), no memory events."""
    data = {**data, "version": version}
    for b in data["blocks"]:
        b.pop("fwd_events"), b.pop("bwd_events"), b["drop"].pop("fwd_events"), b["drop"].pop("bwd_events")
        b["transient_bytes"] = {s: [100.0, 8.0 * 32, 64.0][: 2 if version == 2 else 3] for s in STATES}
        b["drop"]["transient_bytes"] = None if version == 2 else {s: [64.0, 10.0, 4.0, -2.0, 5.0, 1.0, 3.0]
                                                                   for s in STATES}
    return data


@pytest.mark.parametrize("version", [2, 3])
def test_older_cost_models_still_read(tiny_cm, tmp_path, version):
    """Cost models profiled before the memory events read as they were: the backward transient of
    their version, no forward peak (a step's peak is its backward's)."""
    data = _old_format(json.loads(tiny_cm.save(tmp_path / "cost.json").read_text()), version)
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = load_cost_model(tmp_path / "old.json")
    blk = old.blocks[0]
    assert blk.forward_excess("weights_only", 17, 17, 8) is None
    if version == 2:
        assert blk.transient("weights_only", 17, 8) == 8 * 17 * 8 * 32
        assert blk.dropping_transient("weights_only", 17, 5, 8) == blk.transient("weights_only", 17, 8)
    else:
        assert blk.transient("weights_only", 17, 8) == 64.0 + 8 * 17 * 8 * 32
        assert blk.dropping_transient("weights_only", 17, 5, 8) == 64.0 + 8 * max(10 + 4 * 17 - 2 * 5, 5 + 17 + 3 * 5)
        assert blk.dropping_transient("weights_only", 2, 1, 1) == 100.0  # at least the weight gradients
    assert old.version == version and old.to_dict()["version"] == version
    cost = step_cost(old, StepShape((16,) * 4, (16,) * 4, (False, True, True, True)), 8)
    assert cost.peak_bytes == cost.bwd_peak_bytes > 0  # no forward peak


def test_a_version_4_block_without_memory_events_is_refused(tiny_cm, tmp_path):
    data = json.loads(tiny_cm.save(tmp_path / "cost.json").read_text())
    data["blocks"][1].pop("bwd_events")
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CostModelError, match="block 1 has neither bwd_events nor transient_bytes"):
        load_cost_model(tmp_path / "bad.json")


def test_profile_out_never_overwrites_silently(tmp_path, monkeypatch):
    """An existing --out needs --force; a run directory's own files are refused even with it; a
    directory is named as one. All refused before profiling."""
    from click.testing import CliRunner

    import alast.planning.profile as prof
    from alast_cli.main import cli

    real = prof.profile
    monkeypatch.setattr(prof, "profile", lambda *a, **k: pytest.fail("profiled before refusing --out"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/step_00000002.safetensors"):
        (run / name).write_text("the run's\n")
    mine = tmp_path / "cost.json"
    mine.write_text("keep me\n")
    cases = [([str(mine)], "exists; pass --force"), ([str(tmp_path)], "is a directory"),
             ([str(run / "config.yaml"), "--force"], "files of the run"),
             ([str(run / "summary.json"), "--force"], "files of the run"),
             ([str(run / "checkpoints" / "step_00000002.safetensors"), "--force"], "files of the run")]
    for out, fragment in cases:
        res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--out", *out])
        assert res.exit_code == 2, (out, res.output)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in res.output, res.output
    assert mine.read_text() == "keep me\n" and not (run / "summary.json").exists()
    assert all((run / n).read_text() == "the run's\n" for n in ("config.yaml", "metrics.jsonl"))

    monkeypatch.setattr(prof, "profile", real)
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--out", str(mine), "--force", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(mine.read_text())["model"] == "alast_demo_vit"


def test_calibrating_for_a_gpu_on_a_machine_without_one_names_the_option(tmp_path, monkeypatch):
    import torch
    from click.testing import CliRunner

    from alast_cli.main import cli
    from tests.cli_errors import one_error_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", "--device", "cuda", "--calibrate",
                                   "--out", str(tmp_path / "cost.json")])
    one_error_line(res, 2, "--calibrate", "no CUDA device", "--device cpu")
    assert not (tmp_path / "cost.json").exists()


def test_the_embeddings_saved_bytes_count_only_where_they_train(tiny_cm):
    """A CNN stem saves large activations where it trains; frozen (the default), it saves none, and
    the step's peak is that of a stem that saves nothing."""
    from dataclasses import replace

    stem = replace(tiny_cm, embed=replace(tiny_cm.embed, act_bytes=(1e6,), trainable=True))
    bare = replace(tiny_cm, embed=replace(tiny_cm.embed, act_bytes=(0.0,), trainable=True))
    for embed_trained in (False, True):
        shape = StepShape((16,) * 4, (16,) * 4, (True,) * 4, embed_trained)
        got, without = step_cost(stem, shape, 8).peak_bytes, step_cost(bare, shape, 8).peak_bytes
        assert got == (without + 8e6 if embed_trained else without), embed_trained
