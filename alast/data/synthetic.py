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

from alast.data import drawing as D
from alast.data.drawing import SIZE

SHAPES_TRAIN_SEED = 1234  # the seeds of the `shapes` data spec (every benchmark uses them)
SHAPES_VAL_SEED = 5678
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


# --- pretrain family -------------------------------------------------------------------------------
def _jitter(rng, m, deg):
    return rng.u(m, lo=-deg * _DEG, hi=deg * _DEG)


def _pretrain_alpha(kind: str, attr: Tensor, rng: D.Rng, x: Tensor, y: Tensor) -> Tensor:
    m = attr.shape[0]
    attr = attr.float()
    t = D.per_image(rng.u(m, lo=1.2, hi=3.5))  # stroke thickness
    r = rng.u(m, lo=4.5, hi=12.0)

    def frame(extent: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Random placement, rotation ``theta`` and a mild random affine distortion."""
        cx, cy = D.place(rng, m, extent)
        u, v = D.local(x, y, cx, cy, theta)
        sx, sy, shear = rng.u(m, lo=0.85, hi=1.18), rng.u(m, lo=0.85, hi=1.18), rng.u(m, lo=-0.12, hi=0.12)
        return u * D.per_image(sx) + v * D.per_image(shear), v * D.per_image(sy)

    def oriented(step_deg: float, jitter_deg: float) -> Tensor:
        return attr * step_deg * _DEG + _jitter(rng, m, jitter_deg)

    outline = kind.endswith("outline") or kind == "ring"
    if kind in ("disc", "ring"):
        u, v = frame(r, rng.u(m, hi=2 * math.pi))
        d = D.sd_circle(u, v, D.per_image(r) * 0.9)
    elif kind in ("square", "square_outline"):
        u, v = frame(r, oriented(45, 12))
        d = D.sd_box(u, v, D.per_image(r) * 0.65)
    elif kind in ("triangle", "triangle_outline"):
        u, v = frame(r, oriented(90, 20))
        d = D.sd_triangle(u, v, D.per_image(r))
    elif kind in ("ellipse", "ellipse_outline"):
        u, v = frame(r, oriented(45, 14))
        b = (r / rng.u(m, lo=1.9, hi=2.8)).clamp(min=2.0)
        d = D.sd_ellipse(u, v, D.per_image(r), D.per_image(b))
    elif kind == "line":
        u, v = frame(r, oriented(45, 13))
        d = D.sd_segment(u, v, -D.per_image(r), D.per_image(r)) - t / 2
    elif kind == "arc":
        rr = r.clamp(min=5.5)
        u, v = frame(rr, oriented(90, 20))
        d = D.sd_arc(u, v, D.per_image(rr), D.per_image(rng.u(m, lo=30.0, hi=65.0) * _DEG)) - t / 2
    elif kind == "corner":  # arms along local +u and +v, bounding box centred; attr = quadrant
        arm, th = r * 1.4, oriented(90, 20)
        u, v = frame(arm * 0.75 + 1, th)
        u, v = u + D.per_image(arm) / 2, v + D.per_image(arm) / 2
        zero = torch.zeros_like(D.per_image(arm))
        d = torch.minimum(D.sd_segment(u, v, zero, D.per_image(arm)), D.sd_segment(v, u, zero, D.per_image(arm))) - t / 2
    elif kind == "cross":
        u, v = frame(r, oriented(45, 12))
        d = torch.minimum(D.sd_segment(u, v, -D.per_image(r), D.per_image(r)), D.sd_segment(v, u, -D.per_image(r), D.per_image(r))) - t / 2
    else:
        d = None
    if d is not None:
        return D.alpha(d.abs() - t / 2 if outline else d)
    if kind == "grating":
        period = D.per_image(rng.u(m, lo=3.5, hi=9.0))
        u, _ = D.local(x, y, rng.u(m, hi=SIZE), rng.u(m, hi=SIZE), attr * 45 * _DEG + _jitter(rng, m, 12))
        w = torch.sin(2 * math.pi * u / period)
        return (w * D.per_image(rng.u(m, lo=1.0, hi=4.0)) + 0.5).clamp(0, 1)
    if kind == "checker":
        cell = D.per_image(rng.u(m, lo=3.0, hi=6.5))
        u, v = D.local(x, y, rng.u(m, hi=SIZE), rng.u(m, hi=SIZE), attr * 45 * _DEG + _jitter(rng, m, 12))
        w = torch.sin(math.pi * u / cell) * torch.sin(math.pi * v / cell)
        return (w * D.per_image(rng.u(m, lo=2.0, hi=6.0)) + 0.5).clamp(0, 1)
    if kind == "blobs":  # attr = count, blobs in distinct cells of a jittered 3x3 grid
        cells = torch.argsort(rng.u(m, 9), dim=1)
        sigma = D.per_image(rng.u(m, lo=1.3, hi=2.1))
        out = torch.zeros(m, SIZE, SIZE, device=x.device)
        for j in range(4):
            ci = cells[:, j].float()
            bx = 6.5 + 9.5 * (ci % 3) + rng.u(m, lo=-1.5, hi=1.5)
            by = 6.5 + 9.5 * torch.div(ci, 3, rounding_mode="floor") + rng.u(m, lo=-1.5, hi=1.5)
            g = torch.exp(-((x - D.per_image(bx)) ** 2 + (y - D.per_image(by)) ** 2) / (2 * sigma**2))
            out = torch.maximum(out, g * D.per_image((attr > j).float()))
        return (out * 1.6).clamp(0, 1)
    raise AssertionError(kind)


def _render(labels: Tensor, rng: D.Rng, table, alpha_fn: Callable, gray_frac: float, blur_prob: float,
            noise_hi: float) -> Tensor:
    n, device = labels.shape[0], labels.device
    x, y = D.grid(device)
    img, bg, gray = D.background(rng, n, x, y, gray_frac)
    kinds = sorted({k for _, k, _ in table})
    kind_of = torch.tensor([kinds.index(k) for _, k, _ in table], device=device)[labels]
    attr_of = torch.tensor([a for _, _, a in table], device=device)[labels]
    for ki, kind in enumerate(kinds):
        idx = torch.nonzero(kind_of == ki).flatten()
        if idx.numel() == 0:
            continue
        img[idx] = alpha_fn(kind, attr_of[idx], rng, x, y, img[idx], bg[idx], gray[idx])
    return D.finish(rng, img, blur_prob, noise_hi)


def _low_res(rng: D.Rng, img: Tensor, prob: float) -> Tensor:
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
    img = D.over(img, _pretrain_alpha(kind, attr, rng, x, y), D.fg_colours(rng, bg, gray))
    # a short thin distractor stroke in 40% of the images (never longer than the shortest line class)
    u, v = D.local(x, y, rng.u(m, lo=3.0, hi=SIZE - 3.0), rng.u(m, lo=3.0, hi=SIZE - 3.0), rng.u(m, hi=math.pi))
    half = D.per_image(rng.u(m, lo=1.0, hi=2.5))
    d = D.sd_segment(u, v, -half, half) - D.per_image(rng.u(m, lo=0.4, hi=0.9))
    img = D.over(img, D.alpha(d) * D.per_image((rng.u(m) < 0.4).float()), D.fg_colours(rng, bg, gray))
    return img if kind in ("grating", "checker") else _low_res(rng, img, 0.25)


# --- shapes family ---------------------------------------------------------------------------------
def _small(name: str, rng: D.Rng, x, y, cx, cy, r) -> Tensor:
    """Alpha of a small primitive of circumradius ``r`` [m] at (cx, cy), random rotation."""
    m = r.shape[0]
    u, v = D.local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
    if name == "disc":
        return D.alpha(D.sd_circle(u, v, D.per_image(r) * 0.85))
    if name == "square":
        return D.alpha(D.sd_box(u, v, D.per_image(r) * 0.72))
    if name == "triangle":
        return D.alpha(D.sd_triangle(u, v, D.per_image(r)))
    return D.alpha(D.sd_circle(u, v, D.per_image(r) * 0.85).abs() - D.per_image(rng.u(m, lo=0.7, hi=1.2)))


def _shapes_layer(kind, attr, rng, x, y, img, bg, gray):
    m = attr.shape[0]
    col = lambda: D.fg_colours(rng, bg, gray)  # noqa: E731
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
        img = D.over(img, _small(a_name, rng, x, y, mx + dx / 2, my + dy / 2, ra), col())
        return D.over(img, _small(b_name, rng, x, y, mx - dx / 2, my - dy / 2, rb), col())
    if kind == "inside":
        inner = ("disc", "triangle", "square", "triangle")  # by attr, see the class table
        outer_ring = attr >= 2
        ro = rng.u(m, lo=8.5, hi=13.0)
        cx, cy = D.place(rng, m, ro)
        u, v = D.local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
        t = D.per_image(rng.u(m, lo=0.7, hi=1.4))
        d_out = torch.where(D.per_image(outer_ring), D.sd_circle(u, v, D.per_image(ro)), D.sd_box(u, v, D.per_image(ro) * 0.75))
        img = D.over(img, D.alpha(d_out.abs() - t), col())
        ri = rng.u(m, lo=2.5, hi=4.0)
        room = (ro * 0.6 - ri - 1).clamp(min=0)
        ang, rad = rng.u(m, hi=2 * math.pi), rng.u(m) * room
        ix, iy = cx + rad * torch.cos(ang), cy + rad * torch.sin(ang)
        alpha = torch.zeros(m, SIZE, SIZE, device=x.device)
        for i, name in enumerate(inner):
            alpha = torch.where(D.per_image(attr == i), _small(name, rng, x, y, ix, iy, ri), alpha)
        return D.over(img, alpha, col())
    if kind == "count":  # attr dots in distinct cells of a jittered 3x3 grid
        cells = torch.argsort(rng.u(m, 9), dim=1)
        alpha = torch.zeros(m, SIZE, SIZE, device=x.device)
        for j in range(5):
            ci = cells[:, j].float()
            bx = 6.0 + 10.0 * (ci % 3) + rng.u(m, lo=-2.0, hi=2.0)
            by = 6.0 + 10.0 * torch.div(ci, 3, rounding_mode="floor") + rng.u(m, lo=-2.0, hi=2.0)
            dot = _small("disc", rng, x, y, bx, by, rng.u(m, lo=1.6, hi=2.8))
            alpha = torch.maximum(alpha, dot * D.per_image((attr > j).float()))
        return D.over(img, alpha, col())
    if kind == "texture":
        rw = rng.u(m, lo=8.0, hi=13.0)
        cx, cy = D.place(rng, m, rw)
        u, v = D.local(x, y, cx, cy, _jitter(rng, m, 10) + torch.where(attr == 1, math.pi / 2, 0.0))
        period = D.per_image(rng.u(m, lo=2.6, hi=4.0))
        stripes = torch.sin(2 * math.pi * u / period)
        checker = torch.sin(math.pi * u / period * 1.3) * torch.sin(math.pi * v / period * 1.3)
        dots = torch.cos(2 * math.pi * u / period) * torch.cos(2 * math.pi * v / period) * 2 - 1
        w = torch.where(D.per_image(attr < 2), stripes, torch.where(D.per_image(attr == 2), checker, dots))
        window = D.alpha(torch.where(D.per_image(rng.u(m) < 0.5), D.sd_circle(u, v, D.per_image(rw)), D.sd_box(u, v, D.per_image(rw) * 0.85)))
        return D.over(img, (w * 3 + 0.5).clamp(0, 1) * window, col())
    if kind == "ring_gap":
        r = rng.u(m, lo=6.0, hi=11.0)
        cx, cy = D.place(rng, m, r)
        u, v = D.local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
        half_gap = rng.u(m, lo=1.4, hi=2.6) / r * (attr == 1).float()  # 3-5 px of arc when open
        d = D.sd_arc(u, v, D.per_image(r), D.per_image(half_gap)) - D.per_image(rng.u(m, lo=0.6, hi=1.1))
        return D.over(img, D.alpha(d), col())
    if kind == "junction":  # L: arms +u,+v; T: -u..+u and +v; plus: -u..+u and -v..+v
        arm = rng.u(m, lo=5.0, hi=10.0)
        cx, cy = D.place(rng, m, arm)
        u, v = D.local(x, y, cx, cy, rng.u(m, hi=2 * math.pi))
        lo_u = torch.where(D.per_image(attr == 0), 0.0, -D.per_image(arm))
        lo_v = torch.where(D.per_image(attr == 2), -D.per_image(arm), 0.0)
        d = torch.minimum(D.sd_segment(u, v, lo_u, D.per_image(arm)), D.sd_segment(v, u, lo_v, D.per_image(arm)))
        return D.over(img, D.alpha(d - D.per_image(rng.u(m, lo=0.6, hi=1.5))), col())
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
    rng = D.Rng(generator, device)
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
