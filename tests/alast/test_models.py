from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alast import models
from alast.models import DEMO_WEIGHTS, ModelError, create_model
from tests.conftest import SMALL_VAL


def test_timm_model_loads_a_local_checkpoint_and_gets_a_new_head(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", img_size=32)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = create_model("vit_tiny_patch16_224", 3, checkpoint=path, img_size=32)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 3


def test_a_checkpoint_directory_of_the_hubs_layout_starts_a_run_from_its_safetensors(tmp_path):
    """``--checkpoint`` a Hugging Face hub snapshot (``model.safetensors`` beside ``pytorch_model.bin``
    and ``config.json``): the run loads the safetensors file and records it, not the directory."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from alast.config import load_run_config
    from alast_cli.main import cli

    torch.manual_seed(0)
    src = create_model("alast_demo_vit", 10, pretrained=False)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    save_file(src.state_dict(), str(snap / "model.safetensors"))
    torch.save({k: torch.zeros_like(v) for k, v in src.state_dict().items()}, snap / "pytorch_model.bin")
    (snap / "config.json").write_text("{}")
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--checkpoint", str(snap), "--steps", "1", "--batch-size", "4",
                                   "--set", 'backend.count_flops="off"', "--set", "backend.threads=1",
                                   *SMALL_VAL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"checkpoint {snap} is a directory: loading model.safetensors from it" in res.output
    assert load_run_config(out / "config.yaml").model.checkpoint == snap / "model.safetensors"
    trained = load_file(str(out / "final_model.safetensors"))  # block 0 stays frozen: the weights it started from
    assert torch.equal(trained["blocks.0.attn.qkv.weight"], src.blocks[0].attn.qkv.weight)  # not the .bin's zeros


def test_a_checkpoint_directory_names_what_it_cannot_choose(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(ModelError, match="no weights file in it"):
        models.weights_in_directory(d)
    (d / "a.pth").write_bytes(b"")
    assert models.weights_in_directory(d) == d / "a.pth"
    (d / "b.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"several weights files \(a.pth, b.bin\); pass the one to load"):
        models.weights_in_directory(d)
    (d / "c.safetensors").write_bytes(b"")  # the one safetensors among other formats
    assert models.weights_in_directory(d) == d / "c.safetensors"
    (d / "e.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="several weights files"):
        models.weights_in_directory(d)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "alast_demo_vit"])
def test_a_checkpoints_head_of_the_runs_shape_is_kept(tmp_path, name):
    """A checkpoint of this very task (same classes) keeps its head, for timm models as for alast's
    own; timm dropped it whenever the class count differed from its pretrained config's 1000."""
    torch.manual_seed(0)
    src = create_model(name, 3, img_size=32, pretrained=False)
    torch.nn.init.normal_(src.head.weight)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    assert torch.equal(create_model(name, 3, checkpoint=path, img_size=32).head.weight, src.head.weight)
    assert create_model(name, 5, checkpoint=path, img_size=32).head.out_features == 5  # another task: a new head


def test_demo_model_uses_the_shipped_backbone_unless_told_not_to():
    from safetensors.torch import load_file

    shipped = load_file(str(DEMO_WEIGHTS))
    assert not any(k.startswith("head.") for k in shipped)
    pre = create_model("alast_demo_vit", 10)
    assert torch.equal(pre.blocks[3].mlp.fc1.weight, shipped["blocks.3.mlp.fc1.weight"])
    scratch = create_model("alast_demo_vit", 10, pretrained=False)
    assert not torch.equal(scratch.blocks[3].mlp.fc1.weight, shipped["blocks.3.mlp.fc1.weight"])


def test_vit12_uses_its_shipped_fdsl_backbone_and_the_record_describes_it():
    import json

    from safetensors.torch import load_file

    from alast.models import VIT12_ARCH, VIT12_WEIGHTS

    shipped = load_file(str(VIT12_WEIGHTS))
    assert not any(k.startswith("head.") for k in shipped) and shipped["pos_embed"].shape == (1, 197, 128)
    pre = create_model("alast_vit12", 10)
    assert torch.equal(pre.blocks[11].attn.qkv.weight, shipped["blocks.11.attn.qkv.weight"].float())
    record = json.loads(VIT12_WEIGHTS.with_suffix(".json").read_text())
    assert record["arch"] == VIT12_ARCH and record["model"] == "alast_vit12"
    assert record["evals"][-1]["held_out_accuracy"] == record["held_out_accuracy"] and record["steps"] > 0


@pytest.mark.parametrize("content,fragment", [(None, "checkpoint not found"), (b"not a checkpoint", "cannot read checkpoint")])
def test_bad_checkpoints_are_refused(tmp_path, content, fragment):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=fragment):
        create_model("vit_tiny_patch16_224", 3, checkpoint=path, img_size=32)


def test_unknown_model_suggests_names():
    with pytest.raises(ModelError, match="unknown model 'vit_tiny_patch99'"):
        create_model("vit_tiny_patch99", 3)


def test_vit12_has_the_papers_depth_and_token_count_and_refuses_missing_weights(tmp_path, monkeypatch):
    from alast.models import SHIPPED_MODELS, VIT12_MODEL
    from alast.training.build import model_data_config

    model = create_model(VIT12_MODEL, 10, pretrained=False)
    assert len(model.blocks) == 12 and model.patch_embed.num_patches == 196
    assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 10)
    cfg = model_data_config(VIT12_MODEL)
    assert cfg["input_size"] == (3, 112, 112) and cfg["mean"] == (0.5, 0.5, 0.5)

    spec = SHIPPED_MODELS[VIT12_MODEL]
    monkeypatch.setitem(SHIPPED_MODELS, VIT12_MODEL, replace(spec, weights=tmp_path / "absent.safetensors"))
    for pretrained in (True, None):  # explicit, and the default for alast's own models
        with pytest.raises(ModelError) as info:
            create_model(VIT12_MODEL, 10, pretrained=pretrained)
        message = str(info.value)
        assert "weights missing" in message and "--no-pretrained" in message and "\n" not in message


def test_unreachable_pretrained_weights_name_the_local_remedies(monkeypatch):
    import timm

    real = timm.create_model

    def offline(*args, pretrained=False, **kwargs):  # only a download needs the hub
        if not pretrained:
            return real(*args, **kwargs)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(models, "_reachable", lambda host, port: True)  # the hub answers, the download fails
    with pytest.raises(ModelError) as info:
        create_model("vit_tiny_patch16_224", 3, pretrained=True)
    message = str(info.value)
    assert "couldn't connect" in message and "--checkpoint PATH" in message and "--no-pretrained" in message
    assert "\n" not in message


def _hub_cache(root, model):
    """A Hugging Face cache holding ``model``'s weights as timm's default tag of vit_tiny_patch16_224."""
    from safetensors.torch import save_file

    repo = root / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")


@pytest.mark.parametrize("cached", [True, False])
def test_an_unreachable_hub_uses_the_local_cache_at_once(tmp_path, monkeypatch, cached):
    """Offline, huggingface_hub retried each file for about 50 s before it used its cache or failed."""
    import huggingface_hub.constants
    import timm

    for name in models.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    probes = []
    monkeypatch.setattr(models, "_reachable", lambda host, port: probes.append(host) and False)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    if cached:
        _hub_cache(tmp_path, reference)
        model = create_model("vit_tiny_patch16_224", 3, pretrained=True)
        assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
        assert model.head.out_features == 3
    else:
        with pytest.raises(ModelError) as info:
            create_model("vit_tiny_patch16_224", 3, pretrained=True)
        message = str(info.value)
        assert "huggingface.co cannot be reached and the weights are not in the local cache" in message
        assert "--no-pretrained" in message and "\n" not in message
    assert probes == ["huggingface.co"]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # only while the weights load


def test_the_hub_is_not_probed_through_a_proxy_or_for_local_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_reachable", lambda host, port: pytest.fail("probed the hub"))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert models._hub_host() is None
    monkeypatch.delenv("HTTPS_PROXY")
    with models._hub_access(download=False) as offline:  # a --checkpoint or --no-pretrained: no download
        assert offline is None


def test_a_checkpoint_of_another_model_names_the_first_mismatch(tmp_path):
    import timm

    path = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict(), path)
    with pytest.raises(ModelError) as info:
        create_model("deit_small_patch16_224", 3, checkpoint=path, img_size=32)
    message = str(info.value)
    assert "cls_token is (1, 1, 192) there, (1, 1, 384) here" in message and "--model" in message and "\n" not in message


@pytest.mark.parametrize("name,size", [("alast_demo_vit", 48), ("alast_vit12", 64)])
def test_shipped_backbones_load_at_another_input_size_with_a_resampled_position_grid(name, size):
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    from alast.models import SHIPPED_MODELS

    shipped = load_file(str(SHIPPED_MODELS[name].weights))
    model = create_model(name, 4, img_size=size)
    grid = model.patch_embed.grid_size
    assert model.pos_embed.shape[1] == 1 + grid[0] * grid[1] != shipped["pos_embed"].shape[1]
    expected = resample_abs_pos_embed(shipped["pos_embed"].float(), new_size=list(grid), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected.to(model.pos_embed.dtype))
    assert torch.equal(model.pos_embed[0, 0], shipped["pos_embed"][0, 0].float())  # the class token's row is kept
    assert torch.equal(model.blocks[2].attn.qkv.weight, shipped["blocks.2.attn.qkv.weight"].float())
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 4)


def test_the_first_line_says_where_the_weights_come_from():
    from alast.models import initial_weights

    assert initial_weights("alast_demo_vit", None, None) == "the shipped pre-trained backbone"
    assert initial_weights("alast_vit12", False, None).startswith("random initialisation")
    assert initial_weights("deit_small_patch16_224", True, None) == "timm's pretrained weights"
    assert "--pretrained or --checkpoint" in initial_weights("deit_small_patch16_224", None, None)
    assert initial_weights("deit_small_patch16_224", None, Path("/w.pth")) == "weights from /w.pth"


@pytest.mark.parametrize("img_size", [None, 32])
def test_a_model_that_is_no_vit_is_refused_before_it_is_built(img_size):
    from runtimes.torch_backend.patch import PatchError

    with pytest.raises(PatchError, match="^ResNet is not a timm VisionTransformer, Eva or Beit; ALaST supports timm "
                                         "ViT/DeiT"):
        create_model("resnet18", 3, pretrained=True, img_size=img_size)  # refused before any download


@pytest.mark.parametrize("size", [[], ["--img-size", "32"]], ids=["own size", "img-size"])
def test_cli_refuses_a_model_that_is_no_vit_in_one_line_with_or_without_img_size(tmp_path, size):
    from click.testing import CliRunner

    from alast_cli.main import cli
    from tests.cli_errors import one_error_line

    res = CliRunner().invoke(cli, ["train", "--model", "resnet18", "--no-pretrained", *size, "--steps", "1",
                                   "--batch-size", "4", "--set", "backend.threads=1", "--out", str(tmp_path / "r")])
    one_error_line(res, 2, "ResNet is not a timm VisionTransformer")


def test_an_unknown_models_suggestions_leave_out_models_alast_refuses():
    with pytest.raises(ModelError) as err:
        create_model("vit_relpos_small_patch16_22", 3)  # close to vit_relpos_small_patch16_224: refused
    similar = str(err.value).partition("(similar: ")[2].partition(")")[0]
    assert similar and "relpos" not in similar
    with pytest.raises(ModelError, match=r"similar: eva02_tiny_patch14_224"):  # an Eva, which alast drives
        create_model("eva02_tiny_patch14_22", 3)
    with pytest.raises(ModelError, match=r"similar: vit_tiny_patch16_224"):
        create_model("vit_tinyy_patch16_224", 3)


def _tiny_state(classes: int = 10) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(7)
    return {k: v.contiguous() for k, v in
            timm.create_model("vit_tiny_patch16_224", num_classes=classes, img_size=32).state_dict().items()}


@pytest.mark.parametrize("layout", ["lightning", "ddp", "model_state", "timm_train", "compiled"])
def test_a_timm_models_checkpoint_in_a_wrapper_loads_every_weight(tmp_path, layout):
    """timm loaded these layouts without strictness once the class count differed from its pretrained
    config's: nothing was placed (Lightning, model_state), or the head was lost (DDP), and the run
    trained from random weights with exit 0; timm train.py's checkpoint was refused as incomplete."""
    import argparse

    state = _tiny_state()
    wrapped = {"lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}},
               "ddp": {f"module.{k}": v for k, v in state.items()},
               "model_state": {"model_state": state, "optimizer": {"lr": torch.tensor(1.0)}},
               "timm_train": {"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 3},
               "compiled": {f"_orig_mod.{k}": v for k, v in state.items()}}[layout]
    path = tmp_path / "w.pth"
    torch.save(wrapped, path)
    model = create_model("vit_tiny_patch16_224", 10, checkpoint=path, img_size=32)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_timm_models_checkpoint_missing_weights_is_refused(tmp_path):
    """Missing blocks were left at random, without a word, whenever the head was retrained."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v for k, v in _tiny_state().items() if not k.startswith("blocks.11.")}, path)
    with pytest.raises(ModelError, match=r"does not fit the model \(missing \['blocks.11.norm1.weight'"):
        create_model("vit_tiny_patch16_224", 10, checkpoint=path, img_size=32)


def test_a_new_head_is_named(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    state = _tiny_state(1000)
    save_file(state, path)
    model = create_model("vit_tiny_patch16_224", 10, checkpoint=path, img_size=32)
    assert "note: the checkpoint's classifier head has 1000 outputs, this run's 10 classes: a new head is trained" \
        in capsys.readouterr().err
    assert torch.equal(model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])


def test_a_run_records_where_its_weights_started_and_refuses_two_sources(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from alast_cli.main import cli

    path = tmp_path / "w.safetensors"
    save_file(_tiny_state(), path)
    base = ["train", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--steps", "1", "--batch-size", "4",
            "--set", "backend.threads=1", "--set", "backend.count_flops=off", "--checkpoint", str(path)]
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["initial_weights"] == f"weights from {path}"
    res = CliRunner().invoke(cli, [*base, "--pretrained", "--out", str(tmp_path / "two")])  # --pretrained lost
    assert res.exit_code == 2 and "model.pretrained=true and model.checkpoint both name the starting weights" \
        in res.stderr


def _small_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=3)


@pytest.mark.parametrize("ema_key", models.EMA_KEYS)
def test_a_checkpoints_ema_weights_load_with_checkpoint_ema_and_are_named_without(tmp_path, capsys, ema_key):
    """timm train.py's checkpoint holds state_dict_ema beside state_dict; the EMA weights were ignored
    without a word. They load on request (unprefixed and checked as the trained ones), and otherwise a
    note says the trained ones are used and how to load the others."""
    torch.manual_seed(0)
    trained, ema = _small_vit().state_dict(), _small_vit().state_dict()
    assert not torch.equal(trained["blocks.1.mlp.fc1.weight"], ema["blocks.1.mlp.fc1.weight"])
    path = tmp_path / "w.pth"
    torch.save({"state_dict": trained, ema_key: {f"module.{k}": v for k, v in ema.items()}, "epoch": 3}, path)
    for use_ema, expected in ((True, ema), (False, trained)):
        model = _small_vit()
        models.load_weights(model, path, timm_filter=True, ema=use_ema)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        notes = [line for line in capsys.readouterr().err.splitlines() if "EMA" in line]
        assert notes == ([] if use_ema else [
            (f"note: checkpoint {path} also holds EMA weights ({ema_key}): its non-EMA weights are loaded; "
             "--set model.checkpoint_ema=true loads the EMA ones")])


def test_checkpoint_ema_of_a_file_without_ema_weights_is_refused_naming_what_it_holds(tmp_path):
    from safetensors.torch import save_file

    state = _small_vit().state_dict()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state, "epoch": 3, "model_ema": None}, path)
    with pytest.raises(ModelError, match=rf"^checkpoint {path} holds no EMA weights \(none of state_dict_ema, "
                       r"state_dict_ema_v2, model_ema; it holds keys state_dict, epoch, model_ema\); drop "
                       r"model.checkpoint_ema to load its weights$"):
        models.load_weights(_small_vit(), path, timm_filter=True, ema=True)
    bare = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, bare)
    with pytest.raises(ModelError, match=rf"it holds a bare state dict of {len(state)} tensors\)"):
        create_model("vit_tiny_patch16_224", 3, checkpoint=bare, img_size=32, checkpoint_ema=True)


def test_a_run_from_ema_weights_records_them_resumes_without_the_file_and_needs_a_checkpoint(tmp_path):
    """summary.json's initial_weights says the EMA weights were used; a resume whose --checkpoint file is
    gone builds from the run's checkpoint as before; checkpoint_ema alone is refused in one line."""
    import json

    from click.testing import CliRunner

    from alast_cli.main import cli
    from tests.cli_errors import one_error_line

    trained, ema = _tiny_state(), _tiny_state()
    ema = {k: v + 1 for k, v in ema.items()}
    path = tmp_path / "w.pth"
    torch.save({"state_dict": trained, "state_dict_ema": ema}, path)
    base = ["train", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--steps", "1", "--batch-size", "4",
            "--set", "backend.threads=1", "--set", "backend.count_flops=off"]
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, [*base, "--checkpoint", str(path), "--set", "model.checkpoint_ema=true",
                                   "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["initial_weights"] == f"weights from {path} (EMA)"
    (run / "summary.json").unlink()  # as if stopped in its final evaluation
    path.unlink()
    res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["initial_weights"] == f"weights from {path} (EMA)"
    res = CliRunner().invoke(cli, [*base, "--set", "model.checkpoint_ema=true", "--out", str(tmp_path / "none")])
    one_error_line(res, 2, "'model.checkpoint_ema'", "no checkpoint is given", "--checkpoint FILE")
