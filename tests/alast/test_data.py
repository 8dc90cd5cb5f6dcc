import struct

import numpy as np
import pytest
import torch

from alast.data import DataError, StepBatchSampler, build_data
from alast.training.build import model_data_config

CFG = model_data_config("alast_demo_vit")


def _write_idx(path, array):
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_from_local_files(tmp_path):
    """torchvision:MNIST reads a local copy in MNIST's own idx format (no download)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    bundle = build_data("torchvision:MNIST", CFG, data_dir=tmp_path)
    assert len(bundle.train) == 30 and len(bundle.val) == 12 and len(bundle.classes) == 10
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def test_torchvision_without_split_argument_is_split_by_fraction(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.png")
    bundle = build_data("torchvision:ImageFolder", CFG, data_dir=tmp_path, val_fraction=0.2)
    assert len(bundle.train) == 8 and len(bundle.val) == 2 and bundle.classes == ["a", "b"]


def test_missing_torchvision_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        build_data("torchvision:MNIST", CFG, data_dir=tmp_path)


def test_batches_are_a_function_of_seed_step_and_rank():
    a = StepBatchSampler(100, 8, seed=3, start_step=0, total_steps=30)
    b = StepBatchSampler(100, 8, seed=3, start_step=20, total_steps=30)
    assert list(a)[20:] == list(b)
    r0 = StepBatchSampler(100, 8, 3, 0, 5, rank=0, world_size=2)
    r1 = StepBatchSampler(100, 8, 3, 0, 5, rank=1, world_size=2)
    for s in range(5):
        assert sorted(r0.indices(s) + r1.indices(s)) == sorted(a.indices(s))


def test_digits_split_is_stratified():
    bundle = build_data("digits", CFG, val_fraction=0.2, seed=0)
    labels = torch.tensor([bundle.val[i][1] for i in range(len(bundle.val))])
    assert len(bundle.train) + len(bundle.val) == 1797
    assert labels.bincount().min() >= 30
