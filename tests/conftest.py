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


def load_script(folder: str, name: str):
    """A script of ``benchmarks/`` or ``examples/`` as a module (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module."""
    return load_script("benchmarks", name)


# a small held-out split for CLI runs whose evaluation is not under test (90 of the 1,797 digits, not 360):
# each run's evaluations take a quarter of the time
SMALL_VAL = ["--set", "data.val_fraction=0.05"]


def upstream_mem_tracker_cls():
    """torch's own MemTracker (its dispatch and module hooks) with only the frozen-parameter fix (no
    gradient hooks): what the runtime's and the profiler's tracker are held to."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Upstream(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return Upstream


def make_tiny_vit(init_values=None, reg_tokens=0, num_classes=5, depth=4, seed=0, global_pool="token",
                  norm_layer=None):
    """img 32, patch 8 (16 patches), dim 32, 2 heads: forward+backward in milliseconds. Any
    ``global_pool`` but "token" builds the model without a class token (as SigLIP, ``*_gap_*``);
    ``norm_layer``: timm's name of another norm ("rmsnorm", as AIMv2)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                             num_classes=num_classes, init_values=init_values, reg_tokens=reg_tokens,
                             qkv_bias=True, global_pool=global_pool, class_token=global_pool == "token",
                             norm_layer=norm_layer)


EVA_VARIANTS = {
    # DINOv3's layout: rotate-half RoPE with its own grid, registers, LayerScale, no absolute positions
    "dinov3": {"rope_type": "dinov3", "rope_rotate_half": True, "num_reg_tokens": 2, "init_values": 0.1,
               "use_abs_pos_emb": False, "dynamic_img_size": True, "qkv_bias": False, "global_pool": "avg"},
    # EVA-02's: query and value biases beside a fused qkv, SwiGLU with a norm, interleaved RoPE
    "eva02": {"qkv_bias": True, "swiglu_mlp": True, "scale_mlp": True, "global_pool": "avg"},
    # RoPE-ViT's mixed mode: learned per-block, per-head frequencies (timm's AttentionRope)
    "mixed": {"attn_type": "rope", "rope_type": "mixed", "init_values": 0.1, "global_pool": "token"},
    # no class token: read through the mean of the patch tokens
    "gap": {"class_token": False, "num_reg_tokens": 1, "global_pool": "avg", "qkv_fused": False},
    # grouped-query attention: half as many key and value heads (timm's AttentionRope)
    "gqa": {"attn_type": "rope", "num_heads": 4, "num_kv_heads": 2, "qkv_fused": False, "global_pool": "token"},
}


def make_tiny_eva(variant: str = "dinov3", num_classes=5, depth=3, seed=0):
    """A timm ``Eva`` (rotary position embeddings) at the tiny ViT's size, in one of
    :data:`EVA_VARIANTS`; the biases and gains drawn away from their initial zeros and ones."""
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    model = Eva(img_size=32, patch_size=8, embed_dim=32, depth=depth, mlp_ratio=2.0, num_classes=num_classes,
                use_rot_pos_emb=True, **{"num_heads": 2, **EVA_VARIANTS[variant]})
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


BEIT_VARIANTS = {
    # BEiT v2's layout: a bias table per block, query and value biases, LayerScale, mean-pooled head
    "beitv2": {"use_rel_pos_bias": True, "qkv_bias": True, "init_values": 0.1, "use_abs_pos_emb": False},
    # no relative position bias: an absolute position embedding, the class token read
    "absolute": {"use_rel_pos_bias": False, "use_abs_pos_emb": True, "global_pool": "token"},
}


def make_tiny_beit(variant: str = "beitv2", num_classes=5, depth=3, seed=0):
    """A timm ``Beit`` (relative position biases) at the tiny ViT's size, in one of
    :data:`BEIT_VARIANTS`; the bias tables, biases and gains drawn away from their initial zeros and ones."""
    from timm.models.beit import Beit

    torch.manual_seed(seed)
    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                 num_classes=num_classes, **BEIT_VARIANTS[variant])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "relative_position_bias_table" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
