"""Vectorised drawing on a pixel grid for the synthetic image families: random draws, signed-distance
primitives, placement, colours, backgrounds and the finishing blur and noise (torch, CPU or CUDA)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 32  # side of every synthetic image, pixels
DEG = math.pi / 180.0


class Rng:
    """Draws from ``generator`` (on its own device) and moves the result to ``device``."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.g, self.device = generator, device

    def u(self, *shape: int, lo: float | Tensor = 0.0, hi: float | Tensor = 1.0) -> Tensor:
        r = torch.rand(*shape, generator=self.g, device=self.g.device).to(self.device)
        return lo + (hi - lo) * r

    def n(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g, device=self.g.device).to(self.device)


def per_image(t: Tensor) -> Tensor:
    """``[m]`` -> ``[m,1,1]``: one value per image, broadcast over the pixel grid."""
    return t[:, None, None]


def local(x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, th: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel grid in a frame centred at (cx, cy) and rotated by ``th`` (radians, y axis down)."""
    dx, dy = x - per_image(cx), y - per_image(cy)
    c, s = per_image(torch.cos(th)), per_image(torch.sin(th))
    return c * dx + s * dy, -s * dx + c * dy


def alpha(d: Tensor) -> Tensor:
    """Coverage of a signed distance (pixels, negative inside) with a one-pixel soft edge."""
    return (0.5 - d).clamp(0.0, 1.0)


def sd_circle(u, v, r):
    return torch.hypot(u, v) - r


def sd_box(u, v, h):
    qx, qy = u.abs() - h, v.abs() - h
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def sd_triangle(u, v, r):
    """Equilateral triangle with circumradius r pointing along +u."""
    d = None
    for ang in (60.0, 180.0, 300.0):
        e = math.cos(ang * DEG) * u + math.sin(ang * DEG) * v
        d = e if d is None else torch.maximum(d, e)
    return d - r / 2


def sd_ellipse(u, v, a, b):
    k0 = torch.hypot(u / a, v / b)
    k1 = torch.hypot(u / (a * a), v / (b * b)).clamp(min=1e-6)
    return k0 * (k0 - 1) / k1


def sd_segment(u, v, lo, hi):
    """Distance to the segment from (lo, 0) to (hi, 0)."""
    return torch.hypot(u - torch.maximum(torch.minimum(u, hi), lo), v)


def sd_arc(u, v, r, half_gap):
    """Distance to a circle of radius r with a gap of +-half_gap (radians) around the +u direction."""
    on_arc = torch.atan2(v.abs(), u) >= half_gap
    ex, ey = r * torch.cos(half_gap), r * torch.sin(half_gap)
    return torch.where(on_arc, (torch.hypot(u, v) - r).abs(), torch.hypot(u - ex, v.abs() - ey))


def grid(device) -> tuple[Tensor, Tensor]:
    c = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x[None], y[None]


def place(rng: Rng, m: int, extent: Tensor) -> tuple[Tensor, Tensor]:
    """Random centre keeping a disc of radius ``extent`` inside the image (1 px margin)."""
    free = (SIZE - 2 * (extent + 1)).clamp(min=0)
    return extent + 1 + rng.u(m) * free, extent + 1 + rng.u(m) * free


def colours(rng: Rng, bg: Tensor) -> Tensor:
    """Colours [m,3] with a clear luminance contrast to the background colours ``bg`` [m,3]."""
    m = bg.shape[0]
    lum = bg.mean(1)
    target = lum + torch.where(lum < 0.5, 1.0, -1.0) * rng.u(m, lo=0.2, hi=0.75)
    chroma = rng.u(m, 3, lo=-0.3, hi=0.3)
    return (target[:, None] + chroma - chroma.mean(1, keepdim=True)).clamp(0, 1)


def over(img: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    a = alpha[:, None]
    return img * (1 - a) + colour[:, :, None, None] * a


def blur(img: Tensor) -> Tensor:
    k = torch.tensor([0.25, 0.5, 0.25], device=img.device)
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), k2, groups=3)


def background(rng: Rng, n: int, x: Tensor, y: Tensor, gray_frac: float) -> tuple[Tensor, Tensor, Tensor]:
    """Background images [n,3,H,W], their mean colours [n,3] and the light-on-dark mask [n]."""
    bg = rng.u(n, 3)
    gray = rng.u(n) < gray_frac
    bg = torch.where(gray[:, None], rng.u(n, lo=0.0, hi=0.15)[:, None].expand(n, 3), bg)
    grad = rng.u(n, 2, lo=-0.012, hi=0.012) * (~gray)[:, None]
    ramp = per_image(grad[:, 0]) * (x - SIZE / 2) + per_image(grad[:, 1]) * (y - SIZE / 2)
    img = (bg[:, :, None, None] + ramp[:, None]).clamp(0, 1)
    return img, bg, gray


def fg_colours(rng: Rng, bg: Tensor, gray: Tensor) -> Tensor:
    m = bg.shape[0]
    return torch.where(gray[:, None], rng.u(m, lo=0.45, hi=1.0)[:, None].expand(m, 3), colours(rng, bg))


def finish(rng: Rng, img: Tensor, blur_prob: float, noise_hi: float) -> Tensor:
    n = img.shape[0]
    a = (rng.u(n) * (rng.u(n) < blur_prob))[:, None, None, None]
    img = img * (1 - a) + blur(blur(img)) * a
    img = img + rng.n(n, 3, SIZE, SIZE) * rng.u(n, hi=noise_hi)[:, None, None, None]
    return img.clamp(0, 1)
