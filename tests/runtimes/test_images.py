"""8-bit batches (runtimes.images.Pixels) become the float32 images torchvision's transform makes,
bit for bit, on the host and on a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data._utils.pin_memory import pin_memory

from runtimes.images import DeviceImages, Pixels, as_float

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet defaults


def _batch(n=4, size=24, seed=0):
    """``n`` random RGB images: as Pixels, and as torchvision's ToTensor then Normalize make them."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    reference = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(a)), MEAN, STD) for a in arrays])
    data = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).contiguous()
    return Pixels(data, MEAN, STD), reference


def test_pixels_on_the_host_are_the_transforms_float_images():
    pixels, reference = _batch()
    assert torch.equal(as_float(pixels), reference)
    assert torch.equal(DeviceImages("cpu")(pixels), reference)
    assert pixels.shape == reference.shape and not pixels.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pixels_on_a_gpu_are_the_transforms_float_images():
    """CUDA divides by a host number as a product with its reciprocal; DeviceImages divides by a
    tensor on the device, so its images are the host's to the bit."""
    pixels, reference = _batch(n=16, size=64)
    pinned, _ = pin_memory((pixels, torch.arange(16)))  # as the DataLoader pins a batch
    assert isinstance(pinned, Pixels) and pinned.is_pinned()
    on_gpu = DeviceImages("cuda")
    got = on_gpu(pinned, non_blocking=True)
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert torch.equal(got.cpu(), reference)
