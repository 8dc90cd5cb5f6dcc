import pytest

from alast.config import ConfigError, apply_overrides, load_config


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg.model.name == "alast_demo_vit" and cfg.data.spec == "digits" and cfg.policy.name == "alast"
    assert cfg.backend.name == "torch"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 10\npolicy:\n  name: full\n")
    cfg = load_config(p, ["train.steps=200", "policy.b_min=0.6", "policy.lora.rank=4"])
    assert cfg.train.steps == 200 and cfg.policy.name == "full" and cfg.policy.b_min == 0.6
    assert cfg.policy.lora.rank == 4


@pytest.mark.parametrize("yaml_text,overrides,fragment", [
    ("train:\n  stepz: 3\n", [], "unknown config key 'train.stepz'"),
    ("trian:\n  steps: 3\n", [], "unknown config key 'trian'"),
    ("", ["train.steps=-1"], "invalid value for 'train.steps'"),
    ("", ["train.batch_size=0"], "invalid value for 'train.batch_size'"),
    ("", ["backend.name=tensorflow"], "invalid value for 'backend.name'"),
    ("", ["train.lr=abc"], "invalid value for 'train.lr'"),
    ("", ["policy.b_init=0.3"], "b_init"),
    ("", ["policy.b_min=0.9", "policy.b_max=0.5"], "policy.b_min=0.9 is above policy.b_max=0.5"),
    ("", ["steps=3"], "malformed --set"),
    ("", ["train.steps"], "malformed --set"),
    ("train: [1, 2\n", [], "YAML syntax error"),
    ("- a\n- b\n", [], "must be a mapping"),
    # PyYAML keeps a key's last copy: the first section's keys would be lost without a word
    ("train:\n  steps: 3\npolicy:\n  name: full\ntrain:\n  lr: 0.01\n", [],
     "'train' is given twice in"),
    ("train:\n  steps: 3\n  lr: 0.1\n  steps: 5\n", [], "(lines 2 and 4), and only one would count"),
    ("policy: {name: full, name: alast}\n", [], "'name' is given twice"),
])
def test_config_errors_name_the_key(tmp_path, yaml_text, overrides, fragment):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, overrides)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_lora_policy_names():
    assert load_config(None, ["policy.name=lora"]).policy.planner == "full"
    cfg = load_config(None, ["policy.name=alast+lora"])
    assert cfg.policy.planner == "alast" and cfg.policy.lora is not None


def test_apply_overrides_refuses_value_as_section():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"train": 3}, ["train.steps=1"])


@pytest.mark.parametrize("overrides,frozen,k_trained", [
    ([], True, 4),  # the default: the top blocks train; the bottom quarter (halves up) and the embeddings stay frozen
    (["policy.freeze_mode=sample"], False, 5),  # the paper: 3/4 of the blocks drawn, embeddings trained
    (["policy.freeze_mode=topk"], False, 5),
    (["policy.freeze_mode=sample", "policy.freeze_embeddings=true"], True, 5),
    (["policy.freeze_embeddings=false", "policy.k_trained=3"], False, 3),
    (["policy.name=full"], False, None),  # the baselines keep their embeddings trained
    (["policy.name=freeze"], False, None),
])
def test_embeddings_and_k_follow_the_freeze_mode(overrides, frozen, k_trained):
    from alast.training.build import build_planner

    cfg = load_config(None, overrides)
    assert cfg.policy.embeddings_frozen is frozen
    if k_trained is not None:
        assert build_planner(cfg, 6).k_trained == k_trained


def test_the_planner_prices_memory_at_each_devices_batch():
    """``train.batch_size`` is split over the processes: the planner's memory cap is each device's."""
    from alast.training.build import build_planner, policy_options
    from tests.planners.fixtures import synthetic_cost_model

    cfg = load_config(None, ["train.batch_size=48"])
    assert [policy_options(cfg, world_size=w)["batch_size"] for w in (1, 2, 4, 64)] == [48, 24, 12, 1]
    target = {"target_flops": 0.5, "cost_model": synthetic_cost_model(num_blocks=6)}
    assert [build_planner(cfg, 6, target, world_size=w).projection.batch_size for w in (1, 3)] == [48, 16]
    assert "batch_size" not in policy_options(load_config(None, ["policy.name=tokens"]))


@pytest.mark.parametrize("value,expected", [("frozen", "frozen"), ("0", 0), ("3", 3)])
def test_spare_first_takes_a_block_count_or_frozen(value, expected):
    assert load_config(None, [f"policy.spare_first={value}"]).policy.spare_first == expected


@pytest.mark.parametrize("value", ["first", "-1", "1.5", "true"])
def test_spare_first_refuses_anything_else_in_one_line(value):
    with pytest.raises(ConfigError, match=r"policy\.spare_first.*number of blocks \(0 or more\) or 'frozen'"):
        load_config(None, [f"policy.spare_first={value}"])


@pytest.mark.parametrize("value,expected", [("true", 2), ("false", 0), ("0", 0), ("2", 2), ("3", 3), ("5", 5)])
def test_dense_final_interleave_takes_a_period_or_a_switch(value, expected):
    assert load_config(None, [f"policy.dense_final_interleave={value}"]).policy.dense_final_interleave == expected


@pytest.mark.parametrize("value", ["1", "-2", "1.5", "often"])
def test_dense_final_interleave_refuses_anything_else_in_one_line(value):
    with pytest.raises(ConfigError, match=r"policy\.dense_final_interleave.*period N >= 2"):
        load_config(None, [f"policy.dense_final_interleave={value}"])


def test_early_frac_needs_the_top_blocks_trained_and_room_before_the_dense_phase():
    assert load_config(None, ["policy.early_frac=0.2"]).policy.early_phase == 0.2
    # unset: on under a FLOPs target with the top blocks trained, off otherwise
    assert load_config(None, ["policy.target_flops=0.5"]).policy.early_phase == 0.3
    assert load_config(None, []).policy.early_phase == 0.0
    assert load_config(None, ["policy.target_flops=0.5", "policy.freeze_mode=sample"]).policy.early_phase == 0.0
    with pytest.raises(ConfigError, match="early_frac trains the block below .* freeze_mode 'last', not 'sample'"):
        load_config(None, ["policy.early_frac=0.3", "policy.freeze_mode=sample"])
    with pytest.raises(ConfigError, match="their sum must stay below 1"):
        load_config(None, ["policy.early_frac=0.7", "policy.dense_final_frac=0.3"])
    with pytest.raises(ConfigError, match="early_frac"):
        load_config(None, ["policy.early_frac=1.5"])
    # another policy ignores it, as it ignores every alast knob
    assert load_config(None, ["policy.name=full", "policy.early_frac=0.3", "policy.freeze_mode=sample"])


@pytest.mark.parametrize(("key", "meant"), [("lora.rank=4", "policy.lora"), ("train.lrr=0.1", "train.lr"),
                                            ("trian.lr=0.1", "train"), ("data.name=x", "data.spec"),
                                            ("train.learning_rate=0.1", "train.lr")])
def test_an_unknown_key_names_the_key_it_was_meant_as(key, meant):
    """The LoRA settings live under policy.lora; `--set lora.rank=4` named no way there."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [key])
    assert f"did you mean '{meant}'?" in str(info.value)


def test_a_swapped_lora_policy_name_is_suggested_the_right_way_round():
    from alast.config import check_policy_name

    with pytest.raises(ConfigError, match="did you mean 'alast\\+lora'"):
        check_policy_name("lora+alast")


@pytest.mark.parametrize(("policy", "sets", "unused"), [
    ("lora", ["policy.k_trained=2"], ["k_trained"]),  # LoRA trains every block's adapters
    ("alast", ["policy.keep_ratio=0.3"], ["keep_ratio"]),  # the tokens policy's
    ("alast", ["policy.k_trained=3", "policy.gain=0.2"], []),
    ("full", [], []),
    ("alast", ["policy.keep_ratio=0.8", "policy.dense_final_blocks=auto"], []),  # defaults, as config.yaml has them
])
def test_policy_keys_the_policy_does_not_take_are_named(policy, sets, unused):
    """They were ignored without a word: `--policy lora --set policy.k_trained=2` trained every block."""
    from alast.config import unused_policy_keys

    assert unused_policy_keys(load_config(None, [f"policy.name={policy}", *sets])) == unused


def test_the_cli_notes_an_ignored_policy_key_once():
    from click.testing import CliRunner

    from alast_cli.main import cli

    res = CliRunner().invoke(cli, ["plan", "--policy", "alast", "--set", "policy.keep_ratio=0.3", "--steps", "2",
                                   "--throughput", "1e10"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("note: policy.keep_ratio is not used by policy 'alast' and ignored") == 1


def test_a_runs_own_config_yaml_given_back_names_nothing(tmp_path):
    """config.yaml lists every key; read back as a config it asks for nothing the policy ignores."""
    from alast.config import dump_config, unused_policy_keys

    for policy in ("alast", "lora", "tokens", "full"):
        path = tmp_path / f"{policy}.yaml"
        path.write_text(dump_config(load_config(None, [f"policy.name={policy}"])))
        assert unused_policy_keys(load_config(path, [])) == [], policy


def test_every_synonym_names_a_config_key():
    """Another tool's name (``data.name``) got the nearest spelling (``data.augment``); each synonym's
    key must exist, and no synonym may shadow one."""
    from alast.config import KEY_SYNONYMS, _config_keys

    keys = set(_config_keys())
    assert set(KEY_SYNONYMS.values()) <= keys and not set(KEY_SYNONYMS) & keys
