"""Reading a run directory never runs code: planted pickles are refused, never unpickled.

Every crafted file below would run ``touch MARKER`` if anything unpickled it (a positive control
proves it does); each test asserts the marker never appears and the refusal is one line.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alast.training import checkpoint as ckpt
from alast.training.safe_state import TAG, UnsupportedValue, flatten, unflatten
from alast_cli.main import cli
from tests.cli_errors import one_error_line

FAST = ["--batch-size", "4", "--set", 'backend.count_flops="off"', "--set", "backend.threads=1",
        "--set", "data.val_fraction=0.05"]  # a small held-out split: the evaluations cost less


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_pickle(marker: Path) -> bytes:
    """What an old ``step_*.pt`` looks like (torch.save: zip + pickle), with a payload."""
    buf = io.BytesIO()
    torch.save({"step": 10, "x": _Evil(marker)}, buf)
    return buf.getvalue()


def raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"step": 10, "x": _Evil(marker)})


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


def test_the_payloads_really_run_code_when_unpickled(marker):
    """Positive control: without it the tests below could pass with a harmless payload."""
    pickle.loads(raw_pickle(marker))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_pickle(marker)), weights_only=False)
    assert marker.exists()


# -- round trip ------------------------------------------------------------------------------
def assert_identical(a, b, where="state"):
    """Equal values and equal types, all the way down (tensors: dtype, shape and bits)."""
    assert type(a) is type(b) or (type(a) is OrderedDict and type(b) is dict), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(list(b)[list(a).index(k)]), (where, k)
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def nested_state() -> dict:
    w = torch.randn(4, 4)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "tensors": {"bf16": torch.randn(3, 5).bfloat16(), "int64": torch.arange(-3, 4), "uint8": torch.tensor(
            [0, 255], dtype=torch.uint8), "empty": torch.empty(0, 7), "empty_int": torch.zeros(0, dtype=torch.int64),
            "scalar": torch.tensor(2.5), "bool": torch.tensor([True, False])},
        "shared": [w, w, w[1], w.t()],  # one storage four times: safetensors alone would refuse
        "optimizer": opt.state_dict(),  # int keys, tuple betas, 0-d step tensors
        "model": model.state_dict(),  # an OrderedDict
        "odd_keys": {1: "int", (2, "x"): "tuple", None: "none", 2.5: "float"},
        TAG: {TAG: "looks like an encoded node, is not"},
        "plain": [None, True, 0, -1, 2**62, 1.5, -0.0, float("inf"), float("nan"), "s", "", [], {}, ()],
        "numpy": {"f32": np.float32(0.1), "i64": np.int64(-7), "bool": np.bool_(True), "arr": np.arange(6).reshape(2, 3),
                  "u32": np.array([1, 2**32 - 1], dtype=np.uint32), "empty": np.zeros((0, 2))},
    }


def test_checkpoint_round_trips_a_nested_state_exactly(tmp_path):
    state = nested_state()
    path = ckpt.save_checkpoint(tmp_path, 7, state, keep_last=2)
    assert path.name == "step_00000007.safetensors"
    back = ckpt.load_checkpoint(path)
    assert_identical(state, back)
    # the RNG states are accepted by their setters and continue the same streams
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])
    drawn = random.random(), np.random.rand(), torch.rand(1)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    assert drawn == (random.random(), np.random.rand(), torch.rand(1))


def test_flatten_keeps_tensors_out_of_the_json_tree():
    tensors, tree = flatten({"a": {"w": torch.ones(2)}, "t": (1, torch.zeros(1))})
    assert set(tensors) == {"a.w", "t[1]"}
    assert tree == {"a": {"w": {TAG: "tensor", "key": "a.w"}},
                    "t": {TAG: "tuple", "items": [1, {TAG: "tensor", "key": "t[1]"}]}}
    assert_identical(unflatten(tree, tensors), {"a": {"w": torch.ones(2)}, "t": (1, torch.zeros(1))})


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", torch.float32, np.array([object()]), lambda: 0])
def test_an_arbitrary_object_is_refused_at_save_time_naming_its_key(tmp_path, bad):
    with pytest.raises(UnsupportedValue, match=r"runtime\.optimizer\.state\[1\]"):
        ckpt.save_checkpoint(tmp_path, 1, {"runtime": {"optimizer": {"state": [0, bad]}}}, keep_last=2)
    assert ckpt.list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".*.tmp"))


# -- crafted files under every name a reader opens --------------------------------------------
@pytest.mark.parametrize("name,payload,says", [
    ("step_00000010.pt", torch_pickle, "torch.save"),  # a checkpoint from an older alast
    ("step_00000010.pt", raw_pickle, "pickle"),
    ("step_00000010.safetensors", raw_pickle, "pickle"),  # planted under the new name
    ("step_00000010.safetensors", torch_pickle, "torch.save"),
])
def test_load_checkpoint_refuses_pickles_without_unpickling(tmp_path, marker, name, payload, says):
    path = tmp_path / name
    path.write_bytes(payload(marker))
    with pytest.raises(ckpt.CheckpointRefused) as err:
        ckpt.load_checkpoint(path)
    assert str(path) in str(err.value) and says in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real 4-step run with safe checkpoints after steps 2 and 4."""
    run = tmp_path_factory.mktemp("safe") / "run"
    res = CliRunner().invoke(cli, ["train", "--steps", "4", *FAST, "--set", "output.checkpoint_every=2",
                                   "--out", str(run)])
    assert res.exit_code == 0, res.output
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_00000002.safetensors", "step_00000004.safetensors"]
    return run


def unfinished_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the run without its summary, as if stopped in its final evaluation: resume reads its
    checkpoints (a finished run's are left unread)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    return run


@pytest.mark.parametrize("name,payload", [("step_00000003.pt", torch_pickle),
                                          ("step_00000003.safetensors", raw_pickle)])
def test_resume_with_only_a_planted_checkpoint_is_refused_in_one_line(finished_run, tmp_path, marker, name,
                                                                     payload):
    run = unfinished_copy(finished_run, tmp_path)
    for old in ckpt.list_checkpoints(run):
        old.unlink()
    (run / "checkpoints" / name).write_bytes(payload(marker))
    res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run)])
    line = one_error_line(res, 2)
    assert name in line and "cannot resume" in line and "another --out" in line
    assert not marker.exists()


def test_resume_skips_a_planted_newer_pickle_with_a_warning(finished_run, tmp_path, marker):
    """An older safe checkpoint beside it: resume falls back to it, says so, never opens the pickle."""
    run = unfinished_copy(finished_run, tmp_path)
    (run / "checkpoints" / "step_00000004.safetensors").unlink()
    (run / "checkpoints" / "step_00000003.pt").write_bytes(torch_pickle(marker))
    res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(run), "--json"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_00000003.pt" in warnings[0] and "step_00000002.safetensors" in warnings[0]
    assert not marker.exists()
    assert '"resumed_from_step": 2' in res.stdout


def test_run_dir_readers_refuse_planted_files(finished_run, tmp_path, marker):
    """`alast export`/`eval` read config.yaml (YAML, safe loader) and final_model.safetensors."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "final_model.safetensors").write_bytes(torch_pickle(marker))
    for command in (["export", str(run), "--out", str(tmp_path / "m.onnx")], ["eval", str(run)]):
        line = one_error_line(CliRunner().invoke(cli, command), 2)
        assert "final_model.safetensors" in line
    (run / "config.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    for command in (["export", str(run), "--out", str(tmp_path / "m.onnx")], ["eval", str(run)],
                    ["train", "--resume", "--out", str(run)]):
        one_error_line(CliRunner().invoke(cli, command), 2)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_rank_results_are_read_without_unpickling_code(tmp_path, marker):
    from runtimes.distributed import read_rank_results

    torch.save({"loss": [1.0, 2.0], "trained": (0, 1), "w": torch.ones(2)}, tmp_path / "rank0.pt")
    (tmp_path / "rank1.pt").write_bytes(torch_pickle(marker))
    with pytest.raises(RuntimeError, match="rank 1's result .*rank1.pt .*refused"):
        read_rank_results(str(tmp_path), 2)
    assert read_rank_results(str(tmp_path), 1)[0]["trained"] == (0, 1)
    (tmp_path / "rank0.pt").write_bytes(raw_pickle(marker))
    with pytest.raises(RuntimeError, match="refused"):
        read_rank_results(str(tmp_path), 1)
    assert not marker.exists()
