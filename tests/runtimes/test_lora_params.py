"""LoRA under the torch runtime: which layers get adapters (policy.lora.targets, inside the blocks
only), which heads train in full (every classifier), and the one-line refusals of bad targets."""
import pytest
import torch
from click.testing import CliRunner

from planners import Budget
from runtimes.torch_backend.params import apply_lora
from runtimes.torch_backend.runtime import TorchRuntime
from tests.conftest import make_tiny_vit

LORA = {"rank": 2, "alpha": 4.0, "dropout": 0.0}


def _adapted(model) -> set[str]:
    """The layers that carry LoRA adapters, by their name in the timm model."""
    return {n.removeprefix("base_model.model.").split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}


def test_distilled_deit_trains_both_heads_and_exports_them():
    """DeiT's logits average ``head`` and ``head_dist``, both made anew for the task's classes:
    under LoRA both must train (``head_dist`` was frozen at its random init), and the exported,
    merged model must give the trained model's logits."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, num_classes=5)
    rt = TorchRuntime(model, lr=1e-2, weight_decay=0.05, grad_clip=None, device="cpu",
                      lora={**LORA, "targets": ["qkv"]})
    trainable = {n for n, p in rt.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert {n.split(".")[2] for n in trainable} == {"head", "head_dist"}
    before = rt.timm_model.head_dist.modules_to_save["default"].weight.detach().clone()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    rt.train_step(x, y, Budget((1.0,) * rt.num_blocks, (True,) * rt.num_blocks), 1e-2, 0)
    assert not torch.equal(rt.timm_model.head_dist.modules_to_save["default"].weight, before)
    plain = rt.export_model()
    assert not any("lora" in n or "modules_to_save" in n for n in plain.state_dict())
    rt.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), rt.model(x), atol=1e-5)


def test_targets_adapt_only_layers_inside_the_blocks():
    """``proj``, ``fc1`` and ``fc2`` also name the patch embedding's convolution and a SigLIP-style
    pooling head's layers (``attn_pool``); only the blocks' layers get adapters. Merged, the model
    gives the adapted model's logits."""
    model = make_tiny_vit(global_pool="map", depth=2)
    assert {"patch_embed.proj", "attn_pool.proj", "attn_pool.mlp.fc1"} <= {n for n, _ in model.named_modules()}
    wrapped = apply_lora(model, **LORA, targets=["proj", "fc1", "fc2"])
    assert _adapted(wrapped) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc1", "mlp.fc2")}
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()  # peft starts B at zero: make the adapters change the output
        x = torch.randn(2, 3, 32, 32)
        wrapped.eval()
        adapted = wrapped(x)
        assert torch.allclose(wrapped.merge_and_unload()(x), adapted, atol=1e-5)
    assert _adapted(apply_lora(make_tiny_vit(), **LORA, targets=["attn.qkv"])) == {f"blocks.{i}.attn.qkv"
                                                                                   for i in range(4)}


@pytest.mark.parametrize("targets, fragments", [
    ([], ["policy.lora.targets is empty"]),
    (["attn"], ["'attn' is a module of type Attention, not a Linear layer"]),
    (["norm1"], ["'norm1' is a module of type LayerNorm"]),
    (["head"], ["'head' is the classifier, which trains in full"]),
    (["attn_pool"], ["'attn_pool' is not inside a block"]),
    (["nope"], ["no layer 'nope' in the blocks"]),
])
def test_bad_targets_are_refused_naming_the_setting_and_the_blocks_linear_layers(targets, fragments):
    with pytest.raises(ValueError) as err:
        apply_lora(make_tiny_vit(global_pool="map"), **LORA, targets=targets)
    message = str(err.value)
    assert "\n" not in message and message.startswith("policy.lora.targets")
    assert all(f in message for f in fragments) and "[qkv, proj, fc1, fc2]" in message, message


@pytest.mark.parametrize("targets, line", [
    ("[attn]", ("policy.lora.targets: 'attn' is a module of type Attention, not a Linear layer; name Linear layers "
                "inside the blocks, e.g. [qkv, proj, fc1, fc2]")),
    ("[]", ("invalid value for 'policy.lora.targets': is empty, so LoRA would adapt nothing; name Linear layers "
            "inside the blocks, e.g. [qkv] or [qkv, proj, fc1, fc2] (got [])")),
])
def test_train_refuses_bad_targets_in_one_line_naming_the_setting(tmp_path, targets, line):
    """peft's own messages were cut to their first line: ``Target module Attention(`` for ``attn``,
    and for ``[]`` one that names peft's ``target_modules``, not ``policy.lora.targets``."""
    from alast_cli.main import cli

    res = CliRunner().invoke(cli, ["train", "--policy", "lora", "--steps", "2", "--batch-size", "4", "--set",
                                   "backend.threads=1", "--set", f"policy.lora.targets={targets}",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [f"error: {line}"]
    assert not (tmp_path / "r").exists()
