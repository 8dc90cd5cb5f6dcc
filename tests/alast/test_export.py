"""`alast export` and `alast eval`: verified ONNX files, equal accuracy, and bad input."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from alast_cli.main import cli

pytest.importorskip("onnxruntime")

TRAIN = ["train", "--policy", "tokens", "--steps", "2", "--batch-size", "16", "--set", "backend.count_flops=off",
         "--set", "backend.threads=1", "--set", "policy.eval_tokens=trained"]


def _has_ort_training() -> bool:
    try:
        import onnxruntime.training.api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished demo runs on digits, one per backend."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for backend in ("torch", "ort"):
        if backend == "ort" and not _has_ort_training():
            continue  # export and eval need only onnxruntime; training an ort run needs more
        res = CliRunner().invoke(cli, [*TRAIN, "--backend", backend, "--out", str(root / backend)])
        assert res.exit_code == 0, res.output
        out[backend] = root / backend
    return out


def _err(res):
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.output
    return lines[-1]


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_export_verifies_and_writes_metadata(runs, tmp_path, backend):
    import onnx
    import onnxruntime as ort

    from alast.export import load_run
    from runtimes.token_schedule import token_schedule

    if backend not in runs:
        pytest.skip("onnxruntime-training is not installed")
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["export", str(runs[backend]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "max |logit diff| vs PyTorch" in res.stdout and out.exists()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["alast.input_size"]) == [3, 32, 32]
    assert json.loads(meta["alast.mean"]) == [0.5, 0.5, 0.5] and meta["alast.interpolation"] == "bilinear"
    assert json.loads(meta["alast.classes"]) == [str(i) for i in range(10)]
    assert meta["alast.model"] == "alast_demo_vit" and meta["alast.policy"] == "tokens"
    assert meta["alast.backend"] == backend and "alast.crop_pct" in meta
    run = load_run(runs[backend])
    assert run.kept_tokens and json.loads(meta["alast.kept_tokens"]) == list(run.kept_tokens)
    assert meta["alast.token_score"] == run.token_score == "contribution"  # today's default ranks the schedule
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw: the axis is dynamic
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad(), token_schedule(run.model, run.kept_tokens, score="contribution"):
        assert float((torch.from_numpy(got) - run.model(x)).abs().max()) <= 1e-4


def test_eval_of_run_equals_eval_of_onnx(runs, tmp_path):
    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(out)]).exit_code == 0
    a = CliRunner().invoke(cli, ["eval", str(runs["torch"]), "--json"])
    b = CliRunner().invoke(cli, ["eval", str(out), "--data", "digits", "--json"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ra, rb = json.loads(a.stdout.strip().splitlines()[-1]), json.loads(b.stdout.strip().splitlines()[-1])
    assert ra["samples"] == rb["samples"] > 300
    assert ra["accuracy"] == rb["accuracy"] and ra["loss"] == pytest.approx(rb["loss"], abs=1e-4)
    summary = json.loads((runs["torch"] / "summary.json").read_text())
    assert ra["accuracy"] == pytest.approx(summary["val_accuracy"])


def test_an_onnx_model_is_evaluated_on_the_runs_own_split_names(runs, tmp_path, monkeypatch):
    """A torchvision run's ``data.val_split``/``subset`` travel in the metadata: without them
    ``alast eval model.onnx`` read the dataset's automatic split, not the run's."""
    import onnx

    from alast import export

    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(out)]).exit_code == 0
    meta = export.read_metadata(out)
    assert json.loads(meta["splits"]) == {"train_split": None, "val_split": None, "subset": None}
    model = onnx.load(str(out))
    recorded = {"train_split": "train", "val_split": "holdout", "subset": "letters"}
    next(p for p in model.metadata_props if p.key == "alast.splits").value = json.dumps(recorded)
    onnx.save(model, str(out))
    seen = []

    def val_data(*args, splits=None, **kwargs):
        seen.append(splits)
        raise export.ExportError("stop")

    monkeypatch.setattr(export, "_val_data", val_data)
    for data in (None, "letters"):  # the run's own data, then other data (no split of the run's)
        with pytest.raises(export.ExportError):
            export.evaluate_onnx(out, data)
    assert seen == [recorded, None]


def test_failed_verification_exits_1_and_leaves_no_file(runs, tmp_path, monkeypatch):
    import alast.export as export

    monkeypatch.setattr(export, "max_logit_diff", lambda *a, **k: 0.5)
    out = tmp_path / "sub" / "m.onnx"
    res = CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(out)])
    assert res.exit_code == 1
    assert "verification failed" in _err(res) and "0.5" in _err(res)
    assert list(out.parent.iterdir()) == []


def test_bad_export_input_exits_2(runs, tmp_path):
    bad = tmp_path / "broken"
    shutil.copytree(runs["torch"], bad)
    (bad / "final_model.safetensors").write_bytes(b"\x00garbage" * 10)
    notrun = tmp_path / "empty"
    notrun.mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["torch"], unfinished)
    (unfinished / "summary.json").unlink()
    cases = [(tmp_path / "nope", "run directory not found"), (notrun, "not a run directory"),
             (bad, "corrupt"), (unfinished, f"finish it with `alast train --resume --out {unfinished}`")]
    for run, fragment in cases:
        res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
        assert res.exit_code == 2, (run, res.output)
        assert _err(res).startswith("error: ") and fragment in _err(res)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_eval_input_exits_2(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("this is not a model\n" * 20)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=False)
    nothing = "neither a run directory nor an .onnx file"
    cases = [(text, "not an ONNX model"), (tmp_path / "missing.onnx", nothing), (tmp_path / "no_run", nothing),
             (plain, "no alast preprocessing metadata")]
    for target, fragment in cases:
        res = CliRunner().invoke(cli, ["eval", str(target)])
        assert res.exit_code == 2, (target, res.output)
        assert fragment in _err(res)


def test_export_never_overwrites_silently(runs, tmp_path):
    """An existing --out needs --force; the run's own files are refused even with it; a directory
    is named as one (no temp file name)."""
    from alast.training import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(runs["torch"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    mine = tmp_path / "m.onnx"
    mine.write_text("keep me\n")
    own = ["summary.json", "config.yaml", "final_model.safetensors", "metrics.jsonl", "budgets.png",
           str(ckpt.list_checkpoints(run)[-1].relative_to(run)), "../run/summary.json",
           ".alast.lock", ".summary.json.x1.tmp"]  # the lock another writer takes; a temp a resume removes
    cases = [([str(mine)], "exists; pass --force"), ([str(tmp_path)], "is a directory"),
             *(([str(run / name), "--force"], "the run's own files") for name in own)]
    for out, fragment in cases:
        res = CliRunner().invoke(cli, ["export", str(run), "--out", *out])
        assert res.exit_code == 2, (out, res.output)
        assert fragment in _err(res) and ".tmp" not in _err(res).replace(out[0], ""), _err(res)  # no temp name
    assert mine.read_text() == "keep me\n"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(mine), "--force"])
    assert res.exit_code == 0, res.output
    assert mine.read_bytes().startswith(b"\x08")  # an ONNX protobuf (ir_version field) now


def test_an_ort_run_names_no_memory_method_for_the_memory_it_did_not_measure(runs):
    if "ort" not in runs:
        pytest.skip("onnxruntime-training is not installed")
    summary = json.loads((runs["ort"] / "summary.json").read_text())
    assert summary["peak_memory_bytes"] is None and summary["peak_memory_method"] is None  # was: MemTracker


def test_export_never_writes_over_another_runs_files(runs, tmp_path):
    """Only the exported run's own files were refused: ``--out OTHER_RUN/final_model.safetensors
    --force`` replaced the other run's weights with an ONNX file."""
    other = tmp_path / "other"
    shutil.copytree(runs["torch"], other)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    for name in ("final_model.safetensors", "metrics.jsonl", "checkpoints/step_00000099.safetensors", ".alast.lock"):
        res = CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(other / name), "--force"])
        assert res.exit_code == 2, (name, res.output)
        assert f"is one of the files of the run {other.resolve()}" in _err(res), _err(res)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_onnx_metadata_that_is_not_json_is_named(runs, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(out)]).exit_code == 0
    model = onnx.load(str(out))
    next(p for p in model.metadata_props if p.key == "alast.classes").value = "['0', '1'"
    onnx.save(model, str(out))
    res = CliRunner().invoke(cli, ["eval", str(out)])
    assert res.exit_code == 2
    assert _err(res) == (f"error: {out}: its metadata alast.classes is not JSON (\"['0', '1'\"); export the model "
                         "again with `alast export`")


@pytest.mark.parametrize("opset", [12, 13, 99])
def test_unsupported_opset_is_refused_before_exporting(runs, tmp_path, monkeypatch, opset):
    from alast import export

    def never(*a, **k):
        raise AssertionError("the exporter ran")

    monkeypatch.setattr(export, "export_inference_bytes", never)  # it would print pages of Torch IR
    low, high = export.supported_opsets()
    res = CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(tmp_path / "m.onnx"),
                                   "--opset", str(opset)])
    assert res.exit_code == 2, res.output
    assert f"--opset {opset} is not supported" in _err(res) and f"opsets {low} to {high}" in _err(res)
    assert not (tmp_path / "m.onnx").exists()


def test_supported_opsets_really_export(runs, tmp_path):
    from alast.export import MIN_OPSET, supported_opsets

    low, high = supported_opsets()
    assert low == MIN_OPSET == 14 and high >= 17
    for opset in (low, high):
        res = CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(tmp_path / f"{opset}.onnx"),
                                       "--opset", str(opset), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["opset"] == opset


def test_an_unsupported_opset_in_the_run_config_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["torch"], run)
    text = (run / "config.yaml").read_text()
    assert "opset: 17" in text
    (run / "config.yaml").write_text(text.replace("opset: 17", "opset: 13"))
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "export.opset 13 is not supported" in _err(res)
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.onnx"), "--opset", "17"])
    assert res.exit_code == 0, res.output


def test_eval_data_with_some_of_the_models_classes_is_scored_on_the_models_labels(tmp_path):
    """Evaluation data may hold a subset of the run's classes (as a run's validation folder may):
    its labels are the model's indices of its class names. A class the model never saw is refused."""
    from PIL import Image

    from alast.data import DataError
    from alast.export import _val_data

    colours = {"blue": (0, 0, 200), "green": (0, 200, 0), "red": (200, 0, 0)}
    for split, n in (("train", 3), ("val", 2)):
        for c in ("green", "red"):
            (tmp_path / "sub" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), colours[c]).save(tmp_path / "sub" / split / c / f"{i}.png")
    data_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                "crop_pct": 1.0, "crop_mode": "center"}
    val = _val_data(f"imagefolder:{tmp_path / 'sub'}", data_cfg, None, 0.2, 0, ["blue", "green", "red"])
    labels = [val[i][1] for i in range(len(val))]
    assert sorted(labels) == [1, 1, 2, 2]  # green and red as the model numbers them
    for i in range(len(val)):  # the red channel tells the image's class
        image, label = val[i]
        assert (image[0].mean() > 0) == (label == 2)
    with pytest.raises(DataError, match="not trained on \\(green, red\\)"):
        _val_data(f"imagefolder:{tmp_path / 'sub'}", data_cfg, None, 0.2, 0, ["blue", "yellow"])


def test_eval_refuses_a_run_whose_image_folder_changed_since_it_trained(tmp_path):
    """A split by data.val_fraction reshuffles when a file comes or goes: rebuilt on a changed folder,
    the "validation split" would hold images the run trained on. The run records which files it
    split, and eval (of the run or of its export) refuses, in one line, a folder whose files differ."""
    from PIL import Image

    from tests.cli_errors import one_error_line

    root = tmp_path / "imgs"
    for c, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), tuple(min(255, v + 5 * i) for v in colour)).save(root / c / f"{i}.png")
    run, onnx_file = tmp_path / "run", tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["train", "--data", f"imagefolder:{root}", "--steps", "1", "--batch-size", "4",
                                   "--set", "backend.count_flops=off", "--set", "backend.threads=1", "--out", str(run)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_fingerprint"]["files"] == 12
    res = CliRunner().invoke(cli, ["eval", str(run), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["samples"] == summary["val_samples"]
    assert CliRunner().invoke(cli, ["export", str(run), "--out", str(onnx_file)]).exit_code == 0

    Image.new("RGB", (32, 32), (90, 90, 90)).save(root / "cat" / "new.png")
    for target in (run, onnx_file):
        one_error_line(CliRunner().invoke(cli, ["eval", str(target)]), 2, f"the files in {root} changed since the "
                       "run trained (12 images then, 13 now)", "validation split cannot be rebuilt",
                       "would score images the run trained on", "restore the folder", "--data imagefolder:PATH")
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", f"imagefolder:{root}"])  # the run's own folder
    assert res.exit_code == 2, res.output
    (root / "cat" / "new.png").rename(root / "dog" / "new.png")  # as many files, one moved: refused too
    assert CliRunner().invoke(cli, ["eval", str(run)]).exit_code == 2

    other = tmp_path / "other"
    shutil.copytree(root, other)
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", f"imagefolder:{other}", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["samples"] == 13  # all of it

    del summary["data_fingerprint"]  # a run written before fingerprints is evaluated as before
    (run / "summary.json").write_text(json.dumps(summary))
    assert CliRunner().invoke(cli, ["eval", str(run), "--json"]).exit_code == 0
    (root / "dog" / "new.png").unlink()  # restored: the export scores the run's split again
    res = CliRunner().invoke(cli, ["eval", str(onnx_file), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["samples"] == summary["val_samples"]


@pytest.mark.parametrize("damage,fragment", [
    (lambda s: s.pop("data_config"), "its data_config lacks input_size, mean, std"),
    (lambda s: s["data_config"].update(mean=[]), "its data_config lacks mean"),
    (lambda s: s.pop("classes"), "classes should name its"),
    (lambda s: s.update(classes=s["classes"][:1]), "classes should name its"),
    (None, "is not valid JSON (JSONDecodeError)"),
])
def test_a_damaged_summary_is_refused_by_export_and_eval(runs, tmp_path, damage, fragment):
    """A summary without the input size, normalisation or class names exported a model whose metadata
    said `[]` (and whose evaluation then failed with an AssertionError); invalid JSON was called a
    missing num_classes."""
    run = tmp_path / "run"
    shutil.copytree(runs["torch"], run)
    path = run / "summary.json"
    if damage is None:
        path.write_text(path.read_text()[:-20])
    else:
        summary = json.loads(path.read_text())
        damage(summary)
        path.write_text(json.dumps(summary))
    for args in (["export", str(run), "--out", str(tmp_path / "m.onnx")], ["eval", str(run)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        assert fragment in _err(res) and "rerun the training" in _err(res), _err(res)
        assert len(_err(res).splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_a_finished_run_without_its_weights_says_they_are_gone(runs, tmp_path):
    """A finished run whose final_model.safetensors was deleted was called unfinished, and told to
    resume, which found it finished: advice that went round in a circle."""
    run = tmp_path / "run"
    shutil.copytree(runs["torch"], run)
    (run / "final_model.safetensors").unlink()
    for args in (["export", str(run), "--out", str(tmp_path / "m.onnx")], ["eval", str(run)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        assert f"run {run} finished, but its fine-tuned weights" in _err(res) and "are gone" in _err(res)
        assert "--resume" not in _err(res) and len(_err(res).splitlines()) == 1


@pytest.mark.parametrize("text,says", [("", "is empty"),
                                       ("data:\n  spec: digits\n", "lacks its model, policy, train sections")])
def test_a_damaged_run_config_is_refused_not_read_as_the_defaults(runs, tmp_path, text, says):
    """An emptied config.yaml read as the defaults: export wrote a model under the demo's data and the
    paper's token score, eval blamed the image folder; resume and the trace replay read it alike."""
    run = tmp_path / "run"
    shutil.copytree(runs["torch"], run)
    (run / "config.yaml").write_text(text)
    for args in (["export", str(run), "--out", str(tmp_path / "m.onnx")], ["eval", str(run)],
                 ["train", "--resume", "--out", str(run)], ["plan", "--trace", str(run)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        assert f"{run / 'config.yaml'} {says}: it is not the config the run saved" in _err(res), (args, _err(res))
        assert len(_err(res).splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_paths_print_as_they_are_not_as_markup_or_emoji(tmp_path):
    """rich read the user's paths as markup and emoji codes: a folder `zero` printed as
    `imagefolder0️⃣`, `[bold]x` as `x`, a run directory `[red]r` as `r` (a path that does not exist)."""
    from tests.alast_cli.test_bad_input import make_image_folder

    data, run = make_image_folder(tmp_path / "[bold]zero" / "zero"), tmp_path / "[red]r"
    res = CliRunner().invoke(cli, ["train", "--data", f"imagefolder:{data}", "--steps", "1", "--batch-size", "4",
                                   "--set", "backend.threads=1", "--set", "backend.count_flops=off", "--out", str(run)])
    assert res.exit_code == 0, res.output
    table = " ".join(res.stdout.split())  # the run dir's cell may wrap
    assert f"alast on alast_demo_vit / imagefolder:{data}" in table and "[red]r" in table
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", f"imagefolder:{data}"])
    assert res.exit_code == 0, res.output
    assert f"run {run} on imagefolder:{data}: accuracy" in " ".join(res.stdout.split()), res.stdout


def test_a_copy_of_the_runs_folder_is_scored_on_the_runs_split(tmp_path):
    """`eval --data imagefolder:COPY` of the folder a run split scored every image of the copy, the
    ones the run trained on too; the same files under another path now get the run's split."""
    from tests.alast_cli.test_bad_input import make_image_folder

    data, run = make_image_folder(tmp_path / "data"), tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--data", f"imagefolder:{data}", "--steps", "1", "--batch-size", "4",
                                   "--set", "backend.threads=1", "--set", "backend.count_flops=off", "--out", str(run)])
    assert res.exit_code == 0, res.output
    own = json.loads(CliRunner().invoke(cli, ["eval", str(run), "--json"]).stdout)
    copy = shutil.copytree(data, tmp_path / "copy")
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", f"imagefolder:{copy}", "--json"])
    assert res.exit_code == 0, res.output
    assert {k: json.loads(res.stdout)[k] for k in ("accuracy", "loss", "samples")} == \
        {k: own[k] for k in ("accuracy", "loss", "samples")} and own["samples"] < 12
    assert f"{copy} holds the files the run split by data.val_fraction: scoring its validation split" in res.stderr
    shutil.copy(copy / "cat" / "0.png", copy / "cat" / "new.png")  # other files: other data, scored whole
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", f"imagefolder:{copy}", "--json"])
    assert json.loads(res.stdout)["samples"] == 13 and "evaluating on every image" in res.stderr


def test_a_test_folder_named_as_the_runs_is_scored_whole(tmp_path):
    """A separate test folder whose files bear the training folder's names (cat/0.png, ...) was taken
    for the run's folder: only its "validation split" was scored. The same names holding other images
    (here of the same file sizes) are another folder, scored whole, by the run and by its ONNX export."""
    from PIL import Image

    from tests.alast_cli.test_bad_input import make_image_folder

    data, run = make_image_folder(tmp_path / "data"), tmp_path / "run"
    test = shutil.copytree(data, tmp_path / "test")
    for f in test.rglob("*.png"):
        r, g, b = Image.open(f).getpixel((0, 0))
        Image.new("RGB", (32, 32), (g, b, r)).save(f)
    assert sorted(f.stat().st_size for f in test.rglob("*.png")) == sorted(f.stat().st_size for f in data.rglob("*.png"))
    res = CliRunner().invoke(cli, ["train", "--data", f"imagefolder:{data}", "--steps", "1", "--batch-size", "4",
                                   "--set", "backend.threads=1", "--set", "backend.count_flops=off", "--out", str(run)])
    assert res.exit_code == 0, res.output
    onnx = tmp_path / "m.onnx"
    assert CliRunner().invoke(cli, ["export", str(run), "--out", str(onnx)]).exit_code == 0
    for scored in (run, onnx):
        res = CliRunner().invoke(cli, ["eval", str(scored), "--data", f"imagefolder:{test}", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout.strip().splitlines()[-1])["samples"] == 12, res.stderr
        assert scored == onnx or f"evaluating on every image in {test} (12)" in res.stderr  # notes: once a process


def test_onnx_eval_json_reports_the_token_schedule_as_the_run_eval_does(runs, tmp_path):
    """`eval model.onnx --json` lacked kept_tokens, which `eval RUN --json` reports; the ONNX file's
    metadata holds it: the deployed schedule, or null for an --all-tokens export."""
    for flags in ([], ["--all-tokens"]):
        out = tmp_path / f"m{len(flags)}.onnx"
        assert CliRunner().invoke(cli, ["export", str(runs["torch"]), "--out", str(out), *flags]).exit_code == 0
        a = CliRunner().invoke(cli, ["eval", str(runs["torch"]), "--json", *flags])
        b = CliRunner().invoke(cli, ["eval", str(out), "--json"])
        assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
        ra, rb = json.loads(a.stdout.strip().splitlines()[-1]), json.loads(b.stdout.strip().splitlines()[-1])
        assert "kept_tokens" in rb and rb["kept_tokens"] == ra["kept_tokens"]
        assert (rb["kept_tokens"] is None) == bool(flags)
        assert rb["kept_tokens"] is None or all(isinstance(k, int) for k in rb["kept_tokens"])
