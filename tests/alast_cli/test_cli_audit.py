"""Bad input found by a CLI audit: each refused up front in one line (exit 2), before any work.

Ignored options (``plan --trace``), unwritable outputs, impossible export settings, conflicting
config keys, config messages that named the wrong thing, help texts, and usage errors.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from alast.config import ConfigError, PolicyConfig, load_config
from alast_cli.errors import describe
from alast_cli.main import cli
from alast_cli.options import resolve_config
from tests.cli_errors import one_error_line
from tests.conftest import SMALL_VAL

DOCS = Path(__file__).resolve().parents[2] / "docs" / "usage.md"


def run_cli(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    """A regular file where an output's folder should be."""
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A folder named as a run: the checks under test come before the run is read."""
    path = tmp_path / "run"
    path.mkdir()
    return path


# -- 1. plan --trace replays the run's config: config input beside it is refused -----------------
@pytest.mark.parametrize("extra, dropped", [
    (["{tmp}/nonexist.yaml"], "CONFIG"),
    (["--set", "bogus.key=1"], "--set"),
    (["--policy", "nonsense"], "--policy"),
    (["--target-flops", "0.5"], "--target-flops"),
    (["--steps", "3"], "--steps"),
    (["--model", "vit_tiny_patch16_224"], "--model"),
    (["--no-pretrained"], "--no-pretrained"),
])
def test_trace_refuses_config_input(tmp_path, run_dir, extra, dropped):
    args = ["plan", "--trace", run_dir, *(a.format(tmp=tmp_path) for a in extra)]
    line = one_error_line(run_cli(args), 2, "--trace replays RUN's own config; drop", dropped)
    assert "not a run" not in line and "no metrics" not in line


def test_trace_names_every_ignored_option(run_dir):
    line = one_error_line(run_cli(["plan", "x.yaml", "--trace", run_dir, "--set", "a.b=1", "--policy", "p"]), 2)
    assert line.endswith("drop CONFIG (x.yaml), --set, --policy")


def test_throughput_and_calibrate_are_refused_together():
    one_error_line(run_cli(["plan", "--throughput", "1e10", "--calibrate"]), 2, "--throughput", "--calibrate",
                   "drop one")


# -- 2. an output that cannot be written is refused up front, naming the user's path --------------
def _output_commands(afile: Path, run_dir: Path, out: str) -> dict[str, list]:
    return {
        "export --out": ["export", run_dir, "--out", f"{out}/x.onnx"],
        "profile --out": ["profile", "alast_demo_vit", "--out", f"{out}/c.json"],
        "plan --plot": ["plan", "--plot", f"{out}/p.png"],
        "bench --out": ["bench", "--policies", "full", "--steps", "2", "--out", f"{out}/b"],
    }


@pytest.mark.parametrize("command", ["export --out", "profile --out", "plan --plot", "bench --out"])
def test_an_output_under_a_file_is_refused(afile, run_dir, command):
    args = _output_commands(afile, run_dir, str(afile))[command]
    option = command.split()[1]
    one_error_line(run_cli(args), 2, f"cannot write {option} {afile}/", f"{afile} is a file, not a folder",
                   f"choose a writable {option}")


@pytest.mark.parametrize("command", ["export --out", "profile --out", "plan --plot", "bench --out"])
def test_an_output_where_no_file_can_be_made_names_the_users_path(tmp_path, afile, run_dir, monkeypatch, command):
    """/proc, FUSE and network file systems: permissions say yes, creating a file fails."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(locked):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    args = _output_commands(afile, run_dir, str(locked))[command]
    option = command.split()[1]
    line = one_error_line(run_cli(args), 2, f"cannot write {option} {locked}/", "no such file or directory",
                          f"choose a writable {option}")
    assert ".tmp" not in line and list(locked.iterdir()) == []


def test_an_output_on_a_read_only_file_system_is_refused(tmp_path, run_dir, monkeypatch):
    mnt = tmp_path / "romnt"
    mnt.mkdir()
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        return SimpleNamespace(f_flag=st.f_flag | os.ST_RDONLY) if Path(path).resolve().is_relative_to(mnt) else st

    monkeypatch.setattr(os, "statvfs", statvfs)
    one_error_line(run_cli(["export", run_dir, "--out", mnt / "sub" / "x.onnx"]), 2,
                   f"cannot write --out {mnt}/sub/x.onnx (read-only file system)")


# -- 3. export settings no export can use -------------------------------------------------------------
@pytest.mark.parametrize("atol", ["0", "-1", "nan", "inf"])
def test_export_refuses_an_atol_at_or_below_zero_or_infinite(tmp_path, run_dir, atol):
    one_error_line(run_cli(["export", run_dir, "--out", tmp_path / "o.onnx", "--atol", atol]), 2,
                   "--atol must be a finite number above 0")
    assert not (tmp_path / "o.onnx").exists()


def test_the_configs_opset_bound_is_the_exporters():
    from alast.config import MIN_OPSET
    from alast.export import MIN_OPSET as EXPORT_MIN_OPSET

    assert MIN_OPSET == EXPORT_MIN_OPSET  # until alast.export imports the config's
    with pytest.raises(ConfigError, match=f"'export.opset': must be {MIN_OPSET} or more"):
        load_config(None, [f"export.opset={MIN_OPSET - 1}"])
    assert load_config(None, [f"export.opset={MIN_OPSET}"]).export.opset == MIN_OPSET


# -- 4. train.steps and train.epochs: one of them -----------------------------------------------------
def test_steps_and_epochs_both_set_are_refused(tmp_path):
    one_error_line(run_cli(["plan", "--epochs", "1", "--set", "train.steps=7", "--json"]), 2,
                   "train.steps (7) and train.epochs (1.0) are both set", "null")
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  steps: 7\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="train.steps .* and train.epochs .* both set; set one of them to null"):
        load_config(both)


def test_steps_null_without_epochs_is_refused_in_one_line(tmp_path):
    """``train.steps`` null and no ``train.epochs`` reached ``int(None)``: "error: int() argument must be
    ...", exit 1, and a bench left its files behind."""
    for args in (["train", "--set", "train.steps=null", "--out", str(tmp_path / "run")],
                 ["bench", "--set", "train.steps=", "--out", str(tmp_path / "bench")], ["plan", "--set", "train.steps="]):
        one_error_line(run_cli(args), 2, "train.steps is null and train.epochs is not set: set one of them")
    assert not (tmp_path / "run").exists() and not (tmp_path / "bench").exists()
    cfg = load_config(None, ["train.steps=null", "train.epochs=2"])
    assert (cfg.train.steps, cfg.train.epochs) == (None, 2)


def test_plan_refuses_epochs_of_a_batch_the_data_cannot_fill():
    """`alast plan --epochs` priced "1 steps at batch 64" of a training set that `alast train` refuses."""
    for args in (["--data", "random:5", "--epochs", "1"], ["--data", "random:80", "--epochs", "2", "--batch-size", "128"]):
        one_error_line(run_cli(["plan", *args, "--set", "backend.threads=1"]), 2, "exceeds the", "training images",
                       "lower --batch-size")


def test_a_named_steps_or_epochs_replaces_the_config_files_other(tmp_path):
    epochs = tmp_path / "epochs.yaml"
    epochs.write_text("train:\n  epochs: 2\n")
    cfg = resolve_config(epochs, (), steps=5)
    assert (cfg.train.steps, cfg.train.epochs) == (5, None)
    steps = tmp_path / "steps.yaml"
    steps.write_text("train:\n  steps: 9\n")
    cfg = resolve_config(steps, (), epochs=1.5)
    assert (cfg.train.steps, cfg.train.epochs) == (None, 1.5)


# -- 5. config messages name what the user wrote ------------------------------------------------------
def test_a_section_given_a_value_names_the_files_key(tmp_path):
    path = tmp_path / "t5.yaml"
    path.write_text("train: 5\n")
    line = one_error_line(run_cli(["plan", path, "--steps", "2"]), 2, f"'train' in {path} must be a section")
    assert "null" not in line


def test_a_value_set_as_a_section_says_it_is_a_value():
    with pytest.raises(ConfigError, match=r"'train.steps' is a value, not a section; set it with --set train.steps="):
        load_config(None, ["train.steps.x=3"])


def test_a_python_tag_in_yaml_is_named(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("train:\n  steps: !!python/object/apply:os.system [\"echo hi\"]\n")
    with pytest.raises(ConfigError, match="tags that build Python objects .* are not allowed") as info:
        load_config(path)
    assert "syntax" not in str(info.value)
    with pytest.raises(ConfigError, match="tags that build Python objects .* are not allowed"):
        load_config(None, ['train.steps=!!python/object/apply:os.system ["echo"]'])


def test_an_empty_section_means_its_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("policy:\ntrain:\n  steps: 4\n")
    cfg = load_config(path, ["policy.name=full"])
    assert cfg.policy.model_dump() == PolicyConfig(name="full").model_dump() and cfg.train.steps == 4
    assert load_config(path).policy == PolicyConfig()


@pytest.mark.parametrize("override", ["policy.b_min=0.95", "policy.dense_final_interleave=1"])
def test_pydantics_value_error_prefix_is_stripped(override):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert "Value error" not in str(info.value)


def test_a_keep_ratio_of_the_wrong_length_names_the_key():
    from planners import PlannerError, create_planner

    with pytest.raises(PlannerError) as info:
        create_planner("tokens", 6, keep_ratio=[0.5, 0.6])
    code, line = describe(info.value)
    assert code == 2 and line.startswith("error: policy.keep_ratio has 2 entries for 6 blocks; give one value for all blocks")


# -- 6. help and docs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "plan", "bench"])
def test_help_lists_every_data_spec_and_the_shipped_backbone(command):
    out = " ".join(run_cli([command, "--help"]).output.split())
    for spec in ("digits", "shapes", "letters", "imagefolder:PATH", "torchvision:NAME", "random[:N]"):
        assert spec in out, spec
    assert "shipped backbone for alast_demo_vit / alast_vit12 (default: on)" in out


def test_docs_show_benchs_seed_default():
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `alast bench"))
    assert "--seeds 3" not in row and "(default 1)" in row


# -- 7. one line for usage errors, no blank line before an error, hints --------------------------
@pytest.mark.parametrize("args, needle", [
    (["train", "--nproc", "0"], "'--nproc'"),
    (["bench", "--seeds", "0"], "--seeds must be 1 or more"),
    (["plan", "--bogus"], "--bogus"),
    (["--bogus"], "--bogus"),
])
def test_usage_errors_are_one_line(args, needle):
    res = run_cli(args)
    line = one_error_line(res, 2, needle)
    assert res.stderr.strip() == line and "Usage:" not in res.output


def test_a_progress_stopped_before_its_first_step_prints_nothing(capsys):
    from alast_cli.render import make_progress

    with pytest.raises(ValueError), make_progress():
        raise ValueError("bad input")
    assert capsys.readouterr().err == ""


def test_export_of_a_missing_run_says_what_to_give(tmp_path):
    one_error_line(run_cli(["export", tmp_path / "nope", "--out", tmp_path / "x.onnx"]), 2,
                   "run directory not found", "alast train")


def test_an_unknown_policy_names_the_option_and_the_closest_name():
    one_error_line(run_cli(["plan", "--policy", "alsat"]), 2, "in --policy", "did you mean 'alast'")
    one_error_line(run_cli(["plan", "--set", "policy.name=alsat"]), 2, "in policy.name")


def test_a_plot_format_matplotlib_cannot_write_is_refused_up_front(tmp_path):
    one_error_line(run_cli(["plan", "--plot", tmp_path / "p.txt"]), 2, "cannot write a .txt figure", ".png", ".svg")
    assert list(tmp_path.iterdir()) == []


def test_the_configs_atol_is_finite():
    from alast.config import load_config

    with pytest.raises(Exception, match="export.atol.*finite"):
        load_config(None, ["export.atol=inf"])


@pytest.mark.parametrize("args, message", [
    (["--model", "alast_vit12", "--set", "model.name=alast_demo_vit"], "--model and --set model.name both given"),
    (["--set", "policy.name=tokens", "--policy", "freeze"], "--policy and --set policy.name both given"),
    (["--target-flops", "0.4", "--set", "policy.target_flops=0.5"],
     "--target-flops and --set policy.target_flops both given"),
    (["--batch-size", "8", "--set", " train.batch_size=16"], "--batch-size and --set train.batch_size both given"),
])
def test_a_named_option_and_a_set_of_its_key_are_refused(args, message):
    """The --set silently won over the named option, in either order: `--model X` planned another model."""
    one_error_line(run_cli(["plan", *args]), 2, message)


@pytest.mark.parametrize("throughput", ["inf", "nan", "0"])
def test_plan_refuses_a_throughput_that_is_not_finite_and_positive(throughput, monkeypatch):
    """Before the model is profiled: it was refused only once the plan was made."""
    from alast.planning import profile

    def profiled(*a, **k):
        raise AssertionError("profiled")

    monkeypatch.setattr(profile, "profile_model", profiled)
    monkeypatch.setattr(profile.profile_cache, "read", lambda key: None)
    one_error_line(run_cli(["plan", "--throughput", throughput]), 2, "throughput must be a finite number > 0")


@pytest.mark.parametrize("setting", ["train.steps=true", "train.lr=false", "policy.k_trained=true"])
def test_true_or_false_for_a_number_is_refused(setting):
    """pydantic's lax mode read `train.steps=true` as one step."""
    one_error_line(run_cli(["plan", "--set", setting]), 2, f"invalid value for '{setting.split('=')[0]}'",
                   "a number is expected, not true or false")


@pytest.mark.parametrize("args, message", [
    (["--skip-bad-images", "--set", "data.skip_bad_images=false"], "--skip-bad-images and --set data.skip_bad_images"),
    (["--force", "--set", "output.force=false"], "--force and --set output.force"),
    (["--out", "{tmp}/a", "--set", "output.dir={tmp}/b"], "--out and --set output.dir"),
])
def test_a_train_flag_and_a_set_of_its_key_to_another_value_are_refused(tmp_path, args, message):
    """The flag silently won: `--skip-bad-images --set data.skip_bad_images=false` skipped."""
    args = [a.format(tmp=tmp_path) for a in args]
    one_error_line(run_cli(["train", "--steps", "1", *args]), 2, f"{message} give it two values; pass one of them")
    assert not any(tmp_path.iterdir())  # no run started


def test_a_train_flag_and_a_set_that_agree_are_accepted(tmp_path):
    """--nproc hands its ranks the --out it chose beside the --set that named it."""
    out = tmp_path / "run"
    res = run_cli(["train", *SMALL_VAL, "--steps", "1", "--batch-size", "4", "--set", "backend.threads=1", "--set",
                   'backend.count_flops="off"', "--out", out, "--set", f"output.dir={out}", "--skip-bad-images",
                   "--set", "data.skip_bad_images=true"])
    assert res.exit_code == 0, res.output
    assert (out / "summary.json").is_file()


def test_alast_without_a_command_takes_trains_options(tmp_path):
    """`alast` is the demo (`alast train`): `alast --steps 1` was "No such option '--steps'"."""
    out = tmp_path / "run"
    res = run_cli(["--steps", "1", "--batch-size", "4", "--set", "backend.threads=1", "--set",
                   'backend.count_flops="off"', *SMALL_VAL, "--out", out])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    one_error_line(run_cli(["--stepz", "1"]), 2, "No such option '--stepz'", "train --help`")
    assert "[OPTIONS] [COMMAND]" in run_cli(["--help"]).output  # alast's own help, not train's


@pytest.mark.parametrize("args, message", [
    # plan exited 0 with a plan for a folder that is not there (train refuses it)
    (["plan", "--data", "imagefolder:{tmp}/nope"], "image folder not found: {tmp}/nope"),
    (["plan", "--data", "imagefolder:{tmp}/afile"], "image folder is a file, not a folder: {tmp}/afile"),
    # was "invalid literal for int() with base 10: 'abc'"
    (["train", "--data", "random:abc", "--steps", "1"], "data spec 'random:abc': N in random:N is a number of images"),
    # trained on the whole built-in task, the value ignored
    (["train", "--data", "digits:3", "--steps", "1"], "data spec 'digits:3': the built-in digits task takes no value"),
    (["plan", "--data", "letters:"], "data spec 'letters:': the built-in letters task takes no value"),
    # NaN trained until the loss was NaN (--lr nan), or was called "less than or equal to 1" (--target-flops)
    (["train", "--lr", "nan", "--steps", "1"], "invalid value for 'train.lr': Input should be a finite number"),
    (["plan", "--target-flops", "nan"], "invalid value for 'policy.target_flops': Input should be a finite number"),
    # an empty path was the current folder (Path("") is "."): a run written into it, a config read from it
    (["train", "--out", "", "--steps", "1"], "Invalid value for '--out': is empty; give a path"),
    (["plan", " ", "--steps", "1"], "Invalid value for '[CONFIG]': is empty; give a path"),
    (["export", "{tmp}", "--out", ""], "Invalid value for '--out': is empty; give a path"),
    # was "trace run dir not found" for a path that is there
    (["plan", "--trace", "{tmp}/afile"], "trace run dir is a file: {tmp}/afile"),
    # was "...: IndexError; is it a complete .safetensors/.pth file?"
    (["train", "--checkpoint", "{tmp}/afile", "--steps", "1"], "cannot read checkpoint {tmp}/afile as weights (torch.load failed"),
    # `train --help` lists no config keys
    (["plan", "--set", "train.stepz=3"], "check the spelling (every key: docs/usage.md#configuration"),
])
def test_audited_messages_name_the_problem(tmp_path, args, message):
    (tmp_path / "afile").write_text("a: 1\n")
    one_error_line(run_cli([a.format(tmp=tmp_path) for a in args]), 2, message.format(tmp=tmp_path))


def test_eval_refuses_a_data_dir_nothing_reads(tmp_path):
    """`eval RUN --data-dir DIR` of a run on digits scored digits and ignored DIR without a word."""
    run = tmp_path / "run"
    res = run_cli(["train", *SMALL_VAL, "--steps", "1", "--batch-size", "4", "--set", "backend.threads=1", "--set",
                   'backend.count_flops="off"', "--out", run])
    assert res.exit_code == 0, res.output
    one_error_line(run_cli(["eval", run, "--data-dir", tmp_path]), 2,
                   "--data-dir applies to torchvision:NAME data only, not to digits; drop it")


def test_a_training_checkpoint_as_weights_names_resume_and_the_final_weights(tmp_path):
    """`--checkpoint RUN/checkpoints/step_N.safetensors` said "missing ['cls_token', 'pos_embed', ...]":
    the run's state is under other keys. It names the two things the user may have meant."""
    from alast.models import CHECKPOINT_FORMAT
    from alast.training.checkpoint import FORMAT

    assert CHECKPOINT_FORMAT == FORMAT
    run = tmp_path / "run"
    res = run_cli(["train", *SMALL_VAL, "--steps", "1", "--batch-size", "4", "--set", "backend.threads=1", "--set",
                   "backend.count_flops=off", "--out", run])
    assert res.exit_code == 0, res.output
    ckpt = next((run / "checkpoints").glob("step_*.safetensors"))
    one_error_line(run_cli(["train", "--checkpoint", ckpt, "--steps", "1", "--out", tmp_path / "again"]), 2,
                   f"{ckpt} is a training checkpoint of the run {run}, not weights",
                   f"alast train --resume --out {run}", f"--checkpoint {run / 'final_model.safetensors'}")
