"""benchmarks/flop_counting.py runs `alast train` with and without FLOP counting (and in another
checkout) end to end, and reports counted steps that the runs' own counts bear out."""
from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark

TRAIN = ["--steps", "3", "--batch-size", "4", "--target-flops", "0.5", "--set", "backend.threads=1", "--set",
         "data.val_fraction=0.05"]


@pytest.fixture
def bench():
    return load_benchmark("flop_counting")


@pytest.mark.slow  # two `alast train` processes; the script's arguments: test_refusals
def test_counting_against_off(bench, tmp_path):
    """Two real runs (`--base` adds a third, the same command in another checkout)."""
    out = tmp_path / "fc.json"
    record = bench.main(["--rounds", "1", "--out", str(out), "--", *TRAIN])
    assert json.loads(out.read_text()) == record
    med = record["medians"]
    assert set(med) == {"counting", "off"} and med["off"]["counted_steps"] == 0
    assert 1 <= med["counting"]["counted_steps"] <= 3  # the first step is always counted
    assert record["runs"]["counting"][0]["train_flops"] > 0 and record["runs"]["off"][0]["train_flops"] is None


def test_refusals(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "1"])  # no `alast train` arguments
    with pytest.raises(SystemExit):
        bench.main(["--base", str(tmp_path), "--", *TRAIN])  # not a checkout
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "old.json"), "--", *TRAIN])  # nothing overwritten
    assert (tmp_path / "old.json").read_text() == "{}"


def test_the_solve_audit_counts_every_solved_step_afresh(tmp_path):
    audit = load_benchmark("flop_solve_audit")
    out = tmp_path / "audit.json"
    (row,) = audit.main(["--models", "alast_demo_vit", "--steps", "12", "--batch-size", "1", "--low", "0.3", "--reference-batch", "2",
                         "--out", str(out)])
    assert row["counted"] + row["solved"] == 12 and row["solved"] > 0 and row["max_rel_difference"] == 0
    assert row["reference_flops"] == row["real_step_flops"] > 0  # on fake tensors as on a real step
    assert json.loads(out.read_text())["rows"] == [row]
