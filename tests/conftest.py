import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

# The cost-model disk cache (alast/planning/profile_cache.py) in a folder of this test session's
# own: shared by the xdist workers (they inherit it) and the CLI subprocesses, never the user's.
if "PYTEST_XDIST_WORKER" not in os.environ or "ALAST_TEST_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="alast-test-cache-")
    os.environ["ALAST_CACHE_DIR"] = os.environ["ALAST_TEST_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def make_tiny_vit(init_values=None, reg_tokens=0, num_classes=5, depth=4, seed=0, global_pool="token"):
    """img 32, patch 8 (16 patches), dim 32, 2 heads: forward+backward in milliseconds. Any
    ``global_pool`` but "token" builds the model without a class token (as SigLIP, ``*_gap_*``)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                             num_classes=num_classes, init_values=init_values, reg_tokens=reg_tokens,
                             qkv_bias=True, global_pool=global_pool, class_token=global_pool == "token")


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
