"""Formula-driven fractal images (alast/data/formula.py) and the 12-block backbone pre-trained on them."""
import json

import pytest
import torch
import torch.nn.functional as F

from alast.data import formula as Fm
from tests.conftest import load_script


def test_images_are_a_function_of_class_and_seed_only():
    labels, seeds = torch.tensor([3, 1, 3, 0]), torch.tensor([7, 7, 8, 123])
    a = Fm.generate_batch(10, labels, seeds)
    assert a.shape == (4, 3, 112, 112) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and float(a.std()) > 0.05
    assert torch.equal(a, Fm.generate_batch(10, labels, seeds))  # same seeds, same images
    alone = Fm.generate_batch(10, labels[2:3], seeds[2:3])
    assert torch.allclose(alone[0], a[2], atol=1e-5)  # not a function of the rest of the batch
    wider = Fm.generate_batch(50, labels, seeds)  # class c is the same system in a larger table
    assert torch.allclose(wider, a, atol=1e-5)
    diff = lambda i, j: float((a[i] - a[j]).abs().mean())  # noqa: E731
    assert diff(0, 1) > 0.02 and diff(0, 2) > 0.005  # another class / another instance differ


def test_class_table_is_valid_and_prefix_stable():
    params, n_maps = Fm.class_table(20)
    assert params.shape == (20, Fm.MAX_MAPS, 6) and bool(((n_maps >= 2) & (n_maps <= Fm.MAX_MAPS)).all())
    assert float(Fm._sigma_max(params).max()) <= 0.95 + 1e-5  # contractive: the chaos game converges
    small_p, small_n = Fm.class_table(5)
    assert torch.equal(small_p, params[:5]) and torch.equal(small_n, n_maps[:5])
    assert not torch.equal(Fm.class_table(5, class_seed=1)[0], small_p)


def test_counter_hash_uniforms_look_uniform():
    u = Fm._uniforms(torch.arange(2000), 8)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u, Fm._uniforms(torch.arange(2000), 8))


def test_classes_are_separable_by_a_nearest_centroid_probe():
    """Instances of one class share a shape: a pixel-space probe (flip- and polarity-invariant
    features) beats chance (0.2) by far on 5 classes, 12 training and 12 test images each."""
    c, n = 5, 12
    labels = torch.arange(c).repeat(2 * n)
    x = Fm.generate_batch(c, labels, torch.arange(2 * n * c), size=48)
    grey = x.mean(1, keepdim=True)
    ink = (grey - grey.flatten(1).median(1).values.view(-1, 1, 1, 1)).abs()
    ink = ink + ink.flip(-1) + ink.flip(-2) + ink.flip(-1).flip(-2)
    f = F.normalize(F.adaptive_avg_pool2d(ink, 12).flatten(1), dim=1)
    train, test = slice(0, n * c), slice(n * c, None)
    centroids = torch.stack([f[train][labels[train] == k].mean(0) for k in range(c)])
    accuracy = float(((f[test] @ centroids.T).argmax(1) == labels[test]).float().mean())
    assert accuracy > 0.45


def test_training_draws_and_held_out_set_never_overlap():
    g = torch.Generator().manual_seed(0)
    x, y = Fm.sample_batch(7, 6, g, size=32)
    assert x.shape == (6, 3, 32, 32) and y.dtype == torch.long and bool(((y >= 0) & (y < 7)).all())
    x2, y2 = Fm.sample_batch(7, 6, torch.Generator().manual_seed(0), size=32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    labels, seeds = Fm.held_out_labels_seeds(7, 21)
    assert int(seeds.min()) >= Fm.EVAL_SEED_BASE and torch.equal(labels.bincount(), torch.full((7,), 3))


def test_dataset_matches_held_out_batch_and_takes_a_transform():
    ds = Fm.FormulaDataset(num_classes=4, count=6, size=32)
    xs, ys = Fm.held_out_batch(4, 6, size=32)
    img, label = ds[5]
    assert len(ds) == 6 and label == int(ys[5]) and torch.allclose(img, xs[5], atol=1e-5)
    from torchvision import transforms

    ds_t = Fm.FormulaDataset(num_classes=4, count=6, size=32, transform=transforms.ToTensor())
    assert (ds_t[5][0] - xs[5]).abs().max() <= 1 / 255 + 1e-6  # uint8 round trip


@pytest.mark.parametrize("call,fragment", [
    (lambda: Fm.generate_batch(3, torch.tensor([3]), torch.tensor([0])), "labels must lie in [0, 3)"),
    (lambda: Fm.generate_batch(3, torch.tensor([0, 1]), torch.tensor([0])), "equal length"),
    (lambda: Fm.generate_batch(3, torch.tensor([0]), torch.tensor([0]), size=4), "image size"),
    (lambda: Fm.class_table(0), "num_classes must be"),
])
def test_bad_arguments_are_one_line_errors(call, fragment):
    with pytest.raises(Fm.FormulaError) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.gpu
def test_cuda_generation_matches_cpu():
    labels, seeds = torch.arange(8), torch.arange(8) + 5
    cpu = Fm.generate_batch(8, labels, seeds)
    gpu = Fm.generate_batch(8, labels, seeds, device="cuda")
    assert gpu.is_cuda and float((gpu.cpu() - cpu).abs().mean()) < 0.01


def _script():
    return load_script("examples", "pretrain_vit12_backbone")


def test_pretrain_script_smoke_writes_loadable_fp16_weights_and_record(tmp_path):
    module = _script()
    out = tmp_path / "vit12.safetensors"
    record = module.main(["--smoke", "--out", str(out)])
    from safetensors.torch import load_file

    state = load_file(str(out))
    assert state and not any(k.startswith("head.") for k in state)
    assert {v.dtype for v in state.values()} == {torch.float16}
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["steps"] == 3 and saved["num_classes"] == 10
    assert saved["arch"]["depth"] == 12 and 0 <= saved["held_out_accuracy"] <= 1 and saved["evals"]
    assert saved["data_images_per_s"] > 0 and saved["command"].endswith(f"--smoke --out {out}")

    from alast.models import create_model

    model = create_model("alast_vit12", 3, checkpoint=out)  # the saved backbone fits alast_vit12
    assert torch.equal(model.blocks[11].mlp.fc1.weight, state["blocks.11.mlp.fc1.weight"].float())


def test_lr_schedule_warms_up_then_decays_to_zero():
    module = _script()
    f = module.lr_factor
    assert f(0.025, 0.05) == pytest.approx(0.5) and f(0.05, 0.05) == pytest.approx(1.0)
    assert f(0.525, 0.05) == pytest.approx(0.5) and f(1.0, 0.05) == pytest.approx(0.0, abs=1e-12)


def test_low_resolution_pretraining_ends_at_full_size_and_saves_alast_vit12_weights(tmp_path, monkeypatch):
    module = _script()
    seen = []
    sample = module.sample_batch
    monkeypatch.setattr(module, "sample_batch", lambda *a, **k: seen.append(a[3]) or sample(*a, **k))
    out = tmp_path / "vit12.safetensors"
    record = module.main(["--smoke", "--img-size", "16", "--full-res-frac", "0.5", "--out", str(out)])
    train_sizes = seen[3:]  # after generation_rate's warm-up batch and two timed batches
    assert train_sizes == [16, 16, Fm.DEFAULT_SIZE]  # 3 steps: progress 0 and 1/3, then 2/3 >= 1 - 0.5
    assert record["pretrain_img_size"] == 16 and record["full_res_frac"] == 0.5

    from alast.models import create_model

    model = create_model("alast_vit12", 3, checkpoint=out)  # a 14x14 position grid, whatever the size seen
    assert model.pos_embed.shape[1] == 1 + 14 * 14 and not model.dynamic_img_size


@pytest.mark.parametrize("argv", [["--img-size", "60"], ["--img-size", "128"], ["--full-res-frac", "1.5"]])
def test_pretrain_script_refuses_bad_sizes(argv):
    with pytest.raises(SystemExit):
        _script().parse_args(["--smoke", *argv])
