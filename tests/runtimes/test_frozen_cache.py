"""The frozen bottom blocks' cache: a step that reads it is the step that computes them."""
import pytest
import torch

from planners import Budget
from runtimes.torch_backend.flops import counter
from runtimes.torch_backend.frozen_cache import FrozenCache, FrozenCacheError, check_frozen_prefix
from runtimes.torch_backend.runtime import TorchRuntime
from tests.conftest import make_tiny_vit

TOP2 = (False, False, True, True)  # the tiny ViT's top two blocks train; blocks 0-1 are cached
DROPS = Budget((1.0, 1.0, 0.5, 0.0), TOP2, train_embeddings=False)


def runtime(model, **kw):
    opts = {"lr": 1e-2, "weight_decay": 0.05, "grad_clip": 1.0, "device": "cpu", "freeze_embeddings": True,
            "token_select": "sample", "token_score": "contribution", "seed": 3}
    return TorchRuntime(model, **{**opts, **kw})


def model(pool="token"):
    return make_tiny_vit(global_pool=pool, reg_tokens=0 if pool == "token" else 1)  # the same weights each time


def pair(pool="token", host_views=True, **kw):
    plain, cached = runtime(model(pool), **kw), runtime(model(pool), **kw)
    cache = cached.enable_frozen_cache(2, num_images=10, max_bytes=2 ** 30)
    if not host_views:  # the storage written with torch ops, as on a GPU, where it stays on the device
        cached.frozen_cache = FrozenCache(2, 10, *cache.tokens.shape[1:], cache.capacity, host_views=False)
    return plain, cached


def images(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("pool, micro_batch, host_views", [("token", None, True), ("token", 4, True),
                                                          ("avg", None, True), ("token", None, False)])
def test_a_step_read_from_the_cache_trains_as_the_step_that_computes_the_bottom_blocks(pool, micro_batch, host_views):
    plain, cached = pair(pool, host_views, micro_batch=micro_batch)
    x, y = images()
    x2, y2 = images(seed=2)
    keys = [3, 7, 1, 0, 9, 4]
    steps = [(x, y, keys, 0),  # fills the cache (counted afresh: every block runs)
             (x, y, keys, 6),  # reads every image
             (torch.cat([x[:4], x2[:2]]), torch.cat([y[:4], y2[:2]]), keys[:4] + [2, 5], 4)]  # reads four
    for step, (xs, ys, ks, read) in enumerate(steps):
        a = plain.train_step(xs, ys, DROPS, 1e-2, step)
        b = cached.train_step(xs, ys, DROPS, 1e-2, step, keys=ks)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.deltas == pytest.approx(a.deltas, rel=1e-4)
        assert (b.tokens_in, b.kept_tokens) == (a.tokens_in, a.kept_tokens)
        assert b.cached_images == read
    for p, q in zip(plain.model.parameters(), cached.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert cached.frozen_cache.stats()["held_images"] == 8


def test_a_read_step_counts_only_what_ran():
    plain, cached = pair()
    quiet = runtime(model(), count_flops="off")
    quiet.enable_frozen_cache(2, num_images=10, max_bytes=2 ** 30)
    x, y = images()
    keys = [3, 7, 1, 0, 9, 4]
    for step in range(2):
        plain.train_step(x, y, DROPS, 1e-2, step)
        cached.train_step(x, y, DROPS, 1e-2, step, keys=keys)
        quiet.train_step(x, y, DROPS, 1e-2, step, keys=keys)
    # the third step: four images held, two new ones
    x2, y2 = images(seed=2)
    x3, y3 = torch.cat([x[:4], x2[:2]]), torch.cat([y[:4], y2[:2]])
    keys3 = keys[:4] + [2, 5]
    whole = plain.train_step(x3, y3, DROPS, 1e-2, 2).train_flops
    read = cached.train_step(x3, y3, DROPS, 1e-2, 2, keys=keys3)
    with counter() as fc:  # an outside count of the same step, run where the runtime counts nothing
        quiet.train_step(x3, y3, DROPS, 1e-2, 2, keys=keys3)
    assert read.cached_images == 4
    assert read.train_flops == pytest.approx(fc.get_total_flops(), rel=1e-12)
    assert read.train_flops < whole
    # a read step counted afresh (a shape the counter has not seen) counts what ran too, and stores
    # the pieces of the whole step, which later steps of that shape are priced from
    cached._flops = type(cached._flops)(cached._flops.block_names)
    again = cached.train_step(x3, y3, DROPS, 1e-2, 3, keys=keys3)
    with counter() as fc:
        quiet.train_step(x3, y3, DROPS, 1e-2, 3, keys=keys3)
    assert again.cached_images == 6 and again.train_flops == pytest.approx(fc.get_total_flops(), rel=1e-12)
    from runtimes.torch_backend.flops import StepFlopCache

    shape = StepFlopCache.keys(6, again.tokens_in, again.kept_tokens, DROPS.trained, False)
    assert cached._flops.lookup(shape) == pytest.approx(whole, rel=1e-12)


def test_a_step_that_trains_a_cached_block_empties_the_cache():
    _, cached = pair()
    x, y = images()
    cached.train_step(x, y, DROPS, 1e-2, 0, keys=list(range(6)))
    assert cached.frozen_cache.used == 6
    early = Budget((1.0, 0.5, 0.5, 0.0), (False, True, True, True), train_embeddings=False)
    res = cached.train_step(x, y, early, 1e-2, 1, keys=list(range(6)))
    assert res.cached_images == 0 and cached.frozen_cache.used == 0
    # a step whose cached blocks drop tokens neither reads nor fills it
    dropping = Budget((1.0, 0.5, 0.5, 0.0), TOP2, train_embeddings=False)
    assert cached.train_step(x, y, dropping, 1e-2, 2, keys=list(range(6))).cached_images == 0
    assert cached.frozen_cache.used == 0


@pytest.mark.parametrize("host_views", [True, False])
def test_the_cache_keeps_no_more_images_than_its_capacity(host_views):
    cache = FrozenCache(2, num_images=10, tokens=3, width=4, capacity=4, host_views=host_views)
    cache.put(torch.tensor([5, 1, 8]), torch.ones(3, 3, 4), torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    cache.put(torch.tensor([1, 2, 9]), 2 * torch.ones(3, 3, 4), torch.tensor([[7.0, 8, 9], [10, 11, 12]]))
    assert cache.used == 4
    assert cache.held(torch.arange(10)).nonzero().flatten().tolist() == [1, 2, 5, 8]
    tokens, deltas = cache.get(torch.tensor([2, 1]))
    assert tokens[:, 0, 0].tolist() == [2.0, 1.0]  # image 1 kept its first tokens
    assert deltas.tolist() == [[8.0, 11.0], [2.0, 5.0]]  # each image's deltas, one per cached block


def test_models_whose_bottom_blocks_draw_numbers_are_refused():
    from timm.models.vision_transformer import VisionTransformer

    dropping = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.1)
    with pytest.raises(FrozenCacheError, match="DropPath with rate 0.0333.*frozen_cache=off"):
        check_frozen_prefix(dropping, 2)
    batchnorm = make_tiny_vit()
    batchnorm.norm_pre = torch.nn.BatchNorm1d(32)  # as a hybrid ViT's ResNet stem normalises by the batch
    with pytest.raises(FrozenCacheError, match="BatchNorm1d in the frozen embeddings or bottom blocks"):
        check_frozen_prefix(batchnorm, 2)
    with pytest.raises(FrozenCacheError, match="bottom blocks must be 1 to 3"):
        check_frozen_prefix(make_tiny_vit(), 4)
    check_frozen_prefix(make_tiny_vit(), 3)


def test_a_runtime_that_trains_its_embeddings_cannot_cache():
    rt = runtime(make_tiny_vit(), freeze_embeddings=False)
    with pytest.raises(FrozenCacheError, match="embeddings train"):
        rt.enable_frozen_cache(2, num_images=10, max_bytes=2 ** 30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_cache_is_kept_there_and_a_step_that_reads_or_stores_waits_on_nothing():
    """CUDA: the storage is on the device, the steps that store and read give the losses of the steps
    that compute the bottom blocks, and launching them makes no host sync."""
    import warnings

    plain, cached = (runtime(model(), device="cuda", sync_free="on", count_flops="off") for _ in range(2))
    cache = cached.enable_frozen_cache(2, num_images=10, max_bytes=2 ** 30)
    assert cache.tokens.is_cuda and not cache.host_views
    x, y = images()
    x2, y2 = images(seed=2)
    keys = [3, 7, 1, 0, 9, 4]
    batches = [(x, y, keys), (x, y, keys), (torch.cat([x[:4], x2[:2]]), torch.cat([y[:4], y2[:2]]), keys[:4] + [2, 5])]
    batches = [(xs.pin_memory(), ys.pin_memory(), ks) for xs, ys, ks in batches]
    for step, (xs, ys, ks) in enumerate(batches):
        a = plain.launch_step(xs, ys, DROPS, 1e-2, step).resolve()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pending = cached.launch_step(xs, ys, DROPS, 1e-2, step, keys=ks)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        b = pending.resolve()
        assert not [w for w in caught if "synchroniz" in str(w.message).lower()], step
        assert b.loss == pytest.approx(a.loss, rel=1e-4) and b.cached_images == [0, 6, 4][step]
