"""policy.freeze_embeddings: no gradient reaches the embeddings, the backward stops at the lowest
trained block, and the planner predicts exactly what the runtime counts."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from alast_cli.main import cli
from planners import Budget
from runtimes.torch_backend.params import embedding_parameters
from runtimes.torch_backend.runtime import TorchRuntime
from tests.conftest import make_tiny_vit

TRAIN = ["train", "--steps", "6", "--batch-size", "16", "--set", "backend.threads=1",
         "--set", "policy.freeze_embeddings=true", "--set", "policy.token_select=top",  # no draws: backends comparable
         "--set", "data.val_fraction=0.05"]


def _step_flops(freeze: bool, trained: tuple[bool, ...], batch) -> tuple[float, TorchRuntime]:
    rt = TorchRuntime(make_tiny_vit(), lr=1e-3, weight_decay=0.0, grad_clip=None, freeze_embeddings=freeze)
    result = rt.train_step(*batch, Budget((1.0,) * 4, trained), 1e-3, 0)
    return result.train_flops, rt


def test_frozen_embeddings_get_no_gradient_and_skip_the_backward_below(batch):
    top_only = (False, False, False, True)
    frozen, rt = _step_flops(True, top_only, batch)
    trainable, _ = _step_flops(False, top_only, batch)
    assert all(p.grad is None and not p.requires_grad for p in embedding_parameters(rt.timm_model))
    assert frozen < 0.8 * trainable  # blocks 0-2 run no backward at all
    all_blocks, _ = _step_flops(True, (True,) * 4, batch)
    all_blocks_trainable_embed, _ = _step_flops(False, (True,) * 4, batch)
    # only the embedding's own backward and block 0's input gradient go
    assert 0.9 * all_blocks_trainable_embed < all_blocks < all_blocks_trainable_embed
    assert rt.full_ft_step_flops(6) == pytest.approx(_step_flops(False, (True,) * 4, batch)[1].full_ft_step_flops(6))


def test_planner_replays_a_frozen_embedding_run_exactly(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, [*TRAIN, "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["plan", "--trace", str(run), "--json"])
    assert res.exit_code == 0, res.output
    trace = json.loads(res.output.strip().splitlines()[-1])["trace"]
    assert abs(trace["train_flops_rel_error"]) < 0.01


def test_target_holds_with_frozen_embeddings(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, [*TRAIN, "--target-flops", "0.4", "--out", str(run)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops_ratio_vs_full"] == pytest.approx(0.4, rel=0.03)


def test_ort_trains_with_frozen_embeddings_as_torch_counts_it(tmp_path):
    pytest.importorskip("onnxruntime.training.api")
    runs = {}
    for backend in ("torch", "ort"):
        run = tmp_path / backend
        res = CliRunner().invoke(cli, [*TRAIN, "--backend", backend, "--out", str(run)])
        assert res.exit_code == 0, res.output
        runs[backend] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["embeddings_trained"] is False for r in runs["ort"])
    t, o = runs["torch"][0], runs["ort"][0]  # the same first budget (later ones follow each run's deltas)
    assert o["kept_tokens"] == t["kept_tokens"] and o["kept_tokens"] != o["tokens_in"]
    # both compute a dropping block's kept tokens only (ort's graph also scores the blocks that keep all)
    assert o["train_flops"] == pytest.approx(t["train_flops"], rel=2e-3)
    assert o["loss"] == pytest.approx(t["loss"], rel=1e-3)
    for backend in ("torch", "ort"):  # each counted as its plan predicts
        res = CliRunner().invoke(cli, ["plan", "--trace", str(tmp_path / backend), "--json"])
        assert res.exit_code == 0, res.output
        assert abs(json.loads(res.output.strip().splitlines()[-1])["trace"]["train_flops_rel_error"]) < 1e-3


def test_embedding_parameters_cover_what_feeds_block_0():
    vit = make_tiny_vit(reg_tokens=2)
    names = {n for n, p in vit.named_parameters() if any(p is q for q in embedding_parameters(vit))}
    assert names == {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "reg_token", "pos_embed"}
    assert torch.is_tensor(vit.pos_embed)


def _stem_variant(kind: str):
    """A tiny DeiT with a distillation token, or a tiny ViT with a pre-norm (as CLIP models have)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0,
          "num_classes": 5, "qkv_bias": True}
    torch.manual_seed(0)
    return VisionTransformerDistilled(**kw) if kind == "distilled" else VisionTransformer(**kw, pre_norm=True)


@pytest.mark.parametrize("kind, stem", [
    ("distilled", {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "dist_token", "pos_embed"}),
    ("pre_norm", {"patch_embed.proj.weight", "cls_token", "pos_embed", "norm_pre.weight", "norm_pre.bias"}),
])
def test_every_parameter_before_block_0_is_frozen_and_the_plan_counts_the_step(kind, stem, batch):
    """A stem parameter left trainable would send the backward through every block, so a run would
    miss its FLOPs target; the cost model and the runtimes share one definition of the stem."""
    from alast.planning.profile import profile_model
    from planners.simulate import StepShape, step_cost

    vit = _stem_variant(kind)
    names = {n for n, p in vit.named_parameters() if any(p is q for q in embedding_parameters(vit))}
    assert names == stem
    cm = profile_model(_stem_variant(kind), kind, img_size=32)
    rt = TorchRuntime(_stem_variant(kind), lr=1e-3, weight_decay=0.0, grad_clip=None, freeze_embeddings=True)
    top = (False, False, False, True)
    res = rt.train_step(*batch, Budget((1.0,) * 4, top), 1e-3, 0)
    predicted = step_cost(cm, StepShape((16,) * 4, (16,) * 4, top, embed_trained=False), batch[0].shape[0])
    assert res.train_flops == pytest.approx(predicted.train_flops, rel=1e-6)
