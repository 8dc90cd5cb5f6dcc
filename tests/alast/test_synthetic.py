"""The synthetic data families (alast/data/synthetic.py) and the demo-backbone pre-training script."""
from __future__ import annotations

import json

import pytest
import torch

from alast.data import synthetic
from alast.data.synthetic import SyntheticDataset, class_names, generate_batch, num_classes
from tests.conftest import load_script

FAMILIES = ("pretrain", "shapes")


def _gen(family, n, seed):
    return generate_batch(family, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_shapes_dtypes_ranges(family):
    x, y = _gen(family, 37, 0)
    assert x.shape == (37, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (37,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and torch.isfinite(x).all()
    assert y.min() >= 0 and y.max() < num_classes(family)
    assert x.std(dim=(1, 2, 3)).min() > 0.01  # no blank images


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_and_seed_dependent(family):
    a, la = _gen(family, 24, 3)
    b, lb = _gen(family, 24, 3)
    c, lc = _gen(family, 24, 4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_class_appears(family):
    k = num_classes(family)
    _, y = _gen(family, 3 * k + 5, 1)
    counts = torch.bincount(y, minlength=k)
    assert (counts >= 3).all()  # labels are balanced within a batch


def test_class_tables():
    assert num_classes("pretrain") == len(class_names("pretrain")) == 46
    assert num_classes("shapes") == len(class_names("shapes")) == 25
    for family in FAMILIES:
        assert len(set(class_names(family))) == num_classes(family)
    assert not set(class_names("pretrain")) & set(class_names("shapes"))


def test_unknown_family():
    for call in (lambda: num_classes("digits"), lambda: class_names("digits"),
                 lambda: _gen("digits", 2, 0), lambda: SyntheticDataset("digits", 2, 0)):
        with pytest.raises(ValueError, match="pretrain.*shapes"):
            call()


def test_dataset_deterministic_across_chunks(monkeypatch):
    monkeypatch.setattr(synthetic, "_CHUNK", 16)
    a = SyntheticDataset("shapes", 40, seed=7)
    b = SyntheticDataset("shapes", 40, seed=7)
    assert len(a) == 40 and a.classes == class_names("shapes")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    img, label = a[5]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and isinstance(label, int)
    assert 0 <= float(img.min()) and float(img.max()) <= 1
    assert not torch.equal(SyntheticDataset("shapes", 40, seed=8).images, a.images)


def test_dataset_with_transform():
    from torchvision import transforms

    seen = []

    def tf(pil):
        seen.append(pil)
        return transforms.functional.to_tensor(pil)

    ds = SyntheticDataset("pretrain", 6, seed=0, transform=tf)
    img, label = ds[2]
    assert seen[0].mode == "RGB" and seen[0].size == (32, 32)
    assert isinstance(img, torch.Tensor) and img.shape == (3, 32, 32)
    plain = SyntheticDataset("pretrain", 6, seed=0)[2][0]
    assert torch.allclose(img, plain) and 0 <= label < num_classes("pretrain")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation():
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = generate_batch("pretrain", 64, g, device="cuda")
    assert x.is_cuda and y.is_cuda and x.shape == (64, 3, 32, 32)


def test_pretrain_script_smoke(tmp_path):
    module = load_script("examples", "pretrain_demo_backbone")
    out = tmp_path / "demo.safetensors"
    record = module.main(["--device", "cpu", "--steps", "3", "--batch-size", "4", "--gen-batches", "2",
                          "--eval-size", "8", "--log-every", "1", "--out", str(out)])
    from safetensors.torch import load_file

    state = load_file(str(out))
    assert state and not any(k.startswith("head.") for k in state)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["steps"] == 3 and saved["batch_size"] == 4 and saved["family"] == "pretrain"
    assert 0 <= saved["held_out_accuracy"] <= 1 and saved == json.loads(json.dumps(record))

    from alast.models import build_demo_model, load_weights

    model = build_demo_model(num_classes("shapes"), pretrained=False)
    load_weights(model, out, skip_head=True)  # the saved backbone fits the demo model
