"""Bad input and faults: one line naming the problem and the fix, the right exit code, no traceback.

Exit codes: 2 bad input, 1 failure during the run, 130 interrupted (tests/test_resume.py).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from alast.training import checkpoint as ckpt
from alast_cli.main import cli
from tests.cli_errors import one_error_line as assert_one_line_error

FAST = ["--batch-size", "4", "--set", 'backend.count_flops="off"', "--set", "backend.threads=1",
        "--set", "data.val_fraction=0.05"]  # a small held-out split: the evaluations cost less


def run_cli(args: list[str]):
    return CliRunner().invoke(cli, args)


def make_image_folder(root: Path, bad: dict[str, bytes] | None = None) -> Path:
    from PIL import Image

    for c, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), tuple(min(255, v + 5 * i) for v in color)).save(root / c / f"{i}.png")
    for rel, data in (bad or {}).items():
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "syntax.yaml").write_text("train:\n  steps: [1, 2\n")
    (tmp_path / "unknown.yaml").write_text("trian:\n  steps: 3\n")
    (tmp_path / "notmap.yaml").write_text("- just\n- a list\n")
    (tmp_path / "steps.yaml").write_text("train:\n  steps: -5\n")
    (tmp_path / "adir.yaml").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    return {"dir": tmp_path}


# (case id, CLI args with {dir} for the temp dir, exit code, substrings of the one error line)
CASES = [
    ("missing config", ["train", "{dir}/nope.yaml"], 2, ["config file not found", "nope.yaml"]),
    ("config is a directory", ["train", "{dir}/adir.yaml"], 2, ["config path is a directory"]),
    ("yaml syntax error", ["train", "{dir}/syntax.yaml"], 2, ["YAML syntax error", "line"]),
    ("config not a mapping", ["train", "{dir}/notmap.yaml"], 2, ["must be a mapping"]),
    ("unknown section in file", ["train", "{dir}/unknown.yaml"], 2, ["unknown config key 'trian'"]),
    ("unknown key via --set", ["train", "--set", "train.stepz=3"], 2, ["unknown config key 'train.stepz'"]),
    ("negative steps in file", ["train", "{dir}/steps.yaml"], 2, ["'train.steps'", "-5"]),
    ("negative steps option", ["train", "--steps", "-1"], 2, ["'train.steps'"]),
    ("batch size 0", ["train", "--batch-size", "0"], 2, ["'train.batch_size'"]),
    ("wrong type", ["train", "--set", "train.lr=fast"], 2, ["'train.lr'", "fast"]),
    ("value out of range", ["train", "--set", "policy.b_min=1.5"], 2, ["'policy.b_min'"]),
    ("unknown backend", ["train", "--backend", "tensorflow"], 2, ["'backend.name'", "tensorflow"]),
    ("malformed --set, no =", ["train", "--set", "trainsteps"], 2, ["malformed --set", "section.key=value"]),
    ("malformed --set, no section", ["train", "--set", "steps=3"], 2, ["malformed --set"]),
    ("malformed --set, bad yaml", ["train", "--set", "train.steps=[1"], 2, ["malformed --set"]),
    ("unknown model", ["train", "--model", "vit_nonexistent_9000", "--steps", "1", *FAST], 2, ["unknown model"]),
    ("model ALaST cannot drive", ["plan", "--model", "vit_relpos_small_patch16_224", "--set", "model.img_size=32",
                                  "--target-flops", "0.5"], 2, ["VisionTransformerRelPos is not a timm VisionTransformer"]),
    ("unknown policy", ["train", "--policy", "yolo", "--steps", "1", *FAST, "--out", "{dir}/run"], 2,
     ["unknown policy 'yolo'", "full", "lora", "+lora"]),
    ("unknown policy in bench", ["bench", "--policies", "full,yolo", "--steps", "1", *FAST, "--out", "{dir}/b"], 2,
     ["unknown policy 'yolo' in --policies"]),
    ("full's name in capitals", ["bench", "--policies", "FULL,alast", "--steps", "1", *FAST, "--out", "{dir}/b"], 2,
     ["unknown policy 'FULL' in --policies"]),  # was "bench needs 'full' among --policies"
    ("LoRA settings without a LoRA policy", ["train", "--policy", "full", "--set", "policy.lora.rank=4", "--steps",
                                             "1", *FAST, "--out", "{dir}/run"], 2,
     ["policy.lora is set", "'full' does not use LoRA", "--policy lora"]),
    ("steps and epochs", ["train", "--steps", "3", "--epochs", "1", *FAST], 2, ["--steps and --epochs"]),
    ("model name close to one", ["train", "--model", "vit_tiny_patch16_22", "--steps", "1", *FAST], 2,
     ["similar: vit_tiny_patch16_224"]),
    ("image below the patch size", ["train", "--img-size", "3", "--steps", "1", *FAST, "--out", "{dir}/run"], 2,
     ["image size 3 is smaller than alast_demo_vit's patch size 4", "--img-size 4"]),
    ("image size not a multiple of the patch size", ["train", "--model", "vit_tiny_patch16_224", "--img-size", "72",
                                                     "--steps", "1", *FAST, "--out", "{dir}/run"], 2,
     ["image size 72 is not a multiple of vit_tiny_patch16_224's patch size 16", "--img-size 64 or 80"]),
    ("timm image below the patch size", ["train", "--model", "vit_tiny_patch16_224", "--img-size", "8", "--steps",
                                         "1", *FAST, "--out", "{dir}/run"], 2, ["patch size 16"]),
    ("image of absurdly many tokens", ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size",
                                       "20000", "--steps", "1", *FAST, "--out", "{dir}/run"], 2,
     ["1,562,500 patch tokens", "--img-size 4096 or less"]),
    ("timm image size 0 when profiling", ["profile", "vit_tiny_patch16_224", "--img-size", "0"], 2,
     ["image size 0 is smaller than vit_tiny_patch16_224's patch size 16"]),
    ("missing checkpoint", ["train", "--checkpoint", "{dir}/missing.pth", "--steps", "1", *FAST, "--out",
                            "{dir}/run"], 2, ["checkpoint not found", "missing.pth", "drop --checkpoint"]),
    ("eval of a file that is no model", ["eval", "{dir}/syntax.yaml"], 2,
     ["is not an ONNX model", "pass a run directory"]),
    ("checkpoint is a directory", ["train", "--checkpoint", "{dir}/full", "--steps", "1", *FAST, "--out",
                                   "{dir}/run"], 2, ["is a directory", "weights file"]),
    ("checkpoint is no weights file", ["train", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                                       "--checkpoint", "{dir}/syntax.yaml", "--steps", "1", *FAST, "--out",
                                       "{dir}/run"], 2, ["syntax.yaml", "cannot read checkpoint", "as weights"]),
    ("unknown data spec", ["train", "--data", "mnist", "--steps", "1", *FAST], 2, ["unknown data spec"]),
    ("missing data dir", ["train", "--data", "imagefolder:{dir}/no_such_dir", "--steps", "1", *FAST], 2,
     ["image folder not found", "no_such_dir"]),
    ("missing torchvision dir", ["train", "--data", "torchvision:CIFAR10", "--steps", "1", *FAST], 2,
     ["needs --data-dir"]),
    ("non-empty run dir", ["train", "--steps", "1", *FAST, "--out", "{dir}/full"], 2,
     ["holds files but no alast run", "choose another --out"]),
    ("resume of nothing", ["train", "--resume", "--out", "{dir}/nothing"], 2, ["cannot resume"]),
    ("resume and force", ["train", "--resume", "--force", "--out", "{dir}/full"], 2,
     ["--resume continues the run", "--force replaces it; pass one of them"]),
    ("nproc 0", ["train", "--nproc", "0"], 2, []),
]


@pytest.mark.parametrize("args,code,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(files, args, code, needles):
    d = files["dir"]
    before = {p: p.stat().st_mtime_ns for p in (d / "full").rglob("*")}
    res = run_cli([a.replace("{dir}", str(d)) for a in args])
    if args[-1:] == ["0"] and "--nproc" in args:  # click's own usage error
        assert res.exit_code == 2 and "Traceback" not in res.output and "--nproc" in res.stderr
        return
    assert_one_line_error(res, code, *needles)
    # nothing in an existing run dir was touched
    assert {p: p.stat().st_mtime_ns for p in (d / "full").rglob("*")} == before
    assert (d / "full" / "keep.txt").read_text() == "precious"


def test_unreadable_config(tmp_path):
    cfg = tmp_path / "secret.yaml"
    cfg.write_text("train:\n  steps: 2\n")
    cfg.chmod(0)
    if os.access(cfg, os.R_OK):
        pytest.skip("running as a user who can read a mode-000 file (root)")
    assert_one_line_error(run_cli(["train", str(cfg)]), 2, "cannot read config")


@pytest.mark.parametrize("where", ["before the command", "after it"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["train", str(tmp_path / "nope.yaml")]
    res = run_cli(["--debug", *args] if where == "before the command" else [*args, "--debug"])
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_bench_refuses_an_unknown_policy_before_any_run(tmp_path):
    res = run_cli(["bench", "--policies", "full,alast,yolo", "--steps", "1", *FAST, "--out", str(tmp_path / "b")])
    assert_one_line_error(res, 2, "unknown policy 'yolo'")
    assert not (tmp_path / "b").exists()  # nothing ran, so the directory can be used again


def test_a_run_on_a_relative_image_folder_is_read_back_from_another_directory(tmp_path, monkeypatch):
    """The saved config holds the folder's absolute path: eval (and resume) work from anywhere."""
    import json

    make_image_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    res = run_cli(["train", "--data", "imagefolder:imgs", "--steps", "1", *FAST, "--out", "run"])
    assert res.exit_code == 0, res.output
    assert "starting from the shipped pre-trained backbone" in res.output
    assert f"imagefolder:{tmp_path / 'imgs'}" in (tmp_path / "run" / "config.yaml").read_text()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = run_cli(["eval", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["samples"] == json.loads((tmp_path / "run" / "summary.json").read_text())["val_samples"]


def test_corrupt_image_is_named_and_skip_bad_images_counts(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"cat/broken.png": b"\x89PNG\r\n\x1a\n garbage",
                                                  "dog/notes.jpg": b"this is text, not a JPEG"})
    args = ["train", "--data", f"imagefolder:{root}", "--steps", "2", *FAST]
    line = assert_one_line_error(run_cli([*args, "--out", str(tmp_path / "a")]), 2, "corrupt or non-image file",
                                 "--skip-bad-images")
    assert "broken.png" in line or "notes.jpg" in line

    res = run_cli([*args, "--skip-bad-images", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "2 unreadable image file(s) skipped" in res.output
    import json

    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["skipped_files"] == 2 and summary["num_classes"] == 2
    # evaluating the run reads its data as the run did: the same split, the bad files skipped again
    res = run_cli(["eval", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert (metrics["samples"], metrics["accuracy"]) == (summary["val_samples"], summary["val_accuracy"])


def test_nan_loss_stops_names_the_step_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    res = run_cli(["train", "--steps", "6", *FAST, "--lr", "1e30", "--set", "output.checkpoint_every=1",
                   "--out", str(run)])
    line = assert_one_line_error(res, 1, "loss became", "at step", "last good checkpoint")
    step = int(line.split("(metrics.jsonl step ")[1].split(")")[0])
    assert f"at step {step + 1} (" in line  # counted as the progress bar counts
    kept = ckpt.list_checkpoints(run)
    assert kept and kept[-1].name == f"step_{step:08d}.safetensors"  # the checkpoint before the bad step
    assert ckpt.load_checkpoint(kept[-1])["step"] == step
    assert not (run / "summary.json").exists()


def test_full_disk_on_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """The second checkpoint write hits ENOSPC (simulated at fsync, after the data was written)."""
    real_fsync = os.fsync
    seen = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".step_" in name and name.endswith(".tmp"):
            seen.append(name)
            if len(seen) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    res = run_cli(["train", "--steps", "4", *FAST, "--set", "output.checkpoint_every=1", "--out", str(run)])
    assert_one_line_error(res, 1, "No space left on device", "step_00000001.safetensors", "intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.safetensors"]  # no temp left
    assert ckpt.load_checkpoint(run / "checkpoints" / "step_00000001.safetensors")["step"] == 1


@pytest.mark.parametrize("command", ["export", "eval"])
def test_export_or_eval_of_something_missing(tmp_path, command):
    if command not in cli.commands:
        pytest.skip(f"`alast {command}` is not registered in alast_cli/main.py yet")
    args = [command, str(tmp_path / "no_run")] + (["--out", str(tmp_path / "m.onnx")] if command == "export" else [])
    res = run_cli(args)
    assert_one_line_error(res, 2, "no_run")


def test_a_batch_the_data_cannot_fill_fails_before_the_target_is_planned(tmp_path, monkeypatch):
    """Planning a target profiles the model (minutes on a large one); a batch larger than the
    training set is refused first, and leaves no run directory behind."""
    from alast.planning import plan

    def must_not_plan(*args, **kwargs):
        raise AssertionError("the target was planned before the batch was checked")

    monkeypatch.setattr(plan, "solve_target", must_not_plan)
    out = tmp_path / "run"
    res = run_cli(["train", "--data", "random:4", "--steps", "2", "--batch-size", "64", "--target-flops", "0.5",
                   "--set", "backend.threads=1", "--out", str(out)])
    assert_one_line_error(res, 2, "batch size 64 exceeds the", "lower --batch-size (train.batch_size)")
    assert not out.exists()


def test_a_bench_with_a_batch_the_data_cannot_fill_fails_before_planning(tmp_path, monkeypatch):
    """The bench's runs solve their targets the same way: after the data is loaded and checked."""
    from alast.planning import plan

    def must_not_plan(*args, **kwargs):
        raise AssertionError("the target was planned before the batch was checked")

    monkeypatch.setattr(plan, "solve_target", must_not_plan)
    out = tmp_path / "bench"
    res = run_cli(["bench", "--data", "random:4", "--policies", "alast,full", "--seeds", "1", "--steps", "2",
                   "--batch-size", "64", "--target-flops", "0.5", "--set", "backend.threads=1", "--out", str(out)])
    assert_one_line_error(res, 2, "batch size 64 exceeds the", "lower --batch-size (train.batch_size)")
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_stops_the_run_before_a_download(tmp_path):
    root = tmp_path / "tv"
    res = run_cli(["train", "--data", "torchvision:CIFAR10", "--data-dir", str(root), "--set", "data.download=true",
                   "--set", "backend.device=cuda", "--steps", "1", "--out", str(tmp_path / "run")])
    assert_one_line_error(res, 2, "backend.device=cuda but no CUDA device is visible")
    assert not root.exists()  # no download was tried
