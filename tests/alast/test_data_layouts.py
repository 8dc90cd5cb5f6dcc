"""Image-folder layouts: split folders and their names, links, file names, empty and unreadable
classes, and what `alast eval --data` scores."""
import os
import unicodedata
from pathlib import Path

import pytest
import torch

from alast.data import DataError, build_data
from alast.training.build import model_data_config

CFG = model_data_config("alast_demo_vit")


def _images(root, names, size=(20, 12)):
    """Tiny PNGs at ``root/name`` (``name`` without extension: .png; with one: that format)."""
    from PIL import Image

    for i, name in enumerate(names):
        path = root / (name if Path(name).suffix else f"{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (i * 37 % 256, 0, 0)).save(path, format="JPEG" if path.suffix in (".jfif", ".jpe")
                                                         else None)
    return root


def _split_layout(root, train, val, classes="ab", n_train=3, n_val=2):
    return _images(root, [f"{train}/{c}/{i}" for c in classes for i in range(n_train)]
                   + [f"{val}/{c}/{i}" for c in classes for i in range(n_val)])


# --- split folders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("train,val", [("training", "validation"), ("Training", "Testing"), ("seg_train", "seg_test"),
                                       ("train", "eval"), ("train", "dev"), ("TRN", "Valid"),
                                       ("Training Set", "Test Set")])
def test_split_folder_synonyms_are_splits_not_classes(tmp_path, train, val):
    root = _split_layout(tmp_path, train, val)
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["a", "b"] and (len(bundle.train), len(bundle.val)) == (6, 4)
    assert {Path(f).parent.parent.name for f, _ in bundle.val.samples} == {val}


def test_validation_folder_is_used_before_the_test_folder(tmp_path):
    root = _split_layout(tmp_path, "train", "valid", n_val=1)
    _images(root, [f"Testing/{c}/{i}" for c in "ab" for i in range(3)])
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert len(bundle.val) == 2 and any("Testing" in n and "validation reads valid" in n for n in bundle.notes)


@pytest.mark.parametrize("names", [("part1", "part2"), ("fold0", "fold1", "fold2"), ("train", "holdout")])
def test_split_folders_of_unknown_names_are_refused(tmp_path, names):
    """Read as classes they would train a model to tell the splits apart."""
    root = _images(tmp_path, [f"{s}/{c}/{i}" for s in names for c in ("cat", "dog", "owl") for i in range(2)])
    with pytest.raises(DataError, match=r"look like splits .*point imagefolder: at the training folder, or rename "
                                        r"them train and val$"):
        build_data(f"imagefolder:{root}", CFG)
    assert build_data(f"imagefolder:{root / names[0]}", CFG, val_fraction=0.5).classes == ["cat", "dog", "owl"]


@pytest.mark.parametrize("files", [
    ["a/x/0", "a/x/1", "a/y/z/0", "a/y/z/1", "b/x/0", "b/x/1", "b/y/z/0", "b/y/z/1"],  # images deeper
    ["a/indoor/0", "a/indoor/1", "a/outdoor/0", "b/night/0", "b/night/1", "b/day/0"],  # names per class
    ["a/imgs/0", "a/imgs/1", "b/imgs/0", "b/imgs/1"],  # one folder each
    ["bus/0", "bus/1", "car/0", "car/1", "train/0", "train/1"],  # a class named like a split
    ["bus/0", "bus/1", "train/x/0", "train/x/1"],
])
def test_nested_and_split_named_classes_still_work(tmp_path, files):
    root = _images(tmp_path, files)
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.5)
    assert bundle.classes == sorted({f.split("/")[0] for f in files})
    assert len(bundle.train) + len(bundle.val) == len(files)


def test_unlabeled_test_folder_beside_train_is_left_out_with_a_note(tmp_path, capsys):
    """Kaggle's layout: train/<class>/ and test/ of unlabeled images."""
    root = _images(tmp_path, [f"train/{c}/{i}" for c in "ab" for i in range(4)] + [f"test/{i}" for i in range(5)])
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25)
    assert bundle.classes == ["a", "b"] and (len(bundle.train), len(bundle.val)) == (6, 2)
    assert bundle.notes == [f"not using {root / 'test'}: it holds no class folders (unlabeled?)"]
    assert f"note: not using {root / 'test'}" in capsys.readouterr().err


@pytest.mark.parametrize("names", [("train", "test"), ("Training", "Validation")])
def test_classes_named_like_splits_are_refused_in_one_line(tmp_path, names):
    root = _images(tmp_path, [f"{s}/{i}" for s in names for i in range(3)])
    with pytest.raises(DataError) as err:
        build_data(f"imagefolder:{root}", CFG)
    msg = str(err.value)
    assert "\n" not in msg and "named like split folders but without class folders" in msg
    assert "train/<class>/<image>" in msg


def test_validation_folder_without_training_folder_is_named(tmp_path):
    root = _images(tmp_path, [f"val/{c}/0" for c in "ab"])
    with pytest.raises(DataError, match=r"has val/ but no training folder"):
        build_data(f"imagefolder:{root}", CFG)


# --- links, names, file kinds --------------------------------------------------------------------
def test_linked_folders_inside_a_class_are_followed_and_loops_are_not(tmp_path):
    src = _images(tmp_path / "src", [f"{c}/{i}" for c in "ab" for i in range(3)])
    root = tmp_path / "data"
    for c in "ab":
        (root / c).mkdir(parents=True)
        os.symlink(src / c, root / c / "imgs")  # torchvision's ImageFolder follows it (os.walk followlinks)
    os.symlink(root / "a", root / "a" / "imgs" / "loop")  # a link back up: never walked into
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.34)
    assert bundle.classes == ["a", "b"] and len(bundle.train) + len(bundle.val) == 6
    assert any("not following 1 link(s)" in n for n in bundle.notes)


def test_jpeg_aliases_are_read_and_other_files_are_counted(tmp_path):
    root = _images(tmp_path, ["a/0.jfif", "a/1.jpe", "a/2", "b/0.jfif", "b/1", "b/2"])
    for junk in ("a/Thumbs.db", "a/desktop.ini", "a/.DS_Store", "b/x.heic", "b/y.heic", "a/labels.txt"):
        (root / junk).write_bytes(b"x")
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.34)
    assert len(bundle.train) + len(bundle.val) == 6
    assert bundle.notes == [f"left out 3 files in {root} that are not images alast reads (2 .heic, 1 .txt)"]


def test_class_names_match_across_unicode_forms(tmp_path):
    """macOS may write café as NFD (e + combining accent), another tool as NFC."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    root = _images(tmp_path, [f"train/{nfc}/{i}" for i in range(2)] + [f"train/b/{i}" for i in range(2)]
                   + [f"val/{nfd}/0", "val/b/0"])
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["b", nfc] and sorted(t for _, t in bundle.val.samples) == [0, 1]


# --- empty and unreadable classes ----------------------------------------------------------------
def test_class_whose_images_are_all_skipped_is_refused(tmp_path):
    root = _images(tmp_path, [f"{c}/{i}" for c in "abc" for i in range(2)])
    for i in range(2):
        (root / "c" / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^class 'c' in .* has no readable image \(all 2 skipped as unreadable\)"):
        build_data(f"imagefolder:{root}", CFG, skip_bad_images=True)


def test_empty_class_folder_in_the_validation_split_is_accepted(tmp_path):
    root = _split_layout(tmp_path, "train", "val", classes="abc")
    for f in (root / "val" / "c").iterdir():
        f.unlink()
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["a", "b", "c"] and len(bundle.val) == 4
    (root / "train" / "c" / "0.png").unlink()
    (root / "train" / "c" / "1.png").unlink()
    (root / "train" / "c" / "2.png").unlink()
    with pytest.raises(DataError, match=r"class folder 'c' holds no image in .*train"):
        build_data(f"imagefolder:{root}", CFG)


# --- torchvision:ImageFolder and --data-dir ------------------------------------------------------
def test_torchvision_image_folder_gets_the_image_folder_checks(tmp_path):
    root = _images(tmp_path, [f"{c}/{i}" for c in "ab" for i in range(3)] + [".ipynb_checkpoints/0"])
    bundle = build_data("torchvision:ImageFolder", CFG, data_dir=root, val_fraction=0.34)
    assert bundle.classes == ["a", "b"]
    (root / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt or non-image file"):
        build_data("torchvision:ImageFolder", CFG, data_dir=root)


def test_data_dir_with_an_image_folder_is_refused(tmp_path):
    root = _images(tmp_path, [f"{c}/{i}" for c in "ab" for i in range(3)])
    with pytest.raises(DataError, match=r"^--data-dir \(data.data_dir\) applies to torchvision:NAME only"):
        build_data(f"imagefolder:{root}", CFG, data_dir=tmp_path / "nowhere")


# --- alast eval --data ---------------------------------------------------------------------------
def _run(tmp_path, classes=("blue", "green", "red")):
    """A LoadedRun of a tiny untrained model over ``classes``, as `alast eval RUN` loads one."""
    from alast.config import build_config
    from alast.export import LoadedRun
    from tests.conftest import make_tiny_vit

    train = _images(tmp_path / "trained", [f"{c}/{i}" for c in classes for i in range(5)])
    cfg = build_config({"data": {"spec": f"imagefolder:{train}"}})
    summary = {"classes": list(classes), "num_classes": len(classes), "data_config": CFG}
    return LoadedRun(tmp_path, cfg, summary, make_tiny_vit(num_classes=len(classes)).eval())


def test_eval_of_a_flat_folder_scores_every_image(tmp_path):
    from alast.export import evaluate_model, run_val_data

    run = _run(tmp_path)
    test = _images(tmp_path / "test", [f"{c}/{i}" for c in ("blue", "green", "red") for i in range(4)])
    assert evaluate_model(run, None, f"imagefolder:{test}")["samples"] == 12
    assert len(run_val_data(run)) == 3  # the run's own data: its validation split (20%), never its training images
    assert len(run_val_data(run, f"imagefolder:{tmp_path / 'trained'}/")) == 3
    split = _split_layout(tmp_path / "split", "train", "val", classes=("green", "red"))
    assert len(run_val_data(run, f"imagefolder:{split}")) == 4  # a split layout: its validation split


def test_eval_on_some_of_the_runs_classes_is_scored_on_its_labels(tmp_path):
    from alast.export import evaluate_model, run_val_data

    run = _run(tmp_path)
    one = _images(tmp_path / "one", [f"red/{i}" for i in range(3)])
    val = run_val_data(run, f"imagefolder:{one}")
    assert [val[i][1] for i in range(len(val))] == [2, 2, 2]
    assert evaluate_model(run, None, f"imagefolder:{one}")["samples"] == 3
    _images(one, ["yellow/0"])
    with pytest.raises(DataError, match=r"not trained on \(yellow\)"):
        run_val_data(run, f"imagefolder:{one}")


def test_eval_of_a_torchvision_run_on_an_image_folder_drops_the_runs_data_dir(tmp_path):
    from alast.export import run_val_data

    run = _run(tmp_path)
    run.config.data.spec, run.config.data.data_dir = "torchvision:CIFAR10", tmp_path / "cifar"
    test = _images(tmp_path / "test", [f"green/{i}" for i in range(2)])
    assert len(run_val_data(run, f"imagefolder:{test}")) == 2
    assert isinstance(run_val_data(run, f"imagefolder:{test}")[0][0], torch.Tensor)
