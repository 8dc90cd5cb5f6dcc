"""Procedurally generated, fully offline SYNTHETIC image data (32x32 RGB), vectorised in torch.

Nothing here is real-world data: every image is drawn from random parameters with signed-distance
functions evaluated on a pixel grid, a whole batch at a time, on CPU or CUDA. Two families:

``pretrain`` (46 classes)
    The upstream pre-training task of the demo backbone (``examples/pretrain_demo_backbone.py``):
    single primitives -- filled and outlined discs, rings, squares/diamonds, triangles, ellipses,
    line strokes, arcs, corners, crosses, stripe gratings, checkerboards and counted blobs -- where
    the label is the primitive type times an attribute (orientation, opening direction, count).
    Random position, scale, mild affine distortion, stroke thickness, colours (sometimes low
    contrast), background gradient, a short distractor stroke, blur, re-sampling through 10x10 or
    16x16 (like upsampled 8x8 digits) and noise; about a third of the images are light strokes on a
    dark background. The aim is edge, stroke, curvature and layout features that transfer to
    handwritten digits. The demo ViT reaches about 96% held-out accuracy on it after the default
    ``pretrain_demo_backbone.py`` run, so it is learnable but not trivial.

``shapes`` (25 classes)
    A harder synthetic fine-tuning benchmark, distinct from ``pretrain``: composite glyphs whose
    label needs finer detail -- two small primitives in a spatial relation (left/right/above/below,
    or one inside the other), counts of 2-5 small dots, fine textures inside a patch, closed rings
    versus rings with a small gap, and L/T/+ stroke junctions under any rotation. Build it with
    :class:`SyntheticDataset` and a fixed seed (``SHAPES_TRAIN_SEED``/``SHAPES_VAL_SEED``) so the
    dataset is identical every time.

API: :func:`generate_batch`, :func:`num_classes`, :func:`class_names`, :class:`SyntheticDataset`.
A CPU and a CUDA generator with the same seed give different (each reproducible) streams.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 32
SHAPES_TRAIN_SEED = 20_250
SHAPES_VAL_SEED = 20_251
_CHUNK = 1024  # SyntheticDataset generates in chunks of this size (part of its determinism)
_DEG = math.pi / 180.0

# --- class tables: (name, kind, attribute) --------------------------------------------------------
_DIRS4 = ("right", "down", "left", "up")  # angle = index * 90 deg (image y axis points down)
_ORIENT4 = ("0", "45", "90", "135")  # angle = index * 45 deg (180-deg symmetric things)

_PRETRAIN: list[tuple[str, str, int]] = (
    [("disc", "disc", 0), ("ring", "ring", 0)]
    + [(f"square_{a}", "square", i) for i, a in enumerate(("axis", "diamond"))]
    + [(f"square_outline_{a}", "square_outline", i) for i, a in enumerate(("axis", "diamond"))]
    + [(f"triangle_{d}", "triangle", i) for i, d in enumerate(_DIRS4)]
    + [(f"triangle_outline_{d}", "triangle_outline", i) for i, d in enumerate(_DIRS4)]
    + [(f"ellipse_{o}", "ellipse", i) for i, o in enumerate(_ORIENT4)]
    + [(f"ellipse_outline_{o}", "ellipse_outline", i) for i, o in enumerate(_ORIENT4)]
    + [(f"line_{o}", "line", i) for i, o in enumerate(_ORIENT4)]
    + [(f"arc_open_{d}", "arc", i) for i, d in enumerate(_DIRS4)]
    + [(f"corner_{d}", "corner", i) for i, d in enumerate(_DIRS4)]
    + [("cross_plus", "cross", 0), ("cross_x", "cross", 1)]
    + [(f"grating_{o}", "grating", i) for i, o in enumerate(_ORIENT4)]
    + [(f"checker_{a}", "checker", i) for i, a in enumerate(("axis", "diagonal"))]
    + [(f"blobs_{k}", "blobs", k) for k in (1, 2, 3, 4)]
)
_REL = ("left_of", "right_of", "above", "below")
_SHAPES: list[tuple[str, str, int]] = (
    [(f"disc_{r}_square", "pair_disc_square", i) for i, r in enumerate(_REL)]
    + [(f"triangle_{r}_ring", "pair_triangle_ring", i) for i, r in enumerate(_REL)]
    + [(n, "inside", i) for i, n in enumerate(
        ("disc_in_square", "triangle_in_square", "square_in_ring", "triangle_in_ring"))]
    + [(f"dots_{k}", "count", k) for k in (2, 3, 4, 5)]
    + [(f"texture_{t}", "texture", i) for i, t in enumerate(("hstripes", "vstripes", "checker", "dots"))]
    + [("ring_closed", "ring_gap", 0), ("ring_with_gap", "ring_gap", 1)]
    + [(f"junction_{j}", "junction", i) for i, j in enumerate(("L", "T", "plus"))]
)
_FAMILIES = {"pretrain": _PRETRAIN, "shapes": _SHAPES}


def _table(family: str) -> list[tuple[str, str, int]]:
    if family not in _FAMILIES:
        raise ValueError(f"unknown synthetic family {family!r}; valid families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[family]


def num_classes(family: str) -> int:
    """Number of labels in ``family`` ('pretrain': 46, 'shapes': 25)."""
    return len(_table(family))


def class_names(family: str) -> list[str]:
    """Class names of ``family``, indexed by label."""
    return [name for name, _, _ in _table(family)]


# --- random numbers and geometry -------------------------------------------------------------------
class _Rng:
    """Draws from ``generator`` (on its own device) and moves the result to ``device``."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.g, self.device = generator, device

    def u(self, *shape: int, lo: float | Tensor = 0.0, hi: float | Tensor = 1.0) -> Tensor:
        r = torch.rand(*shape, generator=self.g, device=self.g.device).to(self.device)
        return lo + (hi - lo) * r

    def n(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g, device=self.g.device).to(self.device)


def _c(t: Tensor) -> Tensor:  # [m] -> [m,1,1]
    return t[:, None, None]


def _local(x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, th: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel grid in a frame centred at (cx, cy) and rotated by ``th`` (radians, y axis down)."""
    dx, dy = x - _c(cx), y - _c(cy)
    c, s = _c(torch.cos(th)), _c(torch.sin(th))
    return c * dx + s * dy, -s * dx + c * dy


def _alpha(d: Tensor) -> Tensor:
    """Coverage of a signed distance (pixels, negative inside) with a one-pixel soft edge."""
    return (0.5 - d).clamp(0.0, 1.0)


def _sd_circle(u, v, r):
    return torch.hypot(u, v) - r


def _sd_box(u, v, h):
    qx, qy = u.abs() - h, v.abs() - h
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _sd_triangle(u, v, r):
    """Equilateral triangle with circumradius r pointing along +u."""
    d = None
    for ang in (60.0, 180.0, 300.0):
        e = math.cos(ang * _DEG) * u + math.sin(ang * _DEG) * v
        d = e if d is None else torch.maximum(d, e)
    return d - r / 2


def _sd_ellipse(u, v, a, b):
    k0 = torch.hypot(u / a, v / b)
    k1 = torch.hypot(u / (a * a), v / (b * b)).clamp(min=1e-6)
    return k0 * (k0 - 1) / k1


def _sd_segment(u, v, lo, hi):
    """Distance to the segment from (lo, 0) to (hi, 0)."""
    return torch.hypot(u - torch.maximum(torch.minimum(u, hi), lo), v)


def _sd_arc(u, v, r, half_gap):
    """Distance to a circle of radius r with a gap of +-half_gap (radians) around the +u direction."""
    on_arc = torch.atan2(v.abs(), u) >= half_gap
    ex, ey = r * torch.cos(half_gap), r * torch.sin(half_gap)
    return torch.where(on_arc, (torch.hypot(u, v) - r).abs(), torch.hypot(u - ex, v.abs() - ey))


def _grid(device) -> tuple[Tensor, Tensor]:
    c = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x[None], y[None]


def _place(rng: _Rng, m: int, extent: Tensor) -> tuple[Tensor, Tensor]:
    """Random centre keeping a disc of radius ``extent`` inside the image (1 px margin)."""
    free = (SIZE - 2 * (extent + 1)).clamp(min=0)
    return extent + 1 + rng.u(m) * free, extent + 1 + rng.u(m) * free


def _colours(rng: _Rng, bg: Tensor) -> Tensor:
    """Colours [m,3] with a clear luminance contrast to the background colours ``bg`` [m,3]."""
    m = bg.shape[0]
    lum = bg.mean(1)
    target = lum + torch.where(lum < 0.5, 1.0, -1.0) * rng.u(m, lo=0.2, hi=0.75)
    chroma = rng.u(m, 3, lo=-0.3, hi=0.3)
    return (target[:, None] + chroma - chroma.mean(1, keepdim=True)).clamp(0, 1)


def _over(img: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    a = alpha[:, None]
    return img * (1 - a) + colour[:, :, None, None] * a


# --- pretrain family -------------------------------------------------------------------------------
def _jitter(rng, m, deg):
    return rng.u(m, lo=-deg * _DEG, hi=deg * _DEG)


def _pretrain_alpha(kind: str, attr: Tensor, rng: _Rng, x: Tensor, y: Tensor) -> Tensor:
    m = attr.shape[0]
    attr = attr.float()
    t = _c(rng.u(m, lo=1.2, hi=3.5))  # stroke thickness
    r = rng.u(m, lo=4.5, hi=12.0)

    def frame(extent: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Random placement, rotation ``theta`` and a mild random affine distortion."""
        cx, cy = _place(rng, m, extent)
        u, v = _local(x, y, cx, cy, theta)
        sx, sy, shear = rng.u(m, lo=0.85, hi=1.18), rng.u(m, lo=0.85, hi=1.18), rng.u(m, lo=-0.12, hi=0.12)
        return u * _c(sx) + v * _c(shear), v * _c(sy)

    def oriented(step_deg: float, jitter_deg: float) -> Tensor:
        return attr * step_deg * _DEG + _jitter(rng, m, jitter_deg)

    outline = kind.endswith("outline") or kind == "ring"
    if kind in ("disc", "ring"):
        u, v = frame(r, rng.u(m, hi=2 * math.pi))
        d = _sd_circle(u, v, _c(r) * 0.9)
    elif kind in ("square", "square_outline"):
        u, v = frame(r, oriented(45, 12))
        d = _sd_box(u, v, _c(r) * 0.65)
    elif kind in ("triangle", "triangle_outline"):
        u, v = frame(r, oriented(90, 20))
        d = _sd_triangle(u, v, _c(r))
    elif kind in ("ellipse", "ellipse_outline"):
        u, v = frame(r, oriented(45, 14))
        b = (r / rng.u(m, lo=1.9, hi=2.8)).clamp(min=2.0)
        d = _sd_ellipse(u, v, _c(r), _c(b))
    elif kind == "line":
        u, v = frame(r, oriented(45, 13))
        d = _sd_segment(u, v, -_c(r), _c(r)) - t / 2
    elif kind == "arc":
        rr = r.clamp(min=5.5)
        u, v = frame(rr, oriented(90, 20))
        d = _sd_arc(u, v, _c(rr), _c(rng.u(m, lo=30.0, hi=65.0) * _DEG)) - t / 2
    elif kind == "corner":  # arms along local +u and +v, bounding box centred; attr = quadrant
        arm, th = r * 1.4, oriented(90, 20)
        u, v = frame(arm * 0.75 + 1, th)
        u, v = u + _c(arm) / 2, v + _c(arm) / 2
        zero = torch.zeros_like(_c(arm))
        d = torch.minimum(_sd_segment(u, v, zero, _c(arm)), _sd_segment(v, u, zero, _c(arm))) - t / 2
    elif kind == "cross":
        u, v = frame(r, oriented(45, 12))
        d = torch.minimum(_sd_segment(u, v, -_c(r), _c(r)), _sd_segment(v, u, -_c(r), _c(r))) - t / 2
    else:
        d = None
    if d is not None:
        return _alpha(d.abs() - t / 2 if outline else d)
    if kind == "grating":
        period = _c(rng.u(m, lo=3.5, hi=9.0))
        u, _ = _local(x, y, rng.u(m, hi=SIZE), rng.u(m, hi=SIZE), attr * 45 * _DEG + _jitter(rng, m, 12))
        w = torch.sin(2 * math.pi * u / period)
        return (w * _c(rng.u(m, lo=1.0, hi=4.0)) + 0.5).clamp(0, 1)
    if kind == "checker":
        cell = _c(rng.u(m, lo=3.0, hi=6.5))
        u, v = _local(x, y, rng.u(m, hi=SIZE), rng.u(m, hi=SIZE), attr * 45 * _DEG + _jitter(rng, m, 12))
        w = torch.sin(math.pi * u / cell) * torch.sin(math.pi * v / cell)
        return (w * _c(rng.u(m, lo=2.0, hi=6.0)) + 0.5).clamp(0, 1)
    if kind == "blobs":  # attr = count, blobs in distinct cells of a jittered 3x3 grid
        cells = torch.argsort(rng.u(m, 9), dim=1)
        sigma = _c(rng.u(m, lo=1.3, hi=2.1))
        out = torch.zeros(m, SIZE, SIZE, device=x.device)
        for j in range(4):
            ci = cells[:, j].float()
            bx = 6.5 + 9.5 * (ci % 3) + rng.u(m, lo=-1.5, hi=1.5)
            by = 6.5 + 9.5 * torch.div(ci, 3, rounding_mode="floor") + rng.u(m, lo=-1.5, hi=1.5)
            g = torch.exp(-((x - _c(bx)) ** 2 + (y - _c(by)) ** 2) / (2 * sigma**2))
            out = torch.maximum(out, g * _c((attr > j).float()))
        return (out * 1.6).clamp(0, 1)
    raise AssertionError(kind)


def _blur(img: Tensor) -> Tensor:
    k = torch.tensor([0.25, 0.5, 0.25], device=img.device)
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), k2, groups=3)


def _background(rng: _Rng, n: int, x: Tensor, y: Tensor, gray_frac: float) -> tuple[Tensor, Tensor, Tensor]:
    """Background images [n,3,H,W], their mean colours [n,3] and the light-on-dark mask [n]."""
    bg = rng.u(n, 3)
    gray = rng.u(n) < gray_frac
    bg = torch.where(gray[:, None], rng.u(n, lo=0.0, hi=0.15)[:, None].expand(n, 3), bg)
    grad = rng.u(n, 2, lo=-0.012, hi=0.012) * (~gray)[:, None]
    ramp = _c(grad[:, 0]) * (x - SIZE / 2) + _c(grad[:, 1]) * (y - SIZE / 2)
    img = (bg[:, :, None, None] + ramp[:, None]).clamp(0, 1)
    return img, bg, gray


def _fg_colours(rng: _Rng, bg: Tensor, gray: Tensor) -> Tensor:
    m = bg.shape[0]
    return torch.where(gray[:, None], rng.u(m, lo=0.45, hi=1.0)[:, None].expand(m, 3), _colours(rng, bg))


def _finish(rng: _Rng, img: Tensor, blur_prob: float, noise_hi: float) -> Tensor:
    n = img.shape[0]
    a = (rng.u(n) * (rng.u(n) < blur_prob))[:, None, None, None]
    img = img * (1 - a) + _blur(_blur(img)) * a
    img = img + rng.n(n, 3, SIZE, SIZE) * rng.u(n, hi=noise_hi)[:, None, None, None]
    return img.clamp(0, 1)


def _render(labels: Tensor, rng: _Rng, table, alpha_fn: Callable, gray_frac: float, blur_prob: float,
            noise_hi: float) -> Tensor:
    n, device = labels.shape[0], labels.device
    x, y = _grid(device)
    img, bg, gray = _background(rng, n, x, y, gray_frac)
    kinds = sorted({k for _, k, _ in table})
    kind_of = torch.tensor([kinds.index(k) for _, k, _ in table], device=device)[labels]
    attr_of = torch.tensor([a for _, _, a in table], device=device)[labels]
    for ki, kind in enumerate(kinds):
        idx = torch.nonzero(kind_of == ki).flatten()
        if idx.numel() == 0:
            continue
        img[idx] = alpha_fn(kind, attr_of[idx], rng, x, y, img[idx], bg[idx], gray[idx])
    return _finish(rng, img, blur_prob, noise_hi)


def _low_res(rng: _Rng, img: Tensor, prob: float) -> Tensor:
    """With ``prob``, re-sample an image through 10x10 or 16x16 (like upsampled 8x8 digits)."""
    m = img.shape[0]
    pick = rng.u(m)
    out = img
    for size, lo, hi in ((10, 0.0, prob / 2), (16, prob / 2, prob)):
        small = F.interpolate(img, size=(size, size), mode="area")
        up = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        out = torch.where(((pick >= lo) & (pick < hi))[:, None, None, None], up, out)
    return out


def _pretrain_layer(kind, attr, rng, x, y, img, bg, gray):
    m = attr.shape[0]
    img = _over(img, _pretrain_alpha(kind, attr, rng, x, y), _fg_colours(rng, bg, gray))
    # a short thin distractor stroke in 40% of the images (never longer than the shortest line class)
    u, v = _local(x, y, rng.u(m, lo=3.0, hi=SIZE - 3.0), rng.u(m, lo=3.0, hi=SIZE - 3.0), rng.u(m, hi=math.pi))
    half = _c(rng.u(m, lo=1.0, hi=2.5))
    d = _sd_segment(u, v, -half, half) - _c(rng.u(m, lo=0.4, hi=0.9))
    img = _over(img, _alpha(d) * _c((rng.u(m) < 0.4).float()), _fg_colours(rng, bg, gray))
    return img if kind in ("grating", "checker") else _low_res(rng, img, 0.25)


# --- shapes family ---------------------------------------------------------------------------------
def _small(name: str, rng: _Rng, x, y, cx, cy, r) -> Tensor:
    """Alpha of a small primitive of circumradius ``r`` [m] at (cx, cy), random rotation."""
    m = r.shape[0]
    u, v = _local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
    if name == "disc":
        return _alpha(_sd_circle(u, v, _c(r) * 0.85))
    if name == "square":
        return _alpha(_sd_box(u, v, _c(r) * 0.72))
    if name == "triangle":
        return _alpha(_sd_triangle(u, v, _c(r)))
    return _alpha(_sd_circle(u, v, _c(r) * 0.85).abs() - _c(rng.u(m, lo=0.7, hi=1.2)))


def _shapes_layer(kind, attr, rng, x, y, img, bg, gray):
    m = attr.shape[0]
    col = lambda: _fg_colours(rng, bg, gray)  # noqa: E731
    if kind.startswith("pair_"):
        a_name, b_name = kind.split("_")[1:]
        ra, rb = rng.u(m, lo=3.0, hi=5.0), rng.u(m, lo=3.0, hi=5.0)
        gap = ra + rb + rng.u(m, lo=1.5, hi=7.0)
        along, across = gap, rng.u(m, lo=-2.5, hi=2.5)
        horizontal = attr < 2
        sgn = torch.where(attr % 2 == 0, -1.0, 1.0)  # left_of/above: A has the smaller coordinate
        dx = torch.where(horizontal, sgn * along, across)
        dy = torch.where(horizontal, across, sgn * along)
        ext_x, ext_y = dx.abs() / 2 + 5.5, dy.abs() / 2 + 5.5
        mx = ext_x + rng.u(m) * (SIZE - 2 * ext_x).clamp(min=0)
        my = ext_y + rng.u(m) * (SIZE - 2 * ext_y).clamp(min=0)
        img = _over(img, _small(a_name, rng, x, y, mx + dx / 2, my + dy / 2, ra), col())
        return _over(img, _small(b_name, rng, x, y, mx - dx / 2, my - dy / 2, rb), col())
    if kind == "inside":
        inner = ("disc", "triangle", "square", "triangle")  # by attr, see the class table
        outer_ring = attr >= 2
        ro = rng.u(m, lo=8.5, hi=13.0)
        cx, cy = _place(rng, m, ro)
        u, v = _local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
        t = _c(rng.u(m, lo=0.7, hi=1.4))
        d_out = torch.where(_c(outer_ring), _sd_circle(u, v, _c(ro)), _sd_box(u, v, _c(ro) * 0.75))
        img = _over(img, _alpha(d_out.abs() - t), col())
        ri = rng.u(m, lo=2.5, hi=4.0)
        room = (ro * 0.6 - ri - 1).clamp(min=0)
        ang, rad = rng.u(m, hi=2 * math.pi), rng.u(m) * room
        ix, iy = cx + rad * torch.cos(ang), cy + rad * torch.sin(ang)
        alpha = torch.zeros(m, SIZE, SIZE, device=x.device)
        for i, name in enumerate(inner):
            alpha = torch.where(_c(attr == i), _small(name, rng, x, y, ix, iy, ri), alpha)
        return _over(img, alpha, col())
    if kind == "count":  # attr dots in distinct cells of a jittered 3x3 grid
        cells = torch.argsort(rng.u(m, 9), dim=1)
        alpha = torch.zeros(m, SIZE, SIZE, device=x.device)
        for j in range(5):
            ci = cells[:, j].float()
            bx = 6.0 + 10.0 * (ci % 3) + rng.u(m, lo=-2.0, hi=2.0)
            by = 6.0 + 10.0 * torch.div(ci, 3, rounding_mode="floor") + rng.u(m, lo=-2.0, hi=2.0)
            dot = _small("disc", rng, x, y, bx, by, rng.u(m, lo=1.6, hi=2.8))
            alpha = torch.maximum(alpha, dot * _c((attr > j).float()))
        return _over(img, alpha, col())
    if kind == "texture":
        rw = rng.u(m, lo=8.0, hi=13.0)
        cx, cy = _place(rng, m, rw)
        u, v = _local(x, y, cx, cy, _jitter(rng, m, 10) + torch.where(attr == 1, math.pi / 2, 0.0))
        period = _c(rng.u(m, lo=2.6, hi=4.0))
        stripes = torch.sin(2 * math.pi * u / period)
        checker = torch.sin(math.pi * u / period * 1.3) * torch.sin(math.pi * v / period * 1.3)
        dots = torch.cos(2 * math.pi * u / period) * torch.cos(2 * math.pi * v / period) * 2 - 1
        w = torch.where(_c(attr < 2), stripes, torch.where(_c(attr == 2), checker, dots))
        window = _alpha(torch.where(_c(rng.u(m) < 0.5), _sd_circle(u, v, _c(rw)), _sd_box(u, v, _c(rw) * 0.85)))
        return _over(img, (w * 3 + 0.5).clamp(0, 1) * window, col())
    if kind == "ring_gap":
        r = rng.u(m, lo=6.0, hi=11.0)
        cx, cy = _place(rng, m, r)
        u, v = _local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
        half_gap = rng.u(m, lo=1.4, hi=2.6) / r * (attr == 1).float()  # 3-5 px of arc when open
        d = _sd_arc(u, v, _c(r), _c(half_gap)) - _c(rng.u(m, lo=0.6, hi=1.1))
        return _over(img, _alpha(d), col())
    if kind == "junction":  # L: arms +u,+v; T: -u..+u and +v; plus: -u..+u and -v..+v
        arm = rng.u(m, lo=5.0, hi=10.0)
        cx, cy = _place(rng, m, arm)
        u, v = _local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
        lo_u = torch.where(_c(attr == 0), 0.0, -_c(arm))
        lo_v = torch.where(_c(attr == 2), -_c(arm), 0.0)
        d = torch.minimum(_sd_segment(u, v, lo_u, _c(arm)), _sd_segment(v, u, lo_v, _c(arm)))
        return _over(img, _alpha(d - _c(rng.u(m, lo=0.6, hi=1.5))), col())
    raise AssertionError(kind)


# --- public API ------------------------------------------------------------------------------------
def generate_batch(family: str, n: int, generator: torch.Generator, device="cpu") -> tuple[Tensor, Tensor]:
    """``n`` synthetic images float32 [n,3,32,32] in [0,1] and int64 labels [n] of ``family``.

    Labels are balanced within the batch (each class appears ``n // num_classes`` or one more times)
    and shuffled. Random numbers come from ``generator`` on its own device; the same generator state
    gives the same batch.
    """
    table = _table(family)
    device = torch.device(device)
    rng = _Rng(generator, device)
    k = len(table)
    offset = int(torch.randint(k, (1,), generator=generator, device=generator.device))
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    labels = ((torch.arange(n, device=device) + offset) % k)[order]
    if family == "pretrain":
        img = _render(labels, rng, table, _pretrain_layer, gray_frac=0.35, blur_prob=0.5, noise_hi=0.10)
    else:
        img = _render(labels, rng, table, _shapes_layer, gray_frac=0.2, blur_prob=0.3, noise_hi=0.10)
    return img.float().contiguous(), labels.long()


class SyntheticDataset(torch.utils.data.Dataset):
    """``size`` synthetic samples of ``family``, materialised deterministically from ``seed``.

    Images are stored as uint8 (so the tensor and PIL paths agree); ``__getitem__`` returns
    ``(transform(PIL RGB image), label)`` when a transform is given, else ``(float tensor [3,32,32]
    in [0,1], label)``.
    """

    def __init__(self, family: str, size: int, seed: int, transform=None):
        self.family, self.transform = family, transform
        self.classes = class_names(family)
        g = torch.Generator().manual_seed(int(seed))
        images, labels = [], []
        for start in range(0, size, _CHUNK):
            img, lab = generate_batch(family, min(_CHUNK, size - start), g)
            images.append((img * 255).round().to(torch.uint8))
            labels.append(lab)
        self.images = torch.cat(images) if images else torch.empty(0, 3, SIZE, SIZE, dtype=torch.uint8)
        self.labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        label = int(self.labels[i])
        if self.transform is None:
            return self.images[i].float() / 255.0, label
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy(), "RGB")), label
