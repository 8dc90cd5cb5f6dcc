"""Run directories and configs written before the pipeline moved to ``alast/`` keep working.

The fixture holds the text files of a 4-step demo run made by alast 0.1.0 with the previous
layout (``runtimes/``): its config.yaml (without the keys added since), metrics.jsonl and
summary.json. Its weights are the demo model's, in the same safetensors layout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from alast.config import load_config
from alast.config_schema import TOKEN_TEMPERATURE
from alast.models import build_demo_model
from alast.training.resume import saved_config
from alast_cli.main import cli

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"
DEFAULT_PERIOD = 2  # today's policy.dense_final_interleave


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "old_run"
    shutil.copytree(FIXTURE, run)
    summary = json.loads((run / "summary.json").read_text())
    model = build_demo_model(summary["num_classes"], pretrained=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "final_model.safetensors"))
    return run


def test_old_config_loads_with_todays_defaults_for_new_keys():
    cfg = load_config(FIXTURE / "config.yaml")
    assert cfg.train.steps == 4 and cfg.output.checkpoint_every == 2
    assert cfg.policy.rule == "normalized" and cfg.output.tensorboard is False
    assert (cfg.policy.token_select, cfg.policy.token_score) == ("sample", "contribution")
    # as a run's config, the keys whose default changed since take the values it was trained with
    saved = saved_config(FIXTURE).model_dump()
    assert (saved["policy"]["token_select"], saved["policy"]["token_score"]) == ("top", "attention")
    assert saved["policy"]["trim_last"] is False and cfg.policy.trim_last is True
    assert saved["policy"]["spare_first"] == 0 and cfg.policy.spare_first == "frozen"
    assert saved["policy"]["early_frac"] == 0.0 and cfg.policy.early_frac is None
    assert saved["policy"]["dense_final_interleave"] == 0 and cfg.policy.dense_final_interleave == DEFAULT_PERIOD
    assert saved["policy"]["token_temperature"] == 1.0 and cfg.policy.token_temperature == TOKEN_TEMPERATURE
    saved["policy"].update(token_select="sample", token_score="contribution", trim_last=True, spare_first="frozen",
                           early_frac=None, dense_final_interleave=DEFAULT_PERIOD, token_temperature=TOKEN_TEMPERATURE)
    assert saved == cfg.model_dump()


def test_a_run_saved_with_interleave_true_reads_back_as_every_other_step():
    """Runs written when ``dense_final_interleave`` was a switch saved ``true`` (every other step)."""
    from alast.config import build_run_config
    from alast.training.resume import result_changes

    old = {"policy": {"dense_final_interleave": True}}
    assert build_run_config(old).policy.dense_final_interleave == 2
    assert result_changes(old, build_run_config({"policy": {"dense_final_interleave": 2}})) == []
    assert result_changes(old, build_run_config({"policy": {"dense_final_interleave": 3}})) == [
        "policy.dense_final_interleave (2 -> 3)"]


def test_an_old_checkpoints_config_matches_its_run_config_on_resume():
    """A checkpoint stores the config as written then; resuming compares it with the run's config.yaml
    read back: neither may gain today's token defaults, or the resume would be refused."""
    from alast.config import read_yaml
    from alast.training.resume import result_changes

    old = read_yaml(FIXTURE / "config.yaml")
    assert "token_select" not in old["policy"]
    assert result_changes(old, saved_config(FIXTURE)) == []
    assert result_changes(old, load_config(FIXTURE / "config.yaml")) == [
        f"policy.dense_final_interleave (0 -> {DEFAULT_PERIOD})", "policy.early_frac (0.0 -> null)",
        "policy.spare_first (0 -> frozen)", "policy.token_score (attention -> contribution)",
        "policy.token_select (top -> sample)", f"policy.token_temperature (1.0 -> {TOKEN_TEMPERATURE})",
        "policy.trim_last (false -> true)"]


def test_old_run_exports_evaluates_and_replays(old_run, tmp_path):
    from alast.export import load_run

    assert load_run(old_run).token_score == "attention"  # its schedule, if any, ranks as in its training
    runner = CliRunner()
    out = tmp_path / "old.onnx"
    res = runner.invoke(cli, ["export", str(old_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists()
    res = runner.invoke(cli, ["eval", str(out), "--data", "digits", "--json"])
    assert res.exit_code == 0, res.output
    assert 0.0 <= json.loads(res.output.strip().splitlines()[-1])["accuracy"] <= 1.0
    res = runner.invoke(cli, ["plan", "--trace", str(old_run), "--json"])
    assert res.exit_code == 0, res.output
