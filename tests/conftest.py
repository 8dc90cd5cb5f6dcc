import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

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
