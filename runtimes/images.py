"""What a runtime takes as a batch's images: a float32 tensor, or :class:`Pixels`, 8-bit pixels
with the normalisation that makes them float32, made on the device that trains (:class:`DeviceImages`).

The decoded-image cache (``alast.data.cache``) keeps each image as the 8-bit pixels its normalised
tensor is made of. Passed on in 8 bits, a batch is a quarter of the bytes to copy through the
DataLoader's workers, pinned memory and the bus, and its float work runs on the device, not on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              scale: float | torch.Tensor = 255.0) -> torch.Tensor:
    """``ToTensor`` then ``Normalize`` of uint8 ``[..., C, H, W]``, as torchvision computes them. On a
    GPU ``scale`` must be a tensor there: CUDA divides by a host number as a multiplication by its
    reciprocal, which can differ from the division in the last bit."""
    return pixels.float().div_(scale).sub_(mean).div_(std)


@dataclass(frozen=True)
class Pixels:
    """A batch of images as 8-bit pixels, ``data`` ``[B, C, H, W]`` uint8, whose float32 tensor is
    ``(data / 255 - mean) / std`` per channel (torchvision's ``ToTensor`` then ``Normalize``, bit for
    bit): :meth:`normalised`, or :class:`DeviceImages` on a device."""

    data: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def is_pinned(self) -> bool:
        return self.data.is_pinned()

    def pin_memory(self) -> Pixels:
        """The same batch in page-locked memory (the DataLoader's ``pin_memory`` calls it)."""
        return replace(self, data=self.data.pin_memory())

    def normalised(self) -> torch.Tensor:
        """The float32 images, computed where ``data`` is (the host, for a host consumer)."""
        return DeviceImages(self.data.device)(self)


class DeviceImages:
    """A training batch's images as float32 on ``device``: a tensor copied there, a :class:`Pixels`
    batch copied there in 8 bits and normalised there. Its constants are copied to the device once,
    from page-locked memory on CUDA, so that the copy does not wait for the steps queued before it."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._constants: dict[tuple[tuple[float, ...], tuple[float, ...]], tuple[torch.Tensor, ...]] = {}
        self._host: list[torch.Tensor] = []  # the page-locked sources, alive until their copies are done

    def _upload(self, values: tuple[float, ...] | float, shape: tuple[int, ...]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.float32).view(shape)
        if self.device.type != "cuda":
            return host.to(self.device)
        host = host.pin_memory()
        self._host.append(host)
        return host.to(self.device, non_blocking=True)

    def __call__(self, images: torch.Tensor | Pixels, non_blocking: bool = False) -> torch.Tensor:
        if not isinstance(images, Pixels):
            return images.to(self.device, non_blocking=non_blocking)
        key = (images.mean, images.std)
        if key not in self._constants:
            self._constants[key] = (self._upload(images.mean, (-1, 1, 1)), self._upload(images.std, (-1, 1, 1)),
                                    self._upload(255.0, ()))
        mean, std, scale = self._constants[key]
        return normalise(images.data.to(self.device, non_blocking=non_blocking), mean, std, scale)


def as_float(images: torch.Tensor | Pixels) -> torch.Tensor:
    """A batch's images as a float32 tensor where they are (:meth:`Pixels.normalised`), for a consumer
    on the host."""
    return images.normalised() if isinstance(images, Pixels) else images
