import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from alast.data import DataError, StepBatchSampler, build_data, eval_batches, train_batches
from alast.data.datasets import auto_eval_batch_size
from alast.training.build import model_data_config
from alast_cli.errors import first_line

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


def test_a_failed_download_says_what_to_do_and_leaves_no_empty_folder(tmp_path, fake_torchvision):
    import urllib.error

    class Offline(_FakeSet):
        def __init__(self, root, split="train", transform=None, download=False):
            Path(root, "offline", "raw").mkdir(parents=True)  # as torchvision makes its folders first
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    fake_torchvision("Offline", Offline)
    root = tmp_path / "new"
    with pytest.raises(DataError, match=r"could not download torchvision:Offline \(<urlopen error .*Name or service.*"
                                        r"put its files under .*new .*run without data.download"):
        build_data("torchvision:Offline", CFG, data_dir=root, download=True)
    assert not root.exists()  # the failed download created it, and left no file in it
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(DataError, match="could not download"):
        build_data("torchvision:Offline", CFG, data_dir=kept, download=True)
    assert kept.is_dir()  # the user's folder stays


def _image_folder(root, files):
    from PIL import Image

    for rel, mode in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "text":
            path.write_text("not an image")
        else:
            Image.new(mode, (20, 12)).save(path)
    return root


def test_image_folder_reads_every_pillow_mode_and_gif(tmp_path):
    root = _image_folder(tmp_path, {"a/0.png": "RGBA", "a/1.gif": "P", "a/2.jpg": "L", "a/3.BMP": "RGB",
                                    "b/0.png": "LA", "b/1.gif": "RGB", "b/2.tif": "I;16", "b/3.webp": "RGB"})
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25)
    assert len(bundle.train) == 6 and len(bundle.val) == 2
    for i in range(6):
        x, _ = bundle.train[i]
        assert x.shape == (3, 32, 32)


@pytest.mark.parametrize("files,needles", [
    ({"a/0.png": "RGB", "a/1.png": "RGB", "b/notes.txt": "text"}, ["class folder 'b' (only .txt files)"]),
    ({"a/0.png": "RGB", "a/1.png": "RGB", "b/.keep": "text", "c/x.svg": "text"},
     ["class folders 'b', 'c' (only .svg files) hold no image"]),
])
def test_image_folder_names_the_class_folders_without_images(tmp_path, files, needles):
    root = _image_folder(tmp_path, files)
    with pytest.raises(DataError) as err:
        build_data(f"imagefolder:{root}", CFG)
    for needle in needles:
        assert needle in str(err.value)


def test_image_folder_ignores_hidden_folders_and_files(tmp_path):
    # Jupyter's .ipynb_checkpoints (empty, or holding copies) and macOS's ._x.jpg are not data
    root = _image_folder(tmp_path, {"a/0.png": "RGB", "a/1.png": "RGB", "b/0.png": "RGB", "b/1.png": "RGB",
                                    ".ipynb_checkpoints/0.png": "RGB", "a/._2.png": "text",
                                    "b/.ipynb_checkpoints/3.png": "RGB"})
    (root / ".empty").mkdir()
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.5)
    assert bundle.classes == ["a", "b"] and bundle.skipped_files == 0
    files = sorted(Path(f).relative_to(root).as_posix() for f, _ in bundle.train.dataset.samples)
    assert files == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "test"])
def test_image_folder_in_splits_reads_each_validation_name(tmp_path, val_name):
    root = _image_folder(tmp_path, {"train/a/0.png": "RGB", "train/b/0.png": "RGB", "train/b/1.png": "RGB",
                                    f"{val_name}/a/0.png": "RGB", f"{val_name}/b/0.png": "RGB"})
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["a", "b"] and (len(bundle.train), len(bundle.val)) == (3, 2)


def test_image_folder_with_train_alone_splits_it(tmp_path):
    # the split folder is never a class: PATH/train alone is split by data.val_fraction
    root = _image_folder(tmp_path, {f"train/{c}/{i}.png": "RGB" for c in "ab" for i in range(4)})
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25)
    assert bundle.classes == ["a", "b"] and (len(bundle.train), len(bundle.val)) == (6, 2)


def _loop_up(tmp_path):
    """root/a/up -> .. (relative): a link in a class folder back to the data folder."""
    root = _image_folder(tmp_path / "data", {f"{c}/{i}.png": "RGB" for c in "ab" for i in range(3)})
    os.symlink("..", root / "a" / "up")
    return root, root, root / "a" / "up"


def _loop_through_links(tmp_path):
    """links/{a,b} -> real/{a,b}, and real/a/loop -> links: read as imagefolder:links, class a's folder
    holds a link to the data folder (links) through which class b's images would come."""
    real = _image_folder(tmp_path / "real", {f"{c}/{i}.png": "RGB" for c in "ab" for i in range(3)})
    links = tmp_path / "links"
    links.mkdir()
    for c in "ab":
        os.symlink(real / c, links / c)
    os.symlink(links, real / "a" / "loop")
    return links, links, links / "a" / "loop"


def _loop_above_root(tmp_path):
    """root/b/top -> the folder holding the data folder: above it, so it would walk every class."""
    root = _image_folder(tmp_path / "data", {f"{c}/{i}.png": "RGB" for c in "ab" for i in range(3)})
    os.symlink(tmp_path, root / "b" / "top")
    return root, root, root / "b" / "top"


def _loop_to_train(tmp_path):
    """A split layout: train/a/sub/back -> ../.. (train itself, a folder above the class folder)."""
    root = _image_folder(tmp_path / "data", {f"{s}/{c}/{i}.png": "RGB" for s in ("train", "val") for c in "ab"
                                             for i in range(3 if s == "train" else 1)})
    (root / "train" / "a" / "sub").mkdir()
    os.symlink("../..", root / "train" / "a" / "sub" / "back")
    return root, root / "train", root / "train" / "a" / "sub" / "back"


def _class_linked_to_root(tmp_path):
    """root/self -> . : a class folder that is the data folder would hold every other class's images."""
    root = _image_folder(tmp_path / "data", {f"{c}/{i}.png": "RGB" for c in "ab" for i in range(3)})
    os.symlink(".", root / "self")
    return root, root, root / "self"


def _class_linked_above_split(tmp_path):
    """A split layout: train/up -> .. (the data folder, above train/)."""
    root = _image_folder(tmp_path / "data", {f"{s}/{c}/{i}.png": "RGB" for s in ("train", "val") for c in "ab"
                                             for i in range(3 if s == "train" else 1)})
    os.symlink("..", root / "train" / "up")
    return root, root / "train", root / "train" / "up"


@pytest.mark.parametrize("layout", [_loop_up, _loop_through_links, _loop_above_root, _loop_to_train,
                                    _class_linked_to_root, _class_linked_above_split])
def test_a_link_up_the_tree_is_not_followed_and_no_image_changes_class(tmp_path, layout):
    # followed one level, a link to the data folder (or above) filed every other class's images
    # under the class holding the link
    root, classes_in, link = layout(tmp_path)
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.34)
    train = getattr(bundle.train, "dataset", bundle.train)  # the folder split, or train/ of split folders
    assert bundle.classes == ["a", "b"] and len(train.samples) == 6
    for path, label in train.samples:  # each image under its own class, read through the link or not
        assert Path(path).relative_to(classes_in).parts[0] == bundle.classes[label]
    assert f"not following 1 link(s) in {classes_in} back to a folder they sit in ({link})" in bundle.notes


def test_the_files_split_by_val_fraction_are_fingerprinted(tmp_path):
    files = {f"{c}/{i}.png": "RGB" for c in "ab" for i in range(4)}
    root = _image_folder(tmp_path / "data", files)
    first = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25).fingerprint
    assert first["files"] == 8 and first["folder"] == str(root) and len(first["sha256"]) == 64
    assert build_data(f"imagefolder:{root}", CFG, val_fraction=0.5).fingerprint == first  # not the contents
    (root / "a" / "3.png").rename(root / "a" / "9.png")
    assert build_data(f"imagefolder:{root}", CFG, val_fraction=0.25).fingerprint["sha256"] != first["sha256"]
    splits = _image_folder(tmp_path / "splits", {f"{s}/{f}": m for s in ("train", "val") for f, m in files.items()})
    assert build_data(f"imagefolder:{splits}", CFG).fingerprint is None  # its own split: files do not move


def test_the_contents_are_fingerprinted_apart_from_the_names(tmp_path):
    """The split depends on the names (``sha256``); whether a folder holds the run's images, on the
    contents too (``contents``): sizes, and the bytes of the sampled files."""
    from PIL import Image

    root = _image_folder(tmp_path / "data", {f"{c}/{i}.png": "RGB" for c in "ab" for i in range(4)})
    first = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25).fingerprint
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b" / "2.png")
    now = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25).fingerprint
    assert now["sha256"] == first["sha256"] and now["contents"] != first["contents"]


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_a_high_val_fraction_leaves_every_class_a_training_image(fraction):
    """``max(1, round(n * f))`` held out all of a class's images once f * n rounded to n: the run trained
    without the class and validated on it."""
    from alast.data.common import _split_indices

    labels = [0] * 10 + [1] * 13 + [2] * 2 + [3]
    train, val = _split_indices(labels, fraction, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert {labels[i] for i in train} == {0, 1, 2, 3}  # every class trains
    assert {labels[i] for i in val} == {0, 1, 2}  # every class of two or more is validated
    assert len([i for i in train if labels[i] == 0]) == max(1, 10 - round(10 * fraction))


def test_validation_folder_may_lack_a_class_but_not_add_one(tmp_path):
    root = _image_folder(tmp_path, {"train/a/0.png": "RGB", "train/b/0.png": "RGB", "train/c/0.png": "RGB",
                                    "val/b/0.png": "RGB", "val/c/0.png": "RGB"})
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["a", "b", "c"]
    assert sorted(bundle.val[i][1] for i in range(2)) == [1, 2]  # train's label indices, not val's own
    _image_folder(tmp_path, {"val/d/0.png": "RGB"})
    with pytest.raises(DataError, match=r"class folders that .*train lacks \('d'\)"):
        build_data(f"imagefolder:{root}", CFG)


def test_image_folder_without_validation_images_is_refused(tmp_path):
    root = _image_folder(tmp_path, {"a/0.png": "RGB", "b/0.png": "RGB"})
    with pytest.raises(DataError, match="leaves no validation images"):
        build_data(f"imagefolder:{root}", CFG)


@pytest.mark.parametrize("split_names", [("train", "Val"), ("Train", "Validation"), ("TRAIN", "TEST")])
def test_split_folder_names_match_in_any_case(tmp_path, split_names):
    train, val = split_names
    root = _image_folder(tmp_path, {f"{train}/a/0.png": "RGB", f"{train}/b/0.png": "RGB", f"{train}/b/1.png": "RGB",
                                    f"{val}/a/0.png": "RGB", f"{val}/b/0.png": "RGB"})
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["a", "b"] and (len(bundle.train), len(bundle.val)) == (3, 2)
    alone = _image_folder(tmp_path / "alone", {f"{train}/{c}/{i}.png": "RGB" for c in "ab" for i in range(4)})
    assert build_data(f"imagefolder:{alone}", CFG, val_fraction=0.25).classes == ["a", "b"]


@pytest.mark.parametrize("files,where", [({"a/0.png": "RGB", "a/1.png": "RGB"}, ""),
                                         ({"train/a/0.png": "RGB", "val/a/0.png": "RGB"}, "train")])
def test_image_folder_with_one_class_is_refused(tmp_path, files, where):
    # a one-class model is always right: its accuracy of 1.0 means nothing
    root = _image_folder(tmp_path / "data", files)
    with pytest.raises(DataError, match="only one class") as err:
        build_data(f"imagefolder:{root}", CFG)
    assert str(err.value).startswith(f"{root / where if where else root} has only one class ('a')")


def test_image_folder_path_that_is_a_file_says_so(tmp_path):
    (tmp_path / "list.txt").write_text("a/0.png\n")
    with pytest.raises(DataError, match=r"list\.txt is a file, not a folder"):
        build_data(f"imagefolder:{tmp_path / 'list.txt'}", CFG)


def _noise_images(root, names, fmt="png", side=40, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"{name}.{fmt}")
    return root


@pytest.mark.parametrize("kind", ["imagefolder", "torchvision"])
def test_augment_leaves_the_split_off_validation_images_alone(tmp_path, kind):
    """One folder split in two: augmenting training must not reach the validation share of it."""
    from PIL import Image
    from timm.data import create_transform

    root = _noise_images(tmp_path, [f"{c}/{i}" for c in "ab" for i in range(5)])
    spec = f"imagefolder:{root}" if kind == "imagefolder" else "torchvision:ImageFolder"
    data_dir = tmp_path if kind == "torchvision" else None  # --data-dir is for torchvision:NAME only
    bundle = build_data(spec, CFG, data_dir=data_dir, val_fraction=0.4, augment=True)
    eval_tf = create_transform(**CFG, is_training=False)
    torch.manual_seed(0)
    for k in range(len(bundle.val)):
        x = bundle.val[k][0]
        path = bundle.val.dataset.samples[bundle.val.indices[k]][0]
        assert torch.equal(x, bundle.val[k][0]) and torch.equal(x, eval_tf(Image.open(path).convert("RGB")))
    assert not torch.equal(bundle.train[0][0], bundle.train[0][0])  # training still augments


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "bmp", "tiff", "gif", "ppm"])
def test_truncated_image_is_found_by_the_pre_run_check(tmp_path, fmt):
    root = _noise_images(tmp_path / "data", [f"{c}/{i}" for c in "ab" for i in range(3)], fmt=fmt)
    _truncate(root / "a" / f"1.{fmt}")
    with pytest.raises(DataError, match=rf"corrupt or non-image file: .*a/1\.{fmt}; .*--skip-bad-images"):
        build_data(f"imagefolder:{root}", CFG)
    bundle = build_data(f"imagefolder:{root}", CFG, skip_bad_images=True, val_fraction=0.4)
    assert bundle.skipped_files == 1 and len(bundle.train) + len(bundle.val) == 5
    for split in (bundle.train, bundle.val):
        assert all(split[k][0].shape == (3, 32, 32) for k in range(len(split)))
    # bytes after a complete file's end (some cameras append them to a JPEG): decoded, and accepted
    with open(root / "a" / f"1.{fmt}", "wb") as fh:
        fh.write((root / "a" / f"0.{fmt}").read_bytes() + b"trailer")
    assert build_data(f"imagefolder:{root}", CFG).skipped_files == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_unreadable_when_read_is_named(tmp_path, num_workers):
    """A file that breaks after the pre-run check fails in one line naming it, from workers too."""
    root = _noise_images(tmp_path, [f"{c}/{i}" for c in "ab" for i in range(3)], fmt="jpg")
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.4)
    for i in range(3):
        _truncate(root / "a" / f"{i}.jpg")
    with pytest.raises(DataError) as err:
        list(eval_batches(bundle.val, 2, num_workers=num_workers))
    first = first_line(err.value)  # the CLI's one line (a worker's error arrives wrapped by torch)
    assert first.startswith(f"cannot read image {root / 'a'}") and "image file is truncated" in first
    assert "fix or remove the file and run again" in first and first.endswith("of the same name")


def test_16_bit_grey_keeps_its_brightness(tmp_path):
    from PIL import Image

    from alast.data.images import to_rgb

    grey = np.linspace(0, 65535, 20 * 12).reshape(12, 20).astype(np.uint16)
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(grey).save(tmp_path / c / f"{i}.png")  # mode I;16
    assert Image.open(tmp_path / "a" / "0.png").mode == "I;16"
    plain = {**CFG, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    x, _ = build_data(f"imagefolder:{tmp_path}", plain, val_fraction=0.5).train[0]
    assert float(x.mean()) == pytest.approx(grey.mean() / 65535, abs=0.01)  # not clipped to white
    expect = (grey >> 8).astype(np.uint8)
    for mode in ("I;16B", "I;16L"):
        img = Image.frombytes(mode, (20, 12), grey.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        assert np.array_equal(np.asarray(to_rgb(img))[..., 0], expect)
    # 32-bit I within 16 bits and F within [0, 1] keep their scale; others stretch their own range
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey.astype(np.int32))))[..., 0], expect)
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32)))).max() == 128
    wide = to_rgb(Image.fromarray(np.array([[-1000.0, 3000.0]], np.float32)))
    assert np.asarray(wide)[..., 0].tolist() == [[0, 255]]


def test_palette_with_per_entry_transparency_reads_without_warning(tmp_path):
    import warnings

    from PIL import Image

    pal = Image.new("P", (20, 12))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(2):
            pal.save(tmp_path / c / f"{i}.png", transparency=bytes([128, 255]))  # alpha per palette entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundle = build_data(f"imagefolder:{tmp_path}", CFG, val_fraction=0.5)
        assert bundle.train[0][0].shape == (3, 32, 32)


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


# --- built-in sets: source pixels kept, the model's transform applied per sample --------------------
def _reference_digits(data_cfg, idx):
    """The old up-front pipeline for digit ``idx``: 8x8 grey scaled to uint8, RGB, timm transform."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from timm.data import create_transform

    img = load_digits().images[idx]
    pil = Image.fromarray((img * (255.0 / 16.0)).astype("uint8"), mode="L").convert("RGB")
    return create_transform(**data_cfg, is_training=False)(pil)


def _reference_shapes(data_cfg, seed, idx):
    """The old pipeline for shapes image ``idx`` (< _CHUNK): first chunk of the seed, uint8, transform."""
    from PIL import Image
    from timm.data import create_transform

    from alast.data.synthetic import _CHUNK, generate_batch

    assert idx < _CHUNK
    img, lab = generate_batch("shapes", _CHUNK, torch.Generator().manual_seed(seed))
    u8 = (img[idx] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return create_transform(**data_cfg, is_training=False)(Image.fromarray(u8, "RGB")), int(lab[idx])


@pytest.mark.parametrize("img_size", [None, 64])
def test_digits_per_sample_equal_the_up_front_pipeline(img_size):
    data_cfg = model_data_config("alast_demo_vit", img_size)
    bundle = build_data("digits", data_cfg, val_fraction=0.2, seed=0)
    side = img_size or 32
    for split in (bundle.train, bundle.val):
        for k in (0, 7, len(split) - 1):
            x, y = split[k]
            base = split.indices[k]
            assert x.shape == (3, side, side)
            assert torch.equal(x, _reference_digits(data_cfg, base)), (k, base)
            assert y == int(bundle.val.dataset.targets[base])


@pytest.mark.parametrize("img_size", [None, 64])
def test_shapes_per_sample_equal_the_up_front_pipeline(img_size):
    data_cfg = model_data_config("alast_demo_vit", img_size)
    bundle = build_data("shapes", data_cfg)
    assert (len(bundle.train), len(bundle.val)) == (6000, 1500)
    for k in (0, 333, 1023):
        x, y = bundle.val[k]
        ref, ref_y = _reference_shapes(data_cfg, 5678, k)
        assert torch.equal(x, ref) and y == ref_y
    x, y = bundle.train[5]
    ref, ref_y = _reference_shapes(data_cfg, 1234, 5)
    assert torch.equal(x, ref) and y == ref_y


def test_builtin_sets_store_source_pixels_not_model_inputs():
    """At 518 px only the source uint8 images are held (the old up-front tensors took ~6 GB)."""
    data_cfg = model_data_config("alast_demo_vit", 518)
    digits = build_data("digits", data_cfg)
    store = digits.val.dataset.images
    assert store.dtype == np.uint8 and store.shape == (1797, 8, 8)
    assert digits.train.dataset.images is store  # train and val share one copy
    assert digits.val[0][0].shape == (3, 518, 518)
    shapes = build_data("shapes", data_cfg)
    assert shapes.train.images.dtype == torch.uint8 and shapes.train.images.shape == (6000, 3, 32, 32)
    assert shapes.val[0][0].shape == (3, 518, 518)


def test_random_images_are_drawn_per_index():
    data_cfg = model_data_config("alast_demo_vit", 48)
    a = build_data("random:40", data_cfg, seed=3)
    b = build_data("random:40", data_cfg, seed=3)
    c = build_data("random:40", data_cfg, seed=4)
    assert (len(a.train), len(a.val)) == (35, 5)
    x, y = a.train[2]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x, b.train[2][0]) and torch.equal(x, a.train[2][0])
    assert not torch.equal(x, a.train[3][0]) and not torch.equal(x, c.train[2][0])
    assert not torch.equal(a.val[0][0], a.train[0][0])  # the two splits draw different indices
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    assert [a.train[i][1] for i in range(35)] == [b.train[i][1] for i in range(35)]


def test_augment_applies_to_the_builtin_training_split_only():
    plain = build_data("digits", CFG, seed=0)
    aug = build_data("digits", CFG, seed=0, augment=True)
    assert torch.equal(aug.val[3][0], plain.val[3][0])
    assert aug.train.dataset.transform is not aug.val.dataset.transform
    shapes = build_data("shapes", CFG, augment=True)
    assert shapes.train.transform is not shapes.val.transform


@pytest.mark.parametrize("kind", ["digits", "imagefolder"])
def test_the_tuning_split_holds_training_images_out_unaugmented(tmp_path, kind):
    """data.tune_fraction: the run trains on the training split less a stratified share of it and
    scores that share (eval transform under augment); the validation images take no part."""
    from collections import Counter

    from PIL import Image
    from timm.data import create_transform

    spec = "digits" if kind == "digits" else f"imagefolder:{_noise_images(tmp_path, [f'{c}/{i}' for c in 'ab' for i in range(10)])}"
    plain = build_data(spec, CFG, seed=3, val_fraction=0.2)
    tuned = build_data(spec, CFG, seed=3, val_fraction=0.2, augment=True, tune_fraction=0.25)
    train, held = set(tuned.train.indices), set(tuned.val.indices)
    assert not train & held and train | held == set(plain.train.indices)
    labels = tuned.val.dataset.targets
    whole, out = Counter(labels[i] for i in plain.train.indices), Counter(labels[i] for i in held)
    assert all(abs(out[c] - 0.25 * n) <= 1 for c, n in whole.items())  # stratified
    eval_tf = create_transform(**CFG, is_training=False)
    torch.manual_seed(0)
    k = 0
    x = tuned.val[k][0]
    if kind == "digits":
        expected = plain.val.dataset[tuned.val.indices[k]][0]
    else:
        expected = eval_tf(Image.open(tuned.val.dataset.samples[tuned.val.indices[k]][0]).convert("RGB"))
    assert torch.equal(x, expected) and torch.equal(x, tuned.val[k][0])
    assert not torch.equal(tuned.train[0][0], tuned.train[0][0])  # training still augments
    if kind == "digits":  # a bench's seeds: none of their validation images is held out either
        other = [set(build_data(spec, CFG, seed=s, val_fraction=0.2).val.indices) for s in (4, 5)]
        apart = build_data(spec, CFG, seed=3, val_fraction=0.2, tune_fraction=0.25, tune_outside_seeds=[3, 4, 5])
        assert not set(apart.val.indices) & (other[0] | other[1]) and len(apart.val) == len(tuned.val)
        assert set(apart.train.indices) | set(apart.val.indices) == set(plain.train.indices)
        assert held & (other[0] | other[1])  # which the plain draw would have held out
    with pytest.raises(DataError, match="holds out none of the 2 training images"):
        build_data(f"imagefolder:{_noise_images(tmp_path / 'two', ['a/0', 'a/1', 'b/0', 'b/1'])}", CFG,
                   val_fraction=0.5, tune_fraction=0.5)


@pytest.mark.parametrize("spec", ["digits", "shapes", "random:64"])
def test_workers_give_the_same_batches(spec):
    """Per-sample transforms survive pickling (spawned workers) and forked DataLoader workers."""
    import pickle

    bundle = build_data(spec, CFG, seed=0)
    clone = pickle.loads(pickle.dumps(bundle.val))
    assert torch.equal(clone[4][0], bundle.val[4][0])
    sampler = StepBatchSampler(len(bundle.train), 16, seed=1, start_step=0, total_steps=3)
    serial = list(train_batches(bundle.train, sampler, num_workers=0))
    parallel = list(train_batches(bundle.train, sampler, num_workers=2))
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# --- evaluation batches -------------------------------------------------------------------------
def test_auto_eval_batch_size_bounds_the_input_tensor():
    assert auto_eval_batch_size(3 * 32 * 32 * 4) == 256  # capped
    assert auto_eval_batch_size(3 * 518 * 518 * 4) == 2
    assert auto_eval_batch_size(3 * 224 * 224 * 4) == 13
    assert auto_eval_batch_size(1 << 30) == 1  # never zero
    bundle = build_data("digits", model_data_config("alast_demo_vit", 224))
    assert eval_batches(bundle.val).batch_size == 13 and eval_batches(bundle.val, 5).batch_size == 5


def test_evaluation_does_not_depend_on_the_eval_batch_size():
    from alast.export import _accumulate
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(num_classes=10).eval()
    val = build_data("digits", CFG, seed=0).val
    with torch.no_grad():
        results = [_accumulate(eval_batches(val, bs), model) for bs in (1, 7, None)]
    assert results[0]["samples"] == len(val) == results[2]["samples"]
    for r in results[1:]:
        assert r["accuracy"] == results[0]["accuracy"]
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)


def test_training_evaluates_with_the_configured_eval_batch_size(tmp_path, monkeypatch):
    from alast.config import build_config
    from alast.training import loop

    sizes = []

    def spy(ds, batch_size=None, num_workers=0, pin_memory=False):
        sizes.append(batch_size)
        return eval_batches(ds, batch_size, num_workers, pin_memory)

    monkeypatch.setattr(loop, "eval_batches", spy)
    for bs in (5, None):
        cfg = build_config({"data": {"spec": "random:32"}, "backend": {"count_flops": "off", "threads": 1},
                            "train": {"steps": 2, "batch_size": 8, "eval_batch_size": bs, "eval_every": 1},
                            "output": {"dir": str(tmp_path / str(bs))}})
        loop.train(cfg, tmp_path / str(bs))
    # one evaluation after step 1; at the end, on the token schedule and on every token
    assert sizes == [5, 5, 5, None, None, None]


# --- image files: orientation, size ------------------------------------------------------------
def test_exif_orientation_is_applied_in_training_evaluation_and_the_check(tmp_path):
    """A phone photo stores the sensor's pixels and its rotation in EXIF: it is read upright."""
    from PIL import Image
    from timm.data import create_transform

    from alast.data.folders import load_image

    sensor = Image.new("RGB", (40, 20), (255, 255, 255))
    sensor.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show: the left half ends up on top
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(2):
            sensor.save(tmp_path / c / f"{i}.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image(str(tmp_path / "a" / "0.jpg"))
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[:20].mean(), np.asarray(upright)[20:].mean()
    assert top < 30 and bottom > 225
    bundle = build_data(f"imagefolder:{tmp_path}", CFG, val_fraction=0.5)
    eval_tf = create_transform(**CFG, is_training=False)
    for k in range(len(bundle.val)):
        assert torch.equal(bundle.val[k][0], eval_tf(upright))


def test_image_over_pils_pixel_limit_is_called_too_large_not_corrupt(tmp_path, monkeypatch):
    from PIL import Image

    from alast.data.folders import load_image

    root = _noise_images(tmp_path, [f"{c}/{i}" for c in "ab" for i in range(3)], side=40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40x40 = 1,600 pixels > 2 x 500: PIL's error
    with pytest.raises(DataError) as err:
        build_data(f"imagefolder:{root}", CFG)
    msg = str(err.value)
    assert "corrupt" not in msg
    assert "has too many pixels for PIL's safety limit (1,600 pixels; the limit is 1,000)" in msg
    assert msg.endswith("resize it, or pass --skip-bad-images to skip it")
    with pytest.raises(DataError, match=r"cannot read image .*\(too many pixels for PIL's safety limit"):
        load_image(str(root / "a" / "0.png"))


# --- torchvision: labels, split names, errors -------------------------------------------------
class _FakeSet(torch.utils.data.Dataset):
    """A torchvision-style dataset of 6 tiny images; subclasses set the label attribute."""

    def __init__(self, root, split="train", transform=None, download=False):
        from PIL import Image
        from torchvision.datasets.utils import verify_str_arg

        self.split = verify_str_arg(split, "split", self.valid)
        self.transform, self.images = transform, [Image.new("L", (8, 8), i * 40) for i in range(6)]
        self.y = [0, 1, 2, 0, 1, 2]  # the labels, also under the subclass's attribute

    valid = ("train", "test")

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.y[i]


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Register dataset classes under torchvision.datasets for the test."""
    import torchvision.datasets as tvd

    def register(name, cls):
        monkeypatch.setattr(tvd, name, cls, raising=False)
        monkeypatch.setattr(tvd, "__all__", [*tvd.__all__, name])
    return register


def _svhn_like(self):  # numpy labels, as SVHN's and SEMEION's .labels
    self.labels = np.array(self.y)


def _gtsrb_like(self):  # (path, label) pairs, as GTSRB's and FER2013's ._samples
    self._samples = [(f"{i}.ppm", y) for i, y in enumerate(self.y)]


@pytest.mark.parametrize("store", [_svhn_like, _gtsrb_like, lambda self: None])  # the last: Caltech101's .y
def test_torchvision_labels_are_read_from_their_attributes(tmp_path, fake_torchvision, store):
    class Labelled(_FakeSet):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            store(self)

    fake_torchvision("Labelled", Labelled)
    bundle = build_data("torchvision:Labelled", CFG, data_dir=tmp_path)
    assert bundle.classes == ["0", "1", "2"] and len(bundle.train) == len(bundle.val) == 6

    class NoSplit(Labelled):  # split by data.val_fraction on the labels, without reading the images
        def __init__(self, root, transform=None, download=False):
            super().__init__(root, "train", transform, download)

        def __getitem__(self, i):
            raise AssertionError("the labels come from the attribute")

    fake_torchvision("NoSplit", NoSplit)
    bundle = build_data("torchvision:NoSplit", CFG, data_dir=tmp_path, val_fraction=0.5)
    assert (len(bundle.train), len(bundle.val)) == (3, 3)


def test_torchvision_without_labels_names_the_attributes_looked_for(tmp_path, fake_torchvision):
    class Unlabelled(_FakeSet):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            del self.y

    fake_torchvision("Unlabelled", Unlabelled)
    with pytest.raises(DataError, match=r"cannot tell the classes of torchvision:Unlabelled: it has none of the "
                                        r"attributes classes, categories, targets, _labels, labels, y, _samples"):
        build_data("torchvision:Unlabelled", CFG, data_dir=tmp_path)


def test_torchvision_split_names_come_from_the_table_the_dataset_or_the_config(tmp_path, fake_torchvision):
    used = []

    class Splits(_FakeSet):
        valid = ("train-standard", "val", "holdout")

        def __init__(self, root, split="train-standard", transform=None, download=False):
            super().__init__(root, split, transform, download)
            used.append(split)

    fake_torchvision("Splits", Splits)
    build_data("torchvision:Splits", CFG, data_dir=tmp_path)  # neither train nor test: the names it accepts
    assert used == ["train-standard", "val"]
    used.clear()
    build_data("torchvision:Splits", CFG, data_dir=tmp_path, val_split="holdout")
    assert used == ["train-standard", "holdout"]
    with pytest.raises(DataError) as err:
        build_data("torchvision:Splits", CFG, data_dir=tmp_path, train_split="trainval")
    assert str(err.value) == ("torchvision:Splits has no split 'trainval'; set data.train_split to one of "
                              "train-standard, val, holdout")
    used.clear()

    class OxfordIIITPet(Splits):
        valid = ("trainval", "test")

    fake_torchvision("OxfordIIITPet", OxfordIIITPet)
    build_data("torchvision:OxfordIIITPet", CFG, data_dir=tmp_path)
    assert used == ["trainval", "test"]


def test_torchvision_subset_datasets_need_data_subset(tmp_path):
    with pytest.raises(DataError, match=r"^torchvision:EMNIST needs a subset: --set data.subset=NAME \(one of byclass"):
        build_data("torchvision:EMNIST", CFG, data_dir=tmp_path)
    with pytest.raises(DataError, match=r"^torchvision:EMNIST has no subset 'x'; set data.subset to one of byclass"):
        build_data("torchvision:EMNIST", CFG, data_dir=tmp_path, subset="x")
    with pytest.raises(DataError, match=r"^data.val_split does not apply to torchvision:MNIST"):
        build_data("torchvision:MNIST", CFG, data_dir=tmp_path, val_split="test")


def test_split_keys_are_validated_in_the_config():
    from alast.config import ConfigError, build_config

    assert build_config({"data": {"spec": "torchvision:EMNIST", "subset": "letters"}}).data.subset == "letters"
    assert build_config({}).data.train_split is None
    with pytest.raises(ConfigError, match="train_split"):
        build_config({"data": {"train_split": ""}})


@pytest.mark.parametrize("name,needles,absent", [
    ("USPS", ["torchvision:USPS not found under", "put it there or let `alast train` fetch it with --set data.download=true"], []),
    ("FER2013", ["torchvision:FER2013 not found under", "(torchvision cannot download FER2013)"], ["download=true"]),
    ("VisionDataset", ["is a base class, not a dataset", "imagefolder:PATH"], []),
    ("mnist", ["unknown torchvision dataset 'mnist'; did you mean MNIST?"], []),
])
def test_torchvision_errors_say_what_to_do(tmp_path, name, needles, absent):
    with pytest.raises(DataError) as err:
        build_data(f"torchvision:{name}", CFG, data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles) and not any(a in msg for a in absent)


def test_torchvision_missing_package_is_named(tmp_path, fake_torchvision):
    class NeedsLmdb(_FakeSet):  # as LSUN without the lmdb package
        def __init__(self, root, transform=None):
            raise ModuleNotFoundError("No module named 'lmdb'", name="lmdb")

    fake_torchvision("NeedsLmdb", NeedsLmdb)
    with pytest.raises(DataError, match=r"^torchvision:NeedsLmdb needs the Python package lmdb; install it"):
        build_data("torchvision:NeedsLmdb", CFG, data_dir=tmp_path)


def test_images_outside_class_folders_and_classes_never_validated_are_named(tmp_path):
    """An image at the top of the data folder was left out, and a one-image class went unvalidated,
    without a word."""
    files = {**{f"{c}/{i}.png": "RGB" for c in "ab" for i in range(4)}, "Fish/0.png": "RGB", "stray.png": "RGB",
             "Koi/0.png": "RGB"}
    root = _image_folder(tmp_path / "data", files)
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.25)
    assert len(bundle.train) + len(bundle.val) == 10  # the stray image is not read
    assert (f"left out 1 image(s) in {root} itself, outside any class folder; a class's images go in its folder "
            f"({root}/<class>/<image>)") in bundle.notes
    assert ("classes 'Fish', 'Koi' have one image: trained on, never validated (a class needs two images to be "
            "held out)") in bundle.notes
    splits = _image_folder(tmp_path / "splits", {f"{s}/{c}/0.png": "RGB" for s in ("train", "val") for c in "ab"})
    assert not any("never validated" in n for n in build_data(f"imagefolder:{splits}", CFG).notes)  # val/ does


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_stray_image_in_a_split_folder_leaves_the_layout_as_it_is(tmp_path, where):
    """train/ or val/ holding one image beside its class folders was no split any more: "named like
    split folders but without class folders", or no validation images at all."""
    files = {**{f"{s}/{c}/{i}.png": "RGB" for s in ("train", "val") for c in "ab" for i in range(2)},
             f"{where}/stray.png": "RGB"}
    root = _image_folder(tmp_path / "data", files)
    bundle = build_data(f"imagefolder:{root}", CFG)
    assert bundle.classes == ["a", "b"] and len(bundle.train) == 4 and len(bundle.val) == 4
    assert any(n.startswith(f"left out 1 image(s) in {root / where} itself") for n in bundle.notes)
