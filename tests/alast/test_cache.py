"""The decoded-image cache (data.cache): exact batches, shared with workers, sized to fit; the loop's
wait for batches, measured and warned about."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from alast.data.cache import AUTO_SHARE, CacheError, CachePlan, DecodedCache, cache_bundle, plan_cache
from alast.data.datasets import StepBatchSampler, build_data, eval_batches, train_batches
from alast.training.build import model_data_config
from alast_cli.main import cli
from runtimes.images import DeviceImages, Pixels, as_float, normalise

MIB = 1 << 20


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three classes of JPEG and PNG images of several sizes and modes (RGB, grey, RGBA, palette)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(8):
            h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img = [img, img.convert("L"), img.convert("RGBA"), img.convert("P")][i % 4]
            img.save(root / f"c{c}" / f"{i}.{'jpg' if img.mode in ('RGB', 'L') else 'png'}")
    return root


def _bundle(photos):
    return build_data(f"imagefolder:{photos}", model_data_config("alast_demo_vit"), seed=0)


def _cached(ds):
    x = ds[0][0]
    return DecodedCache(ds, x.shape, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_cached_batches_are_the_transformed_images_to_the_bit(photos):
    ds = _bundle(photos).train
    cache = _cached(ds)
    reference = list(DataLoader(ds, batch_size=5))
    for second, eight_bit in ((False, None), (True, None), (True, True)):  # the first pass decodes and stores
        got = list(eval_batches(cache, 5, eight_bit=eight_bit))
        assert len(got) == len(reference)
        for (x, y), (rx, ry) in zip(got, reference):
            # stored images pass on in 8 bits for a device that normalises them (CUDA), else as float32
            assert isinstance(x, Pixels) == (second and bool(eight_bit))
            assert as_float(x).dtype == rx.dtype == torch.float32 and torch.equal(as_float(x), rx)
            assert torch.equal(y, ry)
        assert cache.stored == len(ds)
    x, y = cache[3]
    assert torch.equal(x, ds[3][0]) and y == ds[3][1]


def test_pixels_are_normalised_where_they_are_used_as_the_transform_does(photos):
    ds = _bundle(photos).train
    cache = _cached(ds)
    list(eval_batches(cache, 5))
    (x, _), = list(eval_batches(cache, len(ds), eight_bit=True))
    assert isinstance(x, Pixels) and x.data.dtype == torch.uint8 and x.shape == (len(ds), *cache.shape)
    reference = torch.stack([ds[i][0] for i in range(len(ds))])
    on_device = DeviceImages("cpu")
    assert torch.equal(on_device(x), reference) and torch.equal(on_device(x), reference)  # constants kept once
    assert len(on_device._constants) == 1
    assert torch.equal(on_device(reference), reference)  # a float batch passes as it is
    assert torch.equal(x.normalised(), reference) and as_float(reference) is reference


class _Noise(Dataset):
    """Float images that no 8-bit image transforms to: never stored, read every time."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)), i % 2


def test_an_image_whose_tensor_does_not_round_trip_is_never_stored():
    cache = _cached(_Noise())
    for _ in range(2):
        (x, y), = list(eval_batches(cache, 6))
        assert torch.equal(x, torch.stack([_Noise()[i][0] for i in range(6)])) and y.tolist() == [0, 1] * 3
    assert cache.stored == 0


def test_workers_fill_one_cache_in_shared_memory(photos):
    ds = _bundle(photos).train
    cache = _cached(ds)
    sampler = StepBatchSampler(len(ds), 4, 0, 0, 12, 0, 1)
    serial = list(train_batches(ds, sampler))
    parallel = list(train_batches(cache, sampler, num_workers=2, eight_bit=True))
    assert cache.pixels.is_shared()
    assert cache.stored == len(ds)  # the workers' reads landed in the training process's cache
    assert any(isinstance(x, Pixels) for x, _ in parallel)  # 8-bit batches cross from the workers
    for (x, y), (rx, ry) in zip(parallel, serial):
        assert torch.equal(as_float(x), rx) and torch.equal(y, ry)


def test_the_cache_is_planned_to_fit():
    # auto: up to a quarter of the memory available; the training images only without augmentation
    assert plan_cache("auto", 10 * MIB, 5 * MIB, 0, 1, 60 * MIB, None) == CachePlan(True, True, 15 * MIB)
    assert plan_cache("auto", None, 5 * MIB, 0, 1, 60 * MIB, None) == CachePlan(False, True, 5 * MIB)
    left_out = plan_cache("auto", 10 * MIB, 6 * MIB, 0, 1, 60 * MIB, None)
    assert not left_out.train and not left_out.val
    assert left_out.note == ("not caching the decoded images: the decoded images take 16.0 MiB, more than a quarter "
                             "of the 60.0 MiB of memory available (data.cache=true caches anyway)")
    assert AUTO_SHARE == 0.25
    # every process on the machine holds its own
    assert plan_cache("auto", 5 * MIB, 5 * MIB, 0, 2, 60 * MIB, None).note.startswith(
        "not caching the decoded images: the decoded images take 20.0 MiB (2 processes, one cache each)")
    # true: wherever it fits at all
    assert plan_cache(True, 10 * MIB, 6 * MIB, 0, 1, 60 * MIB, None).train
    with pytest.raises(CacheError, match=r"^data.cache=true: the decoded images take 70.0 MiB, more than the 60.0 "
                                         r"MiB of memory available; set data.cache=false"):
        plan_cache(True, 60 * MIB, 10 * MIB, 0, 1, 60 * MIB, None)
    # workers share it through /dev/shm
    assert plan_cache("auto", 10 * MIB, 5 * MIB, 2, 1, 600 * MIB, 14 * MIB).note == (
        "not caching the decoded images: the decoded images take 15.0 MiB, more than the 14.0 MiB free in "
        "/dev/shm, where DataLoader workers share them")
    with pytest.raises(CacheError, match=r"enlarge /dev/shm \(docker run --shm-size\), set data.num_workers=0"):
        plan_cache(True, 10 * MIB, 5 * MIB, 2, 1, 600 * MIB, 14 * MIB)
    assert plan_cache("auto", 10 * MIB, 5 * MIB, 0, 1, 600 * MIB, 14 * MIB).train  # no workers
    assert plan_cache(False, 1, 1, 0, 1, 600 * MIB, None) == CachePlan(False, False, 0)
    # where the memory available is not known, auto caches up to a gibibyte
    assert plan_cache("auto", 600 * MIB, 300 * MIB, 0, 1, None, None) == CachePlan(
        True, True, 900 * MIB, "keeping the decoded images in memory as they are first read, up to 900.0 MiB "
        "(data.cache=false: never)")
    assert plan_cache("auto", 900 * MIB, 300 * MIB, 0, 1, None, None).note == (
        "not caching the decoded images: the decoded images take 1.17 GiB, and the memory available is not known "
        "here (data.cache=true caches anyway)")
    # a large cache is announced
    assert plan_cache("auto", 200 * MIB, 100 * MIB, 0, 1, 2000 * MIB, None).note == (
        "keeping the decoded images in memory as they are first read, up to 300.0 MiB (data.cache=false: never)")


def test_a_bundle_is_cached_as_planned(photos, monkeypatch):
    import alast.data.cache as cache_mod

    bundle = _bundle(photos)
    monkeypatch.setattr(cache_mod, "available_memory", lambda: 1 << 40)
    data_cfg = model_data_config("alast_demo_vit")
    cached = cache_bundle(bundle, "auto", False, 0, data_cfg)
    assert isinstance(cached.train, DecodedCache) and isinstance(cached.val, DecodedCache)
    assert cached.train.nbytes == len(bundle.train) * 3 * 32 * 32
    augmented = cache_bundle(bundle, "auto", True, 0, data_cfg)
    assert augmented.train is bundle.train and isinstance(augmented.val, DecodedCache)
    assert cache_bundle(bundle, False, False, 0, data_cfg) is bundle
    monkeypatch.setattr(cache_mod, "available_memory", lambda: 1000)
    assert cache_bundle(bundle, "auto", False, 0, data_cfg).train is bundle.train


def _train(photos, out, *extra):
    args = ["train", "--data", f"imagefolder:{photos}", "--steps", "8", "--batch-size", "8", "--out", str(out),
            "--set", "backend.threads=1", "--set", 'backend.count_flops="off"', *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], res


def test_a_cached_run_trains_as_an_uncached_one_and_reports_its_wait_for_data(photos, tmp_path):
    cached, res = _train(photos, tmp_path / "cached")
    plain, _ = _train(photos, tmp_path / "plain", "--set", "data.cache=false")
    assert [r["loss"] for r in cached] == [r["loss"] for r in plain]  # 8 steps of 8: four passes over 18 images
    assert all(r["data_wait_s"] >= 0 for r in cached)
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["data_wait_s"] == pytest.approx(sum(r["data_wait_s"] for r in cached))
    plain_summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["cached_images"] > 0 and plain_summary["cached_images"] is None
    assert summary["val_accuracy"] == plain_summary["val_accuracy"]  # evaluated on 8-bit batches too
    assert "waiting for data" in res.output


def test_a_run_that_waits_for_its_images_is_told_so(capsys):
    from alast.config import build_config
    from alast_cli.train_cmd import _warn_data_bound

    cfg = build_config({"data": {"num_workers": 0, "cache": False}})
    _warn_data_bound({"data_wait_s": 3.0, "train_time_s": 9.0, "data_workers": 0}, cfg)
    err = capsys.readouterr().err
    assert err.startswith("warning: the steps waited 3.0 s for their images, 25% of the training loop, so reading the "
                          "data sets the pace, not the model; raise data.num_workers (0 now, ")
    assert err.rstrip().endswith("or set data.cache=auto to keep the decoded images in memory")
    for summary in ({"data_wait_s": 2.0, "train_time_s": 9.0}, {"data_wait_s": 1.5, "train_time_s": 1.0}):
        _warn_data_bound(summary, cfg)  # under a fifth of the loop; under 2 s
        assert capsys.readouterr().err == ""


def test_workers_by_default_on_cuda_only():
    from alast.data.datasets import AUTO_WORKERS_MAX, resolve_workers

    assert resolve_workers("auto", "cpu", cpus=16) == 0
    assert resolve_workers("auto", "cuda", cpus=16) == AUTO_WORKERS_MAX == 8
    assert resolve_workers("auto", "cuda", processes=4, cpus=16) == 3  # four cores each, one left to launch
    assert resolve_workers("auto", "cuda", processes=8, cpus=8) == 1
    assert resolve_workers(3, "cpu", cpus=16) == 3 and resolve_workers(0, "cuda", cpus=16) == 0


def test_auto_workers_fit_the_shared_memory_their_batches_pass_through(capsys):
    from alast.data.datasets import resolve_workers

    batch = 154 * MIB  # 256 images at 224 px, float32
    assert resolve_workers("auto", "cuda", cpus=16, batch_bytes=batch, shm_free=32 << 30) == 8
    assert resolve_workers("auto", "cuda", cpus=16, batch_bytes=batch, shm_free=64 * MIB) == 0  # Docker's default
    assert "0 DataLoader workers, not 8: 64 MiB are free in /dev/shm" in capsys.readouterr().err
    assert resolve_workers("auto", "cuda", cpus=16, batch_bytes=batch, shm_free=1000 * MIB) == 3
    assert resolve_workers("auto", "cuda", processes=2, cpus=16, batch_bytes=batch, shm_free=1000 * MIB) == 1
    assert resolve_workers(4, "cuda", cpus=16, batch_bytes=batch, shm_free=64 * MIB) == 4  # as the user set


class _Odd(Dataset):
    """Four images of the cache's shape (index 0 one-channel with ``odd``), labels as given."""

    def __init__(self, odd: bool = True, label=lambda i: i % 2):
        self.odd, self.label = odd, label

    def __len__(self):
        return 4

    def __getitem__(self, i):
        channels = 1 if self.odd and i == 0 else 3
        half = torch.full((channels, 1, 1), 0.5)
        return normalise(torch.full((channels, 8, 8), 40 * i, dtype=torch.uint8), half, half), self.label(i)


def test_a_batch_the_cache_cannot_assemble_is_collated_as_torch_collates_it():
    from torch.utils.data import default_collate

    cache = DecodedCache(_Odd(), (3, 8, 8), (0.5,) * 3, (0.5,) * 3)
    assert [cache[i][1] for i in range(1, 4)] == [1, 0, 1]  # read one at a time, and stored
    assert cache.stored == 3
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        list(eval_batches(cache, 4))  # the one-channel image beside stored ones: refused, as torch refuses it
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        default_collate([_Odd()[i] for i in range(4)])
    numpy_labels = DecodedCache(_Odd(odd=False, label=np.int64), (3, 8, 8), (0.5,) * 3, (0.5,) * 3)
    for _ in range(2):
        (x, y), = list(eval_batches(numpy_labels, 4))
        assert torch.equal(as_float(x), default_collate([numpy_labels.ds[i] for i in range(4)])[0]) and y.tolist() == [0, 1, 2, 3]
    assert numpy_labels.stored == 4
    labelled = _cached(_Odd(odd=False, label=lambda i: torch.tensor([i, 1 - i])))  # not a class index
    for _ in range(2):
        (x, y), = list(eval_batches(labelled, 4))
        rx, ry = default_collate([labelled.ds[i] for i in range(4)])
        assert torch.equal(x, rx) and torch.equal(y, ry) and y.shape == (4, 2)
    assert labelled.stored == 0


def test_shared_marks_are_ordered_by_a_lock(photos):
    cache = _cached(_bundle(photos).train)
    cache.allocate(shared=False)
    assert cache._lock is None
    cache.allocate(shared=True)
    assert cache.pixels.is_shared() and cache._lock is not None


def test_runs_inside_shared_between_runs_take_over_the_decoded_images_of_the_same_data(photos, monkeypatch):
    import alast.data.cache as cache_mod
    from alast.data.cache import shared_between_runs

    monkeypatch.setattr(cache_mod, "available_memory", lambda: 1 << 40)
    data_cfg = model_data_config("alast_demo_vit")

    def run(key):
        bundle = cache_bundle(_bundle(photos), "auto", False, 0, data_cfg, key=key)
        list(eval_batches(bundle.train, 6))
        return bundle

    first = run("a")
    assert run("a").train.pixels is not first.train.pixels  # outside the scope every run has its own cache
    with shared_between_runs():
        first = run("a")
        again = run("a")
        assert again.train.pixels is first.train.pixels and again.train.stored == len(first.train)
        assert again.val.state is first.val.state  # the validation images too
        other = run("b")  # other data: the earlier caches are released, these are new
        assert other.train.pixels is not first.train.pixels
        assert run("a").train.pixels is not first.train.pixels
        fewer = replace(_bundle(photos), train=torch.utils.data.Subset(_bundle(photos).train, range(5)))
        assert cache_bundle(fewer, "auto", False, 0, data_cfg, key="a").train.pixels is None  # not these images


def test_workers_take_over_a_shared_cache_only_from_shared_memory(photos, monkeypatch):
    import alast.data.cache as cache_mod
    from alast.data.cache import shared_between_runs

    monkeypatch.setattr(cache_mod, "available_memory", lambda: 1 << 40)
    data_cfg = model_data_config("alast_demo_vit")

    def run(key, workers):
        bundle = cache_bundle(_bundle(photos), "auto", False, workers, data_cfg, key=key)
        sampler = StepBatchSampler(len(bundle.train), 6, 0, 0, 4, 0, 1)
        list(train_batches(bundle.train, sampler, num_workers=workers))
        return bundle

    with shared_between_runs():
        first = run("a", 2)
        assert first.train.pixels.is_shared() and first.train.stored > 0
        again = run("a", 2)
        assert again.train.pixels is first.train.pixels and again.train._lock is first.train._lock
        private = run("b", 0)
        assert not private.train.pixels.is_shared()
        assert run("b", 2).train.pixels is not private.train.pixels  # moving it to /dev/shm is not planned


def test_a_bench_reads_each_image_once_for_all_its_runs_on_the_same_data(photos, tmp_path, monkeypatch):
    from alast.data import folders

    reads = []
    real = folders.load_image

    def counted(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(folders, "load_image", counted)
    res = CliRunner().invoke(cli, ["bench", "--data", f"imagefolder:{photos}", "--policies", "full,alast,tokens",
                                   "--steps", "4", "--batch-size", "8", "--set", "backend.threads=1",
                                   "--set", 'backend.count_flops="off"', "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert len(reads) > 0 and len(set(reads)) == len(reads) == 24  # every image once, in three runs
    monkeypatch.setattr(folders, "load_image", counted)
    reads.clear()
    res = CliRunner().invoke(cli, ["bench", "--data", f"imagefolder:{photos}", "--policies", "full,alast",
                                   "--steps", "4", "--batch-size", "8", "--set", "backend.threads=1",
                                   "--set", 'backend.count_flops="off"', "--set", "data.cache=false",
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert len(reads) > 2 * 24  # without the cache: every draw reads its file
