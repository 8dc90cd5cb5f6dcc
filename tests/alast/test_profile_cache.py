"""The disk cache of cost models: measured once, read back exactly, keyed by everything it depends on."""
import json
from unittest import mock

import pytest

import alast.planning.profile as profile_module
from alast.planning import profile_cache
from alast.planning.profile import profile_with_source

MODEL = {"name": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 3}  # 4 patches: profiled in seconds


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALAST_CACHE_DIR", str(tmp_path / "cache"))
    profile_module._profile_cached.cache_clear()
    yield tmp_path / "cache" / "cost_models"
    profile_module._profile_cached.cache_clear()


def _refuse(*args, **kwargs):
    raise AssertionError("profiled although the cache holds this model")


def test_a_model_is_profiled_once_then_read_back_exactly(own_cache, monkeypatch):
    measured, source = profile_with_source(**MODEL)
    assert source.startswith("profiled now")
    files = list(own_cache.glob("*.json"))
    assert [f.name.split("-")[0] for f in files] == ["vit_tiny_patch16_224"]
    profile_module._profile_cached.cache_clear()
    monkeypatch.setattr(profile_module, "profile_model", _refuse)
    read, source = profile_with_source(**MODEL)
    assert source.startswith("cached") and str(files[0]) in source
    assert read.to_dict() == measured.to_dict() and read == measured
    with pytest.raises(AssertionError, match="profiled although"):  # another size is another model
        profile_with_source(**{**MODEL, "img_size": 48})


def test_the_key_names_code_libraries_and_settings():
    base = profile_cache.cache_key(**MODEL, lora=None, device="cpu")
    assert base == profile_cache.cache_key(**MODEL, lora=None, device="cpu")
    others = {profile_cache.cache_key(**{**MODEL, "img_size": 48}, lora=None, device="cpu"),
              profile_cache.cache_key(**MODEL, lora=(("rank", 4),), device="cpu"),
              profile_cache.cache_key(**MODEL, lora=None, device="cuda")}
    assert base not in others and len(others) == 3
    with mock.patch.object(profile_cache, "code_digest", lambda: "edited"):
        assert profile_cache.cache_key(**MODEL, lora=None, device="cpu") != base
    with mock.patch("torch.__version__", "0.0-other"):
        assert profile_cache.cache_key(**MODEL, lora=None, device="cpu") != base


def test_an_unreadable_file_is_measured_again_and_replaced(own_cache):
    measured, _ = profile_with_source(**MODEL)
    (path,) = own_cache.glob("*.json")
    path.write_text('{"format": "alast-cost-model", "trunc')
    profile_module._profile_cached.cache_clear()
    again, source = profile_with_source(**MODEL)
    assert source.startswith("profiled now") and again == measured
    assert json.loads(path.read_text())["model"] == "vit_tiny_patch16_224"
    assert not list(own_cache.glob(".tmp-*"))


def test_off_or_unwritable_caches_nothing_and_still_profiles(own_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ALAST_CACHE_DIR", "off")
    assert profile_cache.cache_dir() is None
    measured, source = profile_with_source(**MODEL)
    assert source.startswith("profiled now") and not own_cache.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ALAST_CACHE_DIR", str(blocker))
    assert profile_cache.write("x.json", measured) is None
    profile_module._profile_cached.cache_clear()
    assert profile_with_source(**MODEL)[0] == measured
