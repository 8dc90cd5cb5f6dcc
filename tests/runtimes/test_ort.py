"""One contract suite for every runtime, ORT-vs-torch loss parity, and the ORT backend's specifics."""
import copy
import json
import random

import pytest
import torch
from click.testing import CliRunner

from alast.config import build_config
from alast.training.build import create_runtime
from planners import Budget, StepResult
from runtimes.onnx_export import RMS_NORM, _symbolics
from runtimes.protocol import Capabilities, NonFiniteLoss, Runtime
from tests.cli_errors import one_error_line
from tests.conftest import make_tiny_vit


def _has_ort_training() -> bool:
    try:
        import onnxruntime.training.api  # noqa: F401
    except ImportError:
        return False
    return True


needs_ort = pytest.mark.skipif(not _has_ort_training(), reason="onnxruntime-training is not installed")
BACKENDS = ["torch", pytest.param("ort", marks=needs_ort)]
OPT = dict(lr=1e-3, weight_decay=0.05, grad_clip=1.0)


def make_cfg(backend, count_flops="every", **train):
    # the runtime contract with trainable embeddings (alast's default config freezes them) and the
    # highest-scoring tokens kept, so two runtimes given the same budgets run the same steps;
    # count_flops="off" where a test reads no FLOPs (counting the ort graph's blocks is most of a step)
    return build_config({"backend": {"name": backend, "device": "cpu", "count_flops": count_flops},
                         "policy": {"freeze_embeddings": False, "token_select": "top"},
                         "train": {"lr": OPT["lr"], "weight_decay": OPT["weight_decay"],
                                   "grad_clip": OPT["grad_clip"], **train}})


def make(backend, model=None, count_flops="every", **train):
    return create_runtime(make_cfg(backend, count_flops, **train), model or make_tiny_vit())


NO_COUNT = {"count_flops": "off"}


def data(steps, batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(steps)]


FULL = Budget((1.0,) * 4, (True,) * 4)
HALF = Budget((0.5,) * 4, (True, True, False, True))


# -- the contract, for every runtime ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_protocol_and_step_result(backend):
    rt = make(backend)
    assert isinstance(rt, Runtime) and rt.name == backend
    assert isinstance(rt.capabilities, Capabilities)
    assert rt.capabilities.dynamic_tokens and rt.capabilities.per_step_freezing
    assert (rt.num_blocks, rt.num_patches) == (4, 16)
    (x, y), = data(1)
    full = rt.train_step(x, y, FULL, 1e-3, 0)
    part = rt.train_step(x, y, HALF, 1e-3, 1)
    assert isinstance(part, StepResult)
    assert part.tokens_in == (16, 8, 4, 2) and part.kept_tokens == (8, 4, 2, 1)
    assert part.trained_blocks == (0, 1, 3) and part.batch_size == 6 and part.step_time_s > 0
    assert len(part.deltas) == 4 and all(d > 0 for d in part.deltas)
    assert 0 < part.train_flops < full.train_flops
    assert rt.full_ft_step_flops(6) == pytest.approx(full.train_flops, rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_8_bit_pixels_train_and_evaluate_as_their_float_images(backend):
    """The decoded-image cache passes batches on as 8-bit Pixels; each runtime normalises them as
    the transform did, so a step and an evaluation on them are those on the float images."""
    import torchvision.transforms.functional as TF

    from runtimes.images import Pixels

    g = torch.Generator().manual_seed(3)
    pixels = [Pixels(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g), (0.4, 0.5, 0.6),
                     (0.2, 0.25, 0.3)) for _ in range(2)]
    labels = [torch.randint(0, 5, (6,), generator=g) for _ in range(2)]
    floats = [torch.stack([TF.normalize(TF.to_tensor(img.permute(1, 2, 0).numpy()), p.mean, p.std) for img in p.data])
              for p in pixels]  # the transform's own images
    model = make_tiny_vit()
    a, b = make(backend, copy.deepcopy(model), **NO_COUNT), make(backend, copy.deepcopy(model), **NO_COUNT)
    for s in range(2):
        ra = a.train_step(pixels[s], labels[s], HALF, 1e-3, s)
        rb = b.train_step(floats[s], labels[s], HALF, 1e-3, s)
        assert ra.loss == rb.loss and ra.deltas == rb.deltas
    assert a.evaluate(list(zip(pixels, labels))) == b.evaluate(list(zip(floats, labels)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_blocks_do_not_change(backend):
    rt = make(backend, **NO_COUNT)
    (x, y), = data(1)
    rt.train_step(x, y, FULL, 1e-3, 0)
    before = copy.deepcopy(rt.export_model().state_dict())
    rt.train_step(x, y, Budget((0.75,) * 4, (False, True, False, True)), 1e-3, 1)
    after = rt.export_model().state_dict()
    for i in range(4):
        changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"blocks.{i}."))
        assert changed == (i in (1, 3)), f"block {i}"
    assert not torch.equal(before["head.weight"], after["head.weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_that_freezes_the_embeddings_leaves_them_unchanged(backend):
    rt = make(backend)
    (x, y), = data(1)
    top = (False, False, True, True)
    before = copy.deepcopy(rt.export_model().state_dict())
    res = rt.train_step(x, y, Budget((1.0,) * 4, top, train_embeddings=False), 1e-3, 0)
    assert not res.embeddings_trained and res.trained_blocks == (2, 3)
    after = rt.export_model().state_dict()
    stem = [k for k in before if k.startswith(("patch_embed.", "cls_token", "pos_embed"))]
    assert len(stem) == 4 and all(torch.equal(before[k], after[k]) for k in stem)
    assert not torch.equal(before["blocks.3.mlp.fc1.weight"], after["blocks.3.mlp.fc1.weight"])
    with_stem = rt.train_step(x, y, Budget((1.0,) * 4, top), 1e-3, 1)
    assert with_stem.embeddings_trained and with_stem.train_flops > res.train_flops  # the backward goes further
    again = rt.export_model().state_dict()
    assert all(not torch.equal(after[k], again[k]) for k in stem)
    torch_rt = make("torch")
    assert torch_rt.train_step(x, y, Budget((1.0,) * 4, top, train_embeddings=False), 1e-3, 0).train_flops == \
        pytest.approx(res.train_flops, rel=1e-9)


@needs_ort
def test_policy_freeze_embeddings_runs_on_ort_as_on_torch():
    """policy.freeze_embeddings: every step runs on a set with the embeddings frozen; same update and
    counted FLOPs as the torch backend."""
    cfg = {b: build_config({"backend": {"name": b, "device": "cpu"}, "policy": {"freeze_embeddings": True, "token_select": "top"},
                            "train": {"lr": 1e-3, "weight_decay": 0.05, "grad_clip": 1.0}}) for b in ("torch", "ort")}
    model = make_tiny_vit()
    rts = {b: create_runtime(cfg[b], copy.deepcopy(model)) for b in cfg}
    budget = Budget((0.75,) * 4, (False, True, False, True))
    for step, (x, y) in enumerate(data(3)):
        res = {b: rt.train_step(x, y, budget, 1e-3, step) for b, rt in rts.items()}
        assert not res["ort"].embeddings_trained and not res["torch"].embeddings_trained
        assert res["ort"].loss == pytest.approx(res["torch"].loss, rel=1e-3)
        assert res["ort"].train_flops == pytest.approx(res["torch"].train_flops, rel=1e-9)
    assert torch.equal(rts["ort"].export_model().state_dict()["pos_embed"], model.state_dict()["pos_embed"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_and_export_model_agree(backend):
    rt = make(backend, **NO_COUNT)
    for s, (x, y) in enumerate(data(2)):
        rt.train_step(x, y, HALF, 1e-3, s)
    batches = data(2, batch=5, seed=7)
    metrics = rt.evaluate(batches)
    assert metrics["samples"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0
    plain = rt.export_model()
    assert type(plain).__name__ == "VisionTransformer" and not plain.training
    with torch.no_grad():
        logits = torch.cat([plain(x) for x, _ in batches])
    loss = torch.nn.functional.cross_entropy(logits, torch.cat([y for _, y in batches]))
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_resumes_exactly(backend, tmp_path):
    from alast.training import checkpoint as ckpt

    steps = data(4)
    a = make(backend, **NO_COUNT)
    for s, (x, y) in enumerate(steps[:2]):
        a.train_step(x, y, HALF, 1e-3, s)
    path = ckpt.save_checkpoint(tmp_path, 2, {"runtime": a.state_dict()}, keep_last=1)  # the loop's format
    b = make(backend, model=make_tiny_vit(seed=5), **NO_COUNT)
    b.load_state_dict(ckpt.load_checkpoint(path)["runtime"])
    for s, (x, y) in enumerate(steps[2:], start=2):
        la = a.train_step(x, y, Budget((0.75,) * 4, (True, False, True, True)), 1e-3, s).loss
        lb = b.train_step(x, y, Budget((0.75,) * 4, (True, False, True, True)), 1e-3, s).loss
        assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_loss_raises(backend):
    rt = make(backend, **NO_COUNT)
    (x, y), = data(1)
    with pytest.raises(NonFiniteLoss, match="step 3"):
        rt.train_step(x * float("nan"), y, FULL, 1e-3, 3)


# -- parity: same weights, data, budgets and AdamW settings -> same losses -----------------------
def _switching_budgets(n):
    rng = random.Random(0)
    out = []
    for _ in range(n):
        trained = tuple(rng.random() < 0.7 for _ in range(4))
        out.append(Budget(tuple(rng.choice((0.5, 0.75, 1.0)) for _ in range(4)), trained))
    return out


PARITY = {
    "full": [FULL] * 10,
    "tokens": [Budget((0.7,) * 4, (True,) * 4)] * 10,
    "freeze": [Budget((1.0,) * 4, (False, True, True, True))] * 10,
    "alast_like_switching": _switching_budgets(10),
    "dense_final_phase": [HALF] * 5 + [Budget((1.0,) * 4, (False, False, True, True), train_embeddings=False)] * 5,
}


@needs_ort
@pytest.mark.parametrize("case", list(PARITY))
def test_ort_losses_match_torch(case):
    smoothing = 0.1 if case == "tokens" else 0.0
    model = make_tiny_vit()
    rts = {b: make(b, copy.deepcopy(model), label_smoothing=smoothing) for b in ("torch", "ort")}
    losses, flops = {b: [] for b in rts}, {b: [] for b in rts}
    for step, ((x, y), budget) in enumerate(zip(data(10), PARITY[case])):
        lr = 1e-3 * (step + 1) / 10
        for b, rt in rts.items():
            res = rt.train_step(x, y, budget, lr, step)
            losses[b].append(res.loss)
            flops[b].append(res.train_flops)
    rel = [abs(o - t) / abs(t) for t, o in zip(losses["torch"], losses["ort"])]
    assert max(rel) <= 1e-3, (case, losses)
    assert losses["torch"][0] != losses["torch"][-1]  # it trained
    # the same arithmetic: a dropping block computes its kept tokens only, on both runtimes (the ort
    # graph's counts are inputs, so it also scores the tokens of a block that keeps them all: one
    # small product per block, under 0.1% of these steps; whole blocks run before dropping: 19-24%)
    assert flops["ort"] == pytest.approx(flops["torch"], rel=2e-3)


@needs_ort
def test_ort_matches_torch_without_a_class_token():
    """A model read through its pooled patch tokens (global average pooling, a register token):
    the same losses, deltas and kept counts on both runtimes."""
    model = make_tiny_vit(reg_tokens=1, global_pool="avg")
    rts = {b: make(b, copy.deepcopy(model), **NO_COUNT) for b in ("torch", "ort")}
    for step, ((x, y), budget) in enumerate(zip(data(4), _switching_budgets(4))):
        res = {b: rt.train_step(x, y, budget, 1e-3, step) for b, rt in rts.items()}
        assert res["ort"].loss == pytest.approx(res["torch"].loss, rel=1e-3)
        assert res["ort"].deltas == pytest.approx(res["torch"].deltas, rel=1e-3)
        assert res["ort"].kept_tokens == res["torch"].kept_tokens
        assert min(res["torch"].deltas) > 0


@needs_ort
def test_ort_trains_a_vit_with_rms_norm_as_torch_does():
    model = make_tiny_vit(norm_layer="rmsnorm")
    rts = {b: make(b, copy.deepcopy(model), **NO_COUNT) for b in ("torch", "ort")}
    budgets = [Budget((1.0,) * 4, (True,) * 4), Budget((0.5, 0.75, 1.0, 0.5), (False, True, True, True))] * 2
    for step, ((x, y), budget) in enumerate(zip(data(4), budgets)):
        res = {b: rt.train_step(x, y, budget, 1e-3, step) for b, rt in rts.items()}
        assert res["ort"].kept_tokens == res["torch"].kept_tokens
        assert res["ort"].loss == pytest.approx(res["torch"].loss, rel=1e-4)
        assert res["ort"].deltas == pytest.approx(res["torch"].deltas, rel=1e-3)
    group = _symbolics(RMS_NORM)
    assert group is None or group.get(16) is None  # registered only while the exporter ran


@needs_ort
def test_ort_matches_torch_on_twelve_blocks():
    """At 12 blocks the graph's trace keeps every token entering its last blocks (its example counts
    reach 1), where a run's steps drop: nothing in the graph may depend on the traced counts."""
    model = make_tiny_vit(depth=12)
    rts = {b: make(b, copy.deepcopy(model), **NO_COUNT) for b in ("torch", "ort")}
    rng = random.Random(1)
    ratios = [(1.0,) * 11 + (0.5,), (1.0,) * 10 + (0.5, 0.5)]  # the last blocks drop of many tokens
    ratios.append(tuple(rng.choice((0.5, 0.75, 0.9, 1.0)) for _ in range(12)))
    for step, ((x, y), keep) in enumerate(zip(data(3), ratios)):
        budget = Budget(keep, (False,) * 4 + (True,) * 8)
        res = {b: rt.train_step(x, y, budget, 1e-3, step) for b, rt in rts.items()}
        assert res["ort"].kept_tokens == res["torch"].kept_tokens
        assert res["ort"].loss == pytest.approx(res["torch"].loss, rel=1e-4)
        assert res["ort"].deltas == pytest.approx(res["torch"].deltas, rel=1e-3)


@needs_ort
def test_the_training_graph_takes_tokens_by_gather_nd():
    """The kept tokens are one GatherND per take (ORT adds its gradient's rows in a loop; the
    gradient of a Gather on the flattened rows takes a lock for every element), and the rows keep
    their shape (a token's features, or its heads) for the shape inference of the ops after them."""
    import onnx

    from runtimes.ort_backend.graph import export_training_graph

    model = make_tiny_vit()
    graph = onnx.shape_inference.infer_shapes(onnx.load_from_string(
        export_training_graph(model, select=True, label_smoothing=0.0, token_select="sample",
                              token_score="contribution")))
    nodes = list(graph.graph.node)
    takes = [n for n in nodes if n.op_type == "GatherND"]
    assert len(takes) >= len(model.blocks)
    assert not [n for n in nodes if n.op_type == "GatherElements"]
    shapes = {v.name: v.type.tensor_type.shape for v in graph.graph.value_info}
    after = {n.input[0]: n for n in nodes if n.op_type == "Reshape"}
    for take in takes:
        shape = shapes[after[take.output[0]].output[0]]
        assert len(shape.dim) >= 3 and all(d.dim_value > 0 for d in shape.dim[2:])
    # inference graphs keep the plain Gather, which more runtimes support
    from runtimes.onnx_export import export_inference_bytes

    served = onnx.load_from_string(export_inference_bytes(model.eval(), kept=(12, 8, 6, 4)))
    assert not [n for n in served.graph.node if n.op_type == "GatherND"]


@needs_ort
def test_ort_runs_blocks_whole_where_one_cannot_select_inside():
    """A block of another class runs whole, then drops, on both runtimes; the ort graph then runs
    every block so (its schedule is all or none), counted as it runs, to the same losses."""
    from timm.models.vision_transformer import Block

    class OwnBlock(Block):
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs) * 1.0

    model = make_tiny_vit()
    model.blocks[1].__class__ = OwnBlock
    rts = {b: make(b, copy.deepcopy(model)) for b in ("torch", "ort")}
    assert not rts["ort"].graphs["select"].inside
    budget = Budget((0.75,) * 4, (True,) * 4)
    for step, (x, y) in enumerate(data(2)):
        res = {b: rt.train_step(x, y, budget, 1e-3, step) for b, rt in rts.items()}
        assert res["ort"].loss == pytest.approx(res["torch"].loss, rel=1e-4)
        assert res["ort"].train_flops > 1.1 * res["torch"].train_flops  # torch's other three select inside


@needs_ort
@pytest.mark.parametrize("select", ["sample", "random"])
def test_ort_draws_the_tokens_the_eager_graph_draws_from_the_same_noise(select):
    """policy.token_select sample/random on ort: the step's draws come from the runtime's generator
    (seeded by train.seed) as the graph's ``noise`` input; the eager graph fed the same draws gives
    the same loss, other draws not."""
    from runtimes.ort_backend.graph import TrainingGraph
    from runtimes.torch_backend.tokens import tempered

    model = make_tiny_vit()
    ref = TrainingGraph(copy.deepcopy(model), select=True, token_select=select, token_score="contribution").train()
    cfg = build_config({"backend": {"name": "ort", "device": "cpu"}, "train": {"seed": 3},
                        "policy": {"freeze_embeddings": False, "token_select": select, "token_score": "contribution"}})
    rt = create_runtime(cfg, model)
    (x, y), = data(1)
    res = rt.train_step(x, y, HALF, 1e-3, 0)
    # the runtime tempers the draws of 'sample' (policy.token_temperature); the graph takes them as given
    noise = torch.rand(ref.noise_shape(6), generator=torch.Generator().manual_seed(3))
    noise = tempered(noise, cfg.policy.token_temperature if select == "sample" else 1.0)
    keep = torch.tensor(res.kept_tokens)
    with torch.no_grad():
        same, _ = ref(x, y, keep, noise)
        other, _ = ref(x, y, keep, torch.rand(ref.noise_shape(6)))
    assert res.loss == pytest.approx(same.item(), rel=1e-4)
    assert abs(other.item() - same.item()) > 1e-5


# -- ORT specifics -------------------------------------------------------------------------------
@needs_ort
def test_artifact_sets_are_cached_in_memory_and_on_disk(tmp_path):
    rt = make("ort")
    rt.bind_run_dir(tmp_path)
    (x, y), = data(1)
    a, b = Budget((1.0,) * 4, (True, False, True, True)), Budget((1.0,) * 4, (False, True, True, True))
    for s, budget in enumerate([a, b, a, b, HALF]):
        rt.train_step(x, y, budget, 1e-3, s)
    st = rt.artifact_stats
    assert st["generated"] == 3 and st["sessions"] == 3 and st["switches"] == 5
    root = tmp_path / "ort_artifacts"
    assert (root / "dense" / "dense-1011" / "training_model.onnx").exists()
    assert (root / "select" / "select-1101" / "nominal_checkpoint").exists()
    assert not (root / "dense" / "dense-1011" / "checkpoint").exists()  # weights are not duplicated
    assert json.loads((root / "stats.json").read_text())["generated"] == 3
    again = make("ort")
    again.bind_run_dir(tmp_path)
    again.train_step(x, y, a, 1e-3, 0)
    assert again.artifact_stats["generated"] == 0 and again.artifact_stats["loaded_from_disk"] == 1


@needs_ort
@pytest.mark.parametrize("damaged", ["training_model.onnx", "nominal_checkpoint"])
def test_a_damaged_set_on_disk_is_built_again(tmp_path, damaged):
    """A set ONNX Runtime cannot load (truncated by a disk fault or an edit) stopped a resume with
    ONNX Runtime's C++ error; the files are a cache of the graph, so the set is built again."""
    (x, y), = data(1)
    rt = make("ort")
    rt.bind_run_dir(tmp_path)
    first = rt.train_step(x, y, FULL, 1e-3, 0)
    path = next((tmp_path / "ort_artifacts").rglob(damaged))
    path.write_bytes(path.read_bytes()[:500])
    again = make("ort")
    again.bind_run_dir(tmp_path)
    res = again.train_step(x, y, FULL, 1e-3, 0)
    st = again.artifact_stats
    assert st["rebuilt_damaged"] == 1 and st["generated"] == 1 and st["loaded_from_disk"] == 0
    assert res.loss == pytest.approx(first.loss, rel=1e-6)
    assert path.stat().st_size > 500


@needs_ort
def test_changed_graph_regenerates_disk_cache(tmp_path):
    (x, y), = data(1)
    for smoothing, generated in ((0.0, 1), (0.2, 1)):
        rt = make("ort", label_smoothing=smoothing)
        rt.bind_run_dir(tmp_path)
        rt.train_step(x, y, FULL, 1e-3, 0)
        assert rt.artifact_stats["generated"] == generated


@needs_ort
def test_eviction_keeps_weights_and_optimizer_state():
    from runtimes.ort_backend.runtime import OrtRuntime

    model = make_tiny_vit()
    roomy = make("ort", copy.deepcopy(model), **NO_COUNT)
    tight = OrtRuntime(copy.deepcopy(model), device="cpu", max_live_sets=1, freeze_artifacts="exact",
                       token_score=roomy.token_score, **NO_COUNT, **OPT)
    for s, ((x, y), budget) in enumerate(zip(data(6), _switching_budgets(6))):
        assert roomy.train_step(x, y, budget, 1e-3, s).loss == pytest.approx(
            tight.train_step(x, y, budget, 1e-3, s).loss, rel=1e-6)
    assert tight.artifact_stats["evictions"] > 0 and roomy.artifact_stats["evictions"] == 0


@needs_ort
def test_masked_freezing_matches_exact_and_counts_what_ran():
    from runtimes.ort_backend.runtime import OrtRuntime

    model = make_tiny_vit()
    exact = OrtRuntime(copy.deepcopy(model), device="cpu", freeze_artifacts="exact", **OPT)
    masked = OrtRuntime(copy.deepcopy(model), device="cpu", freeze_artifacts="masked", **OPT)
    for s, ((x, y), budget) in enumerate(zip(data(5), _switching_budgets(5))):
        a, b = exact.train_step(x, y, budget, 1e-3, s), masked.train_step(x, y, budget, 1e-3, s)
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert b.train_flops >= a.train_flops  # frozen blocks' weight gradients were computed
    before = masked.export_model().state_dict()
    (x, y), = data(1, seed=9)
    masked.train_step(x, y, Budget((1.0,) * 4, (False, True, True, True)), 1e-3, 5)
    after = masked.export_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    assert masked.artifact_stats["masked_steps"] >= 5 and masked.artifact_stats["generated"] <= 2


@needs_ort
def test_factory_refuses_what_ort_cannot_do(monkeypatch):
    with pytest.raises(ValueError, match="LoRA"):  # the config refuses it, so that `alast plan` does too
        build_config({"backend": {"name": "ort"}, "policy": {"name": "alast+lora"}})
    with pytest.raises(ValueError, match="does not fuse dropped tokens"):
        create_runtime(build_config({"backend": {"name": "ort"}, "policy": {"fuse_tokens": True}}), make_tiny_vit())
    with pytest.raises(ValueError, match="one process"):
        create_runtime(make_cfg("ort"), make_tiny_vit(), comm=object())
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        create_runtime(make_cfg("ort"), torch.nn.Linear(2, 2))
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime.training", None)
    with pytest.raises(ValueError, match="onnxruntime-training"):
        make("ort")


@needs_ort
def test_a_gradient_graph_ort_cannot_run_is_refused_in_one_line(monkeypatch, tmp_path):
    """A set ONNX Runtime generated but cannot load (its shape inference refuses the gradient graph):
    one line with ORT's own reason, without its C++ location; no set left on disk."""
    from runtimes.ort_backend import artifacts
    from runtimes.ort_backend.graph import GraphError

    def refuse(*_args, **_kwargs):
        raise RuntimeError("/onnxruntime_src/orttraining/module.cc:312 onnxruntime::training::api::Module::Module("
                           "const ModelIdentifiers&) [ONNXRuntimeError] : 1 : FAIL : Node (AccumulateGrad_x) Op (Sum) "
                           "[ShapeInferenceError] Incompatible dimensions")

    rt = make("ort")
    rt.bind_run_dir(tmp_path)
    monkeypatch.setattr(artifacts, "TrainingSet", refuse)
    (x, y), = data(1)
    with pytest.raises(GraphError) as err:
        rt.train_step(x, y, FULL, 1e-3, 0)
    assert str(err.value) == ("ONNX Runtime Training cannot run the gradient graph it built for this model (Node "
                              "(AccumulateGrad_x) Op (Sum) [ShapeInferenceError] Incompatible dimensions); use "
                              "--backend torch")
    assert not [d for d in (tmp_path / "ort_artifacts").rglob("*") if d.is_dir() and (d / "training_model.onnx").exists()]

    def fail(*_args, **_kwargs):  # another failure (memory, a device) is not the model's: it stays itself
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory")

    monkeypatch.setattr(artifacts, "TrainingSet", fail)
    with pytest.raises(RuntimeError, match="Failed to allocate memory"):
        rt.train_step(x, y, FULL, 1e-3, 0)


@needs_ort
def test_an_op_without_a_gradient_in_ort_is_refused_in_one_line(monkeypatch):
    """ORT Training without a gradient for an op (a CNN stem's InstanceNormalization, trained with the
    embeddings): one line that names the op, not ORT's C++ location and signature."""
    from onnxruntime.training import artifacts

    from runtimes.ort_backend.graph import GraphError

    def no_gradient(*_args, **_kwargs):
        raise RuntimeError("/onnxruntime_src/orttraining/core/graph/gradient_builder_registry.cc:29 onnxruntime::"
                           "training::GradientDef onnxruntime::training::GetGradientForOp(const Graph*, const "
                           "std::unordered_set<std::string>&) gradient_builder != nullptr was false. The gradient "
                           "builder has not been registered: InstanceNormalization for node /model/norm/Inst\n")

    monkeypatch.setattr(artifacts, "generate_artifacts", no_gradient)
    (x, y), = data(1)
    with pytest.raises(GraphError) as err:
        make("ort").train_step(x, y, FULL, 1e-3, 0)
    assert str(err.value) == ("ONNX Runtime Training cannot build the gradient graph for this model (The gradient "
                              "builder has not been registered: InstanceNormalization for node /model/norm/Inst); use "
                              "--backend torch")


@needs_ort
def test_unexportable_model_is_bad_input(monkeypatch):
    from runtimes.ort_backend.graph import GraphError

    def broken(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", broken)
    rt = make("ort")
    (x, y), = data(1)
    with pytest.raises(GraphError, match="cannot be exported.*use --backend torch"):
        rt.train_step(x, y, FULL, 1e-3, 0)


@needs_ort
def test_cli_train_ort_and_resume_reproduce_losses(tmp_path):
    from alast_cli.main import cli

    out = tmp_path / "run"
    args = ["train", "--backend", "ort", "--steps", "4", "--batch-size", "16", "--out", str(out),
            "--set", "output.checkpoint_every=2", "--set", "output.keep_last=5", "--set", "backend.threads=1",
            "--set", "data.val_fraction=0.05", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["backend"] == "ort" and summary["steps"] == 4
    assert 0 < summary["train_flops"] < summary["full_ft_train_flops"]
    n = summary["parameters"]  # alast trains the top blocks, the embeddings stay frozen
    assert 0 < n["updated"] <= n["trainable"] < n["total"]
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "ort_artifacts" / "stats.json").exists()
    (out / "checkpoints" / "step_00000004.safetensors").unlink()  # as if killed after step 2's checkpoint
    (out / "summary.json").unlink()
    res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    for a, b in zip(first[2:], again[2:]):
        assert a["trained_blocks"] == b["trained_blocks"] and a["kept_tokens"] == b["kept_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@needs_ort
@pytest.mark.parametrize("args,fragment", [
    (["--policy", "alast+lora"], "does not support LoRA"),
    (["--set", "backend.precision=bf16"], "fp32"),
    (["--set", "backend.compile=true"], "set backend.compile=false"),
    (["--set", "backend.sync_free=on"], "set backend.sync_free=auto"),
    (["--unexportable"], "cannot be exported for ONNX Runtime Training"),
])
def test_cli_ort_bad_input_exits_2(tmp_path, monkeypatch, args, fragment):
    from alast_cli.main import cli

    if args == ["--unexportable"]:
        def broken(*a, **k):
            raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 16 is not supported")

        monkeypatch.setattr(torch.onnx, "export", broken)
        args = []
    res = CliRunner().invoke(cli, ["train", "--backend", "ort", "--steps", "2", "--batch-size", "16",
                                   "--out", str(tmp_path / "r"), *args])
    one_error_line(res, 2, fragment)


@needs_ort
@pytest.mark.parametrize("pool", ["token", "map"])  # map: attention pooling over the last block's tokens
def test_per_block_flop_counts_add_up_to_the_whole_graph(pool):
    from planners import kept_token_counts
    from runtimes.ort_backend.graph import StepFlops, TrainingGraph, count_step_flops

    model = make_tiny_vit(global_pool=pool)
    counter = StepFlops(TrainingGraph(model, 0.0, select=True))
    blocks = [[f"model.blocks.{i}.{n}" for n, _ in b.named_parameters()] for i, b in enumerate(model.blocks)]
    stem = {f"model.{n}" for n, _ in model.named_parameters() if n.startswith(("patch_embed.", "cls_", "pos_", "reg_"))}
    for ratios, trained, embeddings in [((1.0,) * 4, (True,) * 4, True),
                                        ((0.5, 0.75, 1.0, 0.5), (False, True, True, False), True),
                                        ((1.0,) * 4, (False, False, True, True), False),
                                        ((0.5, 0.75, 1.0, 0.5), (False, True, False, True), False)]:
        tokens_in, kept = kept_token_counts(ratios, 16, 1)
        names = {f"model.{n}" for n, _ in model.named_parameters()} - {
            n for names_l, t in zip(blocks, trained) if not t for n in names_l} - (set() if embeddings else stem)
        for select in (False, True):
            if not select and ratios[0] < 1.0:
                continue
            whole = count_step_flops(TrainingGraph(model, 0.0, select=select), 6, kept if select else None, names)
            assert counter.step(6, tokens_in, kept, trained, select, embeddings) == pytest.approx(whole, rel=1e-12)


@needs_ort
# map slow: its head's counts add up to the whole graph above; solving is shared with the class token's
@pytest.mark.parametrize("pool", ["token", pytest.param("map", marks=pytest.mark.slow)])
def test_solved_block_counts_equal_fresh_counts(pool):
    """Under moving budgets the ORT runtime's per-block counts (on fake tensors) are shared by
    blocks built alike and solved for shapes never counted (planners.countfit): each step's total
    equals counting every new shape's, with far fewer blocks counted."""
    import random

    from timm.models.vision_transformer import VisionTransformer

    from planners import kept_token_counts
    from runtimes.ort_backend.graph import StepFlops, TrainingGraph

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, mlp_ratio=2.0,
                              num_classes=5, global_pool=pool)  # 64 patch tokens
    graph = TrainingGraph(model, 0.0, select=True)
    solving, every = StepFlops(graph), StepFlops(graph)
    every._blocks.split = every._heads.split = lambda key: (key, ())  # each shape its own kind: never solved
    counted = []
    real = solving._count_block
    solving._count_block = lambda *a: counted.append(a) or real(*a)
    rng = random.Random(0)
    for _ in range(16):
        tokens_in, kept = kept_token_counts(tuple(rng.uniform(0.6, 1.0) for _ in range(6)), 64, 1)
        trained = tuple(rng.random() < 0.6 for _ in range(6))
        embeddings = rng.random() < 0.5
        assert solving.step(6, tokens_in, kept, trained, True, embeddings) == every.step(
            6, tokens_in, kept, trained, True, embeddings)
    assert len(counted) < 0.4 * len(every._blocks.exact)
