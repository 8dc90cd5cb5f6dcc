"""`alast profile`'s options: bad values are refused in one line before anything is profiled."""
import pytest
from click.testing import CliRunner

from alast_cli.main import cli
from tests.cli_errors import one_error_line


@pytest.mark.parametrize("args,fragment", [
    (["--calibrate", "--batch-size", "0"], "--batch-size must be 1 or more, got 0"),
    (["--calibrate", "--batch-size", "-3"], "--batch-size must be 1 or more, got -3"),
    (["--num-classes", "0"], "--num-classes must be 1 or more, got 0"),
    (["--num-classes", "-2"], "--num-classes must be 1 or more, got -2"),
])
def test_bad_counts_are_refused_before_profiling(tmp_path, monkeypatch, args, fragment):
    import alast.planning.profile as prof

    monkeypatch.setattr(prof, "profile", lambda *a, **k: pytest.fail("profiled a bad option"))
    out = tmp_path / "cost.json"
    res = CliRunner().invoke(cli, ["profile", "alast_demo_vit", *args, "--out", str(out)])
    one_error_line(res, 2, fragment)
    assert not out.exists()
