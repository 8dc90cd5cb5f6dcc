import pathlib

import pytest

from alast.config import load_config
from tests.conftest import load_script

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


def test_digits_folder_writes_the_built_in_digits_as_an_image_folder(tmp_path):
    """examples/digits_folder.py: every digit as a PNG in its class's folder, read by imagefolder:
    as the built-in task splits it; a folder with files in it is refused."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from alast.data import build_data
    from alast.training.build import model_data_config

    module = load_script("examples", "digits_folder")
    out = tmp_path / "digits"
    assert module.main(["--out", str(out)]) == 1797
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    digits = load_digits()
    saved = np.asarray(Image.open(out / str(digits.target[5]) / "0005.png"))
    assert np.array_equal(saved, (digits.images[5] * (255.0 / 16.0)).astype("uint8"))
    cfg = model_data_config("alast_demo_vit")
    folder, built_in = (build_data(data, cfg, val_fraction=0.2, seed=0) for data in (f"imagefolder:{out}", "digits"))
    assert (len(folder.train), len(folder.val)) == (len(built_in.train), len(built_in.val)) == (1438, 359)
    with pytest.raises(SystemExit, match="not empty"):
        module.main(["--out", str(out)])
