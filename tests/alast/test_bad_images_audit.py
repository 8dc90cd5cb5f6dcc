"""Unreadable images (an audit): ``--skip-bad-images`` skips every image that does not decode, the
error when one is read mid-run says how to avoid and get past it, ``alast eval`` reports what it
skipped, PIL's decompression-bomb warning is one note, and a link to nothing is called one."""
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from alast.data import DataError, build_data
from alast.training.build import model_data_config

CFG = model_data_config("alast_demo_vit")


def _folder(root, fmt="png", classes="ab", n=3, side=32):
    """``root/<class>/<i>.<fmt>``: noise images (they do not compress: damage in their data shows)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i}.{fmt}")
    return root


def _damage_png_data(path):
    """Flip bytes inside the IDAT chunk's compressed data and write its CRC anew: every chunk checks
    out (PIL's ``verify`` passes) but the data no longer inflates."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    size = struct.unpack(">I", data[at - 4:at])[0]
    body = data[at + 4:at + 4 + size]
    for k in range(size // 2, size // 2 + 20):
        body[k] ^= 0xFF
    data[at + 4:at + 4 + size] = body
    data[at + 4 + size:at + 8 + size] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))
    path.write_bytes(bytes(data))


def _damage_jpeg_middle(path):
    """Write markers over the middle of a JPEG's compressed data; it still ends with its end marker."""
    data = bytearray(path.read_bytes())
    mid = (data.index(b"\xff\xda") + len(data)) // 2
    for k in range(mid, mid + 40):
        data[k] = 0xFF if k % 2 else 0xC4
    path.write_bytes(bytes(data))


def _damaged(tmp_path, fmt):
    root = _folder(tmp_path / "data", fmt=fmt)
    (_damage_png_data if fmt == "png" else _damage_jpeg_middle)(root / "a" / f"1.{fmt}")
    from alast.data.images import check_file, read_rgb

    check_file(str(root / "a" / f"1.{fmt}"))  # the cheap check passes it ...
    with pytest.raises(OSError):  # ... and reading it fails
        read_rgb(str(root / "a" / f"1.{fmt}"))
    return root


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_skip_bad_images_skips_an_image_damaged_inside_its_data(tmp_path, fmt):
    """A PNG with valid CRCs over damaged data, a JPEG damaged in its middle: both skipped."""
    root = _damaged(tmp_path, fmt)
    bundle = build_data(f"imagefolder:{root}", CFG, skip_bad_images=True, val_fraction=0.4)
    assert bundle.skipped_files == 1 and len(bundle.train) + len(bundle.val) == 5
    for split in (bundle.train, bundle.val):  # every image left reads
        assert all(split[k][0].shape == (3, *CFG["input_size"][1:]) for k in range(len(split)))


def test_skip_bad_images_skips_a_damaged_image_in_split_folders(tmp_path):
    root = tmp_path / "data"
    _folder(root / "train", fmt="jpg")
    _folder(root / "val", fmt="jpg", n=2)
    _damage_jpeg_middle(root / "val" / "b" / "0.jpg")
    bundle = build_data(f"imagefolder:{root}", CFG, skip_bad_images=True)
    assert bundle.skipped_files == 1 and (len(bundle.train), len(bundle.val)) == (6, 3)
    assert all(bundle.val[k][0].shape[0] == 3 for k in range(len(bundle.val)))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_an_image_failing_when_read_says_skip_bad_images_would_skip_it_and_how_to_resume(tmp_path, fmt):
    """Without --skip-bad-images the check stays cheap: the file fails when read, in one line that
    says --skip-bad-images would skip it and that a replaced file lets --resume go on."""
    root = _damaged(tmp_path, fmt)
    bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.4)  # the cheap check passes it
    assert bundle.skipped_files == 0
    from alast.data.folders import load_image

    with pytest.raises(DataError) as err:
        load_image(str(root / "a" / f"1.{fmt}"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot read image {root / 'a' / f'1.{fmt}'} (")
    assert "--skip-bad-images (it decodes every image first and skips such files)" in msg
    assert "to --resume a run, replace the file with a readable one of the same name" in msg


def _fake_run(tmp_path, monkeypatch, classes=("a", "b")):
    """`alast eval RUN` loading a tiny untrained model over ``classes`` (no training)."""
    from alast import export
    from alast.config import build_config
    from tests.conftest import make_tiny_vit

    train = _folder(tmp_path / "trained", classes=classes)
    cfg = build_config({"data": {"spec": f"imagefolder:{train}"}})
    summary = {"classes": list(classes), "num_classes": len(classes), "data_config": CFG}
    run = export.LoadedRun(tmp_path, cfg, summary, make_tiny_vit(num_classes=len(classes)).eval())
    monkeypatch.setattr(export, "load_run", lambda run_dir: run)
    return tmp_path


def test_eval_says_how_many_unreadable_files_it_skipped(tmp_path, monkeypatch):
    from alast_cli.main import cli

    run_dir = _fake_run(tmp_path / "run", monkeypatch)
    data = _folder(tmp_path / "eval", n=4)
    (data / "a" / "0.png").write_bytes(b"not an image")
    _damage_png_data(data / "b" / "1.png")  # found by the full decode only
    args = ["eval", str(run_dir), "--data", f"imagefolder:{data}", "--skip-bad-images", "--all-tokens"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["skipped_files"] == 2 and out["samples"] == 6
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "note: 2 unreadable image file(s) skipped" in res.stderr


def test_eval_json_counts_no_skipped_file_as_zero(tmp_path, monkeypatch):
    from alast_cli.main import cli

    run_dir = _fake_run(tmp_path / "run", monkeypatch)
    data = _folder(tmp_path / "eval", n=2)
    res = CliRunner().invoke(cli, ["eval", str(run_dir), "--data", f"imagefolder:{data}", "--all-tokens", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["skipped_files"] == 0
    assert "unreadable" not in res.stderr


@pytest.mark.parametrize("skip_bad", [False, True])
def test_an_image_over_pils_warning_level_is_one_note_not_pils_warning(tmp_path, monkeypatch, capsys, skip_bad):
    """Between PIL's MAX_IMAGE_PIXELS and twice that, PIL warns (with its source line): alast says it
    in one note instead, and reading the image raises no warning."""
    from PIL import Image

    root = _folder(tmp_path / "data", side=30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 30x30 = 900 pixels: over 500, under 2 x 500
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning fails the test
        bundle = build_data(f"imagefolder:{root}", CFG, val_fraction=0.4, skip_bad_images=skip_bad)
        for split in (bundle.train, bundle.val):
            assert all(split[k][0].shape[0] == 3 for k in range(len(split)))
    notes = [line for line in capsys.readouterr().err.splitlines() if "500 pixels" in line]
    assert notes == [(f"note: {root / 'a' / '0.png'} and 5 other image(s) have over 500 pixels (900), PIL's "
                     "decompression-bomb warning level; read all the same, slowly and with much memory "
                     "(resize to train faster)")]


def test_a_link_to_nothing_is_called_one_not_a_corrupt_file(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "a" / "x.png").symlink_to(tmp_path / "nonexistent.png")
    with pytest.raises(DataError) as err:
        build_data(f"imagefolder:{root}", CFG)
    msg = str(err.value)
    assert "corrupt" not in msg
    assert msg == (f"{root / 'a' / 'x.png'} is a link to {tmp_path / 'nonexistent.png'}, which does not exist; "
                   "remove the link or pass --skip-bad-images")
    assert build_data(f"imagefolder:{root}", CFG, skip_bad_images=True).skipped_files == 1
