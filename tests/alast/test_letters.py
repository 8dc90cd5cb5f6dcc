"""The letters task (alast/data/letters.py): classes, determinism, held-out fonts, the CLI end to end."""
from __future__ import annotations

import pickle
import string

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alast.data import DataError, build_data, letters
from alast.data.letters import LETTERS, LettersDataset
from alast.training.build import model_data_config

CFG = model_data_config("alast_demo_vit")
SMALL = {"train": (letters.TRAIN_FONTS, 104, 1), "val": (letters.VAL_FONTS, 52, 2)}


def _keep(img):
    return img


@pytest.fixture(scope="module")
def full():
    """The real splits, built once: 6000 training and 1500 validation images."""
    return build_data("letters", CFG)


@pytest.fixture
def small(monkeypatch):
    """Shrink the splits so that builds and CLI runs take a fraction of a second."""
    monkeypatch.setattr(letters, "SPLITS", SMALL)


def test_classes_sizes_and_samples(full):
    assert full.classes == list(string.ascii_uppercase) == list(LETTERS)
    assert (len(full.train), len(full.val)) == (6000, 1500)
    for split in (full.train, full.val):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
        assert np.bincount(split.targets, minlength=26).min() >= len(split) // 26 - 1  # balanced
    x, y = full.val[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == full.val.targets[7]


def test_validation_fonts_are_never_seen_in_training(full):
    train, val = full.train, full.val
    assert not set(letters.TRAIN_FONTS) & set(letters.VAL_FONTS)
    used_train = {train.fonts[i] for i in np.unique(train.font_of)}
    used_val = {val.fonts[i] for i in np.unique(val.font_of)}
    assert used_train == set(letters.TRAIN_FONTS) and used_val == set(letters.VAL_FONTS)
    assert not used_train & used_val


def test_images_are_not_blank_and_classes_differ(full):
    for split in (full.train, full.val):
        grey = split.images.astype(np.float32).mean(-1) / 255
        assert grey.std(axis=(1, 2)).min() > 0.02
    grey = full.train.images.astype(np.float32).mean(-1) / 255
    ink = np.abs(grey - np.median(grey, axis=(1, 2), keepdims=True))  # polarity-free: light or dark strokes
    area = (ink > 0.5 * ink.max(axis=(1, 2), keepdims=True)).mean(axis=(1, 2))
    labels = np.asarray(full.train.targets)
    mean_area = {c: area[labels == LETTERS.index(c)].mean() for c in "IHMWB"}
    assert mean_area["I"] < 0.8 * min(mean_area[c] for c in "HMWB"), mean_area


def test_builds_are_deterministic(full):
    again = LettersDataset("val", _keep)
    assert np.array_equal(again.images, full.val.images) and again.targets == full.val.targets
    assert np.array_equal(again.font_of, full.val.font_of)
    other = LettersDataset("val", _keep, size=64, seed=99)
    assert not np.array_equal(other.images, full.val.images[:64])


def test_missing_fonts_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(letters, "font_dir", lambda: tmp_path)
    with pytest.raises(DataError, match="only 0 of the 16 train fonts") as exc:
        build_data("letters", CFG)
    assert str(tmp_path) in str(exc.value) and "reinstall matplotlib" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_fonts_without_real_capitals_are_rejected():
    ttf = letters.font_dir()
    assert letters._render_font(ttf / "DejaVuSans.ttf") is not None
    assert letters._render_font(ttf / "LastResortHE-Regular.ttf") is None  # one box for every letter
    assert letters._render_font(ttf / "STIXSizOneSymReg.ttf") is None  # no A-Z at all
    assert letters._render_font(ttf / "no-such-font.ttf") is None


def test_augment_replaces_only_the_training_transform(small):
    plain = build_data("letters", CFG)
    aug = build_data("letters", CFG, augment=True)
    assert aug.train.transform is not aug.val.transform
    assert torch.equal(aug.val[3][0], plain.val[3][0])
    assert np.array_equal(aug.train.images, plain.train.images)
    clone = pickle.loads(pickle.dumps(plain.val))  # DataLoader workers get a pickled copy
    assert torch.equal(clone[5][0], plain.val[5][0])


def test_plan_knows_the_class_count_without_building():
    from alast.config import build_config
    from alast.planning.plan import num_classes_for

    assert num_classes_for(build_config({"data": {"spec": "letters"}})) == (26, "letters")


def test_cli_trains_on_letters(small, tmp_path):
    from alast_cli.main import cli

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--data", "letters", "--steps", "2", "--batch-size", "8",
                                   "--set", "backend.threads=1", "--set", "backend.count_flops=off",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "104 train / 52 val images, 26 classes" in res.output
    assert (out / "summary.json").exists()
