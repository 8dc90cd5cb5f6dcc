import pathlib

import pytest

from alast.config import load_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.model.name


def test_paper_configs_name_real_timm_models_and_datasets():
    import timm
    import torchvision.datasets as tvd

    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.model.name != "alast_demo_vit":
            assert timm.is_model(cfg.model.name), path
        if cfg.data.spec.startswith("torchvision:"):
            assert hasattr(tvd, cfg.data.spec.split(":", 1)[1]), path
