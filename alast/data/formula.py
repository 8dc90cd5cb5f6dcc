"""Formula-driven images (FDSL): fractals of per-class iterated function systems, drawn in torch.

Nothing here is a natural image. Each class is one iterated function system (IFS): 2-4 random affine
maps ``p -> A p + t`` (FractalDB, Kataoka et al., ACCV 2020), drawn from a generator seeded by the
class index alone and kept only if its attractor covers a reasonable share of its bounding box. An
image of a class is that attractor rendered by the chaos game, with per-instance variation in the
FractalDB style (one of the class's parameters scaled by 0.8-1.2) plus flips, scale, translation,
stroke thickness, blur and colours (bright strokes on a dark background, one in five inverted).

Determinism: an image is a function of ``(label, instance seed)`` only -- not of the batch it is
drawn in, the device, or ``num_classes`` (class ``c`` is the same system in a 100- or a 1000-class
table). Per-instance draws come from a counter-based hash of the seed; the chaos game's map choices
come from one fixed table of uniforms shared by every image. Training draws seeds below
:data:`EVAL_SEED_BASE`; the held-out set (:func:`held_out_batch`, :class:`FormulaDataset`) uses seeds
at or above it, so held-out instances are never trained on.

API: :func:`generate_batch` (deterministic), :func:`sample_batch` (random labels and seeds from a
torch generator), :func:`held_out_batch`, :class:`FormulaDataset`, :func:`class_table`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_NUM_CLASSES = 1000
DEFAULT_SIZE = 112  # pixels, the side of the 12-block backbone's input
CLASS_SEED = 9_001  # seeds every class's system; changing it changes the whole data set
EVAL_SEED_BASE = 1 << 40  # instance seeds >= this are held out; training draws seeds below
MAX_MAPS = 4
CHAINS, STEPS, SKIP = 512, 40, 8  # chaos game: chains x (STEPS - SKIP) points per image
_SIGMA_CAP = 0.95  # largest singular value of a class's linear parts (contractive maps converge)
_FILL_RANGE = (0.12, 0.40)  # share of a 32x32 render of the attractor's box a class must cover
_CANDIDATES = 8  # systems drawn per class and search round
_BOX_SAMPLE = 2048  # points per image that set its box (quantiles of all would cost a big sort)
_CHUNK = 512  # images rendered together (bounds memory: CHAINS * STEPS points each)


class FormulaError(ValueError):
    """Bad arguments to the formula generator; the message says what to pass instead."""


# --- counter-based randomness -------------------------------------------------------------------------
def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps as unsigned arithmetic would)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _uniforms(keys: Tensor, n: int) -> Tensor:
    """``[B] int64 keys -> [B, n]`` uniforms in [0, 1), a pure function of key and column."""
    h = _mix(_mix(keys)[:, None] + torch.arange(n, device=keys.device))
    return _shr(h, 40).float() * 2.0 ** -24


@functools.lru_cache(maxsize=4)
def _choice_table(device: str) -> Tensor:
    """The ``[CHAINS, STEPS]`` uniforms that pick maps in the chaos game, the same for every image."""
    g = torch.Generator().manual_seed(20_240_9)
    return torch.rand(CHAINS, STEPS, generator=g).to(device)


# --- iterated function systems --------------------------------------------------------------------------
def _sigma_max(p: Tensor) -> Tensor:
    """Largest singular value of each 2x2 linear part ``(a, b, c, d) = p[..., :4]``."""
    a, b, c, d = p.unbind(-1)[:4]
    s = a * a + b * b + c * c + d * d
    det = a * d - b * c
    return torch.sqrt(0.5 * (s + torch.sqrt((s * s - 4 * det * det).clamp(min=0))))


def _cap_contraction(p: Tensor, cap: float) -> Tensor:
    """Scale linear parts whose largest singular value exceeds ``cap`` down to ``cap``."""
    f = (cap / _sigma_max(p).clamp(min=1e-12)).clamp(max=1.0)
    return torch.cat([p[..., :4] * f[..., None], p[..., 4:]], -1)


def _chaos_game(params: Tensor, n_maps: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """Points on each system's attractor: ``params [B, MAX_MAPS, 6]`` -> x, y ``[B, P, T - SKIP]``.

    Map ``i`` is picked with probability proportional to ``|det A_i|`` (FractalDB's rule; floored so
    thin maps still appear). Chain ``j`` starts at the fixed point of map ``j mod n_maps``, which lies
    on the attractor, so no point is off it; the first ``SKIP`` steps are dropped only because all
    chains start from a handful of points.
    """
    B, P, T = params.shape[0], table.shape[0], table.shape[1]
    used = torch.arange(MAX_MAPS, device=params.device)[None] < n_maps[:, None]
    a, b, c, d, e, f = params.unbind(-1)
    w = torch.where(used, (a * d - b * c).abs().clamp(min=0.02), torch.zeros_like(a))
    cum = (w / w.sum(1, keepdim=True)).cumsum(1)
    cum = torch.where(torch.arange(MAX_MAPS, device=params.device)[None] >= n_maps[:, None] - 1, 2.0, cum)
    det = (1 - a) * (1 - d) - b * c  # fixed point z = (I - A)^-1 t
    fx, fy = ((1 - d) * e + b * f) / det, (c * e + (1 - a) * f) / det
    start = torch.arange(P, device=params.device)[None] % n_maps[:, None]
    x, y = fx.gather(1, start), fy.gather(1, start)
    xs, ys = [], []
    for t in range(T):
        idx = (table[None, :, t, None] > cum[:, None, :-1]).sum(-1)
        q = params.gather(1, idx[..., None].expand(B, P, 6))
        x, y = q[..., 0] * x + q[..., 1] * y + q[..., 4], q[..., 2] * x + q[..., 3] * y + q[..., 5]
        if t >= SKIP:
            xs.append(x)
            ys.append(y)
    return torch.stack(xs, -1), torch.stack(ys, -1)


def _box_counts(x: Tensor, y: Tensor, size: int, fill: Tensor, shift: Tensor) -> Tensor:
    """Points to per-pixel counts ``[B, size, size]``: each attractor's box (its 1st-99th percentile
    range, so a few sparse outlying points do not shrink the dense part) scaled, aspect kept, so its
    longer side spans ``fill * size`` pixels, centred, then moved by ``shift`` pixels. Points that
    land outside the image are dropped."""
    B = x.shape[0]
    x, y = x.reshape(B, -1), y.reshape(B, -1)
    q = torch.tensor([0.01, 0.99], device=x.device)
    (lo_x, hi_x), (lo_y, hi_y) = (torch.quantile(v[:, :_BOX_SAMPLE], q, dim=1) for v in (x, y))
    extent = torch.maximum(hi_x - lo_x, hi_y - lo_y).clamp(min=1e-9)
    scale = (fill * size / extent)[:, None]
    px = ((x - ((lo_x + hi_x) / 2)[:, None]) * scale + size / 2 + shift[:, :1]).floor()
    py = ((y - ((lo_y + hi_y) / 2)[:, None]) * scale + size / 2 + shift[:, 1:]).floor()
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    flat = (torch.arange(B, device=x.device)[:, None] * size + py.clamp(0, size - 1).long()) * size \
        + px.clamp(0, size - 1).long()
    flat = torch.where(inside, flat, B * size * size)  # one extra bin collects the dropped points
    return torch.bincount(flat.reshape(-1), minlength=B * size * size + 1)[:-1].view(B, size, size)


def _fill_rate(params: Tensor, n_maps: Tensor) -> Tensor:
    """Share of a 32x32 box render each system's attractor covers (0 for non-finite systems)."""
    x, y = _chaos_game(params, n_maps, _choice_table("cpu")[:128, :24])
    ok = torch.isfinite(x).all(-1).all(-1) & torch.isfinite(y).all(-1).all(-1)
    x, y = torch.nan_to_num(x), torch.nan_to_num(y)
    zeros = torch.zeros(x.shape[0], 2)
    counts = _box_counts(x, y, 32, torch.full((x.shape[0],), 0.999), zeros)
    return torch.where(ok, (counts > 0).float().mean((1, 2)), torch.zeros(()))


def _draw_candidates(g: torch.Generator) -> tuple[Tensor, Tensor]:
    n = torch.randint(2, MAX_MAPS + 1, (_CANDIDATES,), generator=g)
    p = torch.rand(_CANDIDATES, MAX_MAPS, 6, generator=g) * 2 - 1
    return _cap_contraction(p, _SIGMA_CAP), n


def class_table(num_classes: int = DEFAULT_NUM_CLASSES, class_seed: int = CLASS_SEED) -> tuple[Tensor, Tensor]:
    """Each class's system: ``params [C, MAX_MAPS, 6]`` (rows past ``n_maps`` unused) and ``n_maps [C]``.

    Class ``c`` takes the first of its candidates (drawn from a generator seeded by ``class_seed`` and
    ``c`` alone) whose attractor fills :data:`_FILL_RANGE` of its box: thinner ones look like lines or
    dust, fuller ones like blobs. Rounds repeat for classes without a fitting candidate.
    """
    if not 1 <= num_classes <= 100_000:
        raise FormulaError(f"num_classes must be between 1 and 100000, got {num_classes}")
    return _class_table(int(num_classes), int(class_seed))


@functools.lru_cache(maxsize=8)
def _class_table(num_classes: int, class_seed: int) -> tuple[Tensor, Tensor]:
    gens = [torch.Generator().manual_seed(class_seed * 1_000_003 + c) for c in range(num_classes)]
    params, n_maps = torch.zeros(num_classes, MAX_MAPS, 6), torch.zeros(num_classes, dtype=torch.long)
    todo = list(range(num_classes))
    for _ in range(50):
        drawn = [_draw_candidates(gens[c]) for c in todo]
        cand_p, cand_n = torch.cat([p for p, _ in drawn]), torch.cat([n for _, n in drawn])
        fill = _fill_rate(cand_p, cand_n).view(len(todo), _CANDIDATES)
        ok = (fill >= _FILL_RANGE[0]) & (fill <= _FILL_RANGE[1])
        left = []
        for row, c in enumerate(todo):
            hits = ok[row].nonzero()
            if len(hits) == 0:
                left.append(c)
                continue
            k = row * _CANDIDATES + int(hits[0])
            params[c], n_maps[c] = cand_p[k], cand_n[k]
        todo = left
        if not todo:
            return params, n_maps
    raise FormulaError(f"no fitting system found for {len(todo)} classes after 50 rounds; try another class_seed")


@functools.lru_cache(maxsize=8)
def _device_table(num_classes: int, class_seed: int, device: str) -> tuple[Tensor, Tensor]:
    """:func:`class_table` copied to ``device`` once, not on every batch."""
    params, n_maps = class_table(num_classes, class_seed)
    return params.to(device), n_maps.to(device)


# --- rendering ------------------------------------------------------------------------------------------
_N_DRAWS = 24  # uniforms per instance, by column:
(_U_MAP, _U_PARAM, _U_WEIGHT, _U_FLIPX, _U_FLIPY, _U_FILL, _U_SHX, _U_SHY, _U_THICK, _U_BLUR, _U_GREY,
 _U_INVERT, _U_RAMP, _U_GAIN) = range(14)
_U_FG1, _U_FG2, _U_BG = 14, 17, 20  # three columns each (RGB)


def _perturb(params: Tensor, n_maps: Tensor, u: Tensor) -> Tensor:
    """FractalDB's instance rule: one parameter of one used map scaled by a weight in [0.8, 1.2]."""
    B = params.shape[0]
    i = (u[:, _U_MAP] * n_maps).long().clamp(max=MAX_MAPS - 1)
    j = (u[:, _U_PARAM] * 6).long().clamp(max=5)
    weight = torch.ones(B, MAX_MAPS, 6, device=params.device)
    weight[torch.arange(B, device=params.device), i, j] = 0.8 + 0.4 * u[:, _U_WEIGHT]
    return _cap_contraction(params * weight, 0.98)


def _intensity(counts: Tensor, u: Tensor) -> Tensor:
    """Counts to stroke intensity ``[B, 1, H, W]`` in [0, 1]: tone-mapped by each image's mean
    density, thickened (3x3 max) for half the images, softened (3x3 mean) for a third."""
    c = counts.float()[:, None]
    occupied = (c > 0).float().sum((2, 3), keepdim=True).clamp(min=1)
    mean = c.sum((2, 3), keepdim=True) / occupied
    gain = (0.6 + 1.4 * u[:, _U_GAIN]).view(-1, 1, 1, 1)
    img = (c * gain / mean).clamp(max=1.0).sqrt()
    thick = (u[:, _U_THICK] < 0.5).view(-1, 1, 1, 1)
    img = torch.where(thick, F.max_pool2d(img, 3, 1, 1), img)
    blur = (u[:, _U_BLUR] < 1 / 3).view(-1, 1, 1, 1)
    return torch.where(blur, F.avg_pool2d(img, 3, 1, 1, count_include_pad=False), img)


def _colourise(ink: Tensor, u: Tensor) -> Tensor:
    """Ink ``[B, 1, H, W]`` to RGB: a two-colour gradient (grey for 30%) on a dark background."""
    B, _, H, _ = ink.shape
    grey = (u[:, _U_GREY] < 0.3)[:, None]
    fg1, fg2 = (torch.where(grey, u[:, k:k + 1].expand(B, 3), u[:, k:k + 3]) for k in (_U_FG1, _U_FG2))
    fg1, fg2 = 0.45 + 0.55 * fg1, 0.45 + 0.55 * fg2
    bg = 0.25 * u[:, _U_BG:_U_BG + 3]
    theta = 2 * math.pi * u[:, _U_RAMP]
    lin = torch.linspace(-0.5, 0.5, H, device=ink.device)
    ramp = (torch.cos(theta).view(-1, 1, 1) * lin[None, None, :] + torch.sin(theta).view(-1, 1, 1) * lin[None, :, None])
    ramp = (ramp + 0.5).clamp(0, 1)[:, None]
    fg = fg1[:, :, None, None] + (fg2 - fg1)[:, :, None, None] * ramp
    img = bg[:, :, None, None] + ink * (fg - bg[:, :, None, None])
    invert = (u[:, _U_INVERT] < 0.2).view(-1, 1, 1, 1)
    return torch.where(invert, 1 - img, img)


def _render(params: Tensor, n_maps: Tensor, keys: Tensor, size: int) -> Tensor:
    u = _uniforms(keys, _N_DRAWS)
    x, y = _chaos_game(_perturb(params, n_maps, u), n_maps, _choice_table(str(params.device)))
    x = torch.where((u[:, _U_FLIPX] < 0.5)[:, None, None], -x, x)
    y = torch.where((u[:, _U_FLIPY] < 0.5)[:, None, None], -y, y)
    fill = 0.6 + 0.35 * u[:, _U_FILL]
    shift = (torch.stack([u[:, _U_SHX], u[:, _U_SHY]], 1) - 0.5) * (1 - fill)[:, None] * size
    counts = _box_counts(torch.nan_to_num(x), torch.nan_to_num(y), size, fill, shift)
    return _colourise(_intensity(counts, u), u)


def _check(num_classes: int, labels: Tensor, seeds: Tensor, size: int) -> None:
    if labels.ndim != 1 or labels.shape != seeds.shape:
        raise FormulaError(f"labels and seeds must be 1-D and of equal length, got {tuple(labels.shape)} "
                           f"and {tuple(seeds.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise FormulaError(f"labels must lie in [0, {num_classes}); pass num_classes above the largest label")
    if not 8 <= size <= 1024:
        raise FormulaError(f"image size must be between 8 and 1024 pixels, got {size}")


def generate_batch(num_classes: int, labels: Tensor, seeds: Tensor, size: int = DEFAULT_SIZE,
                   device: torch.device | str | None = None, class_seed: int = CLASS_SEED) -> Tensor:
    """Images ``[B, 3, size, size]`` in [0, 1] (float32) of classes ``labels`` and instances ``seeds``.

    Image ``k`` depends only on ``(labels[k], seeds[k], size, class_seed)``. ``device`` defaults to
    the labels' device; the chaos game is a batched torch op there (CPU or CUDA).
    """
    device = torch.device(device) if device is not None else labels.device
    labels, seeds = labels.to(device, torch.long), seeds.to(device, torch.long)
    _check(num_classes, labels, seeds, size)
    table_p, table_n = _device_table(num_classes, class_seed, str(device))
    keys = _mix(seeds) + labels * 0x2545F491  # distinct keys for one seed in different classes
    out = [_render(table_p[labels[i:i + _CHUNK]], table_n[labels[i:i + _CHUNK]], keys[i:i + _CHUNK], size)
           for i in range(0, labels.shape[0], _CHUNK)]
    return torch.cat(out) if out else torch.empty(0, 3, size, size, device=device)


def sample_batch(num_classes: int, batch_size: int, generator: torch.Generator, size: int = DEFAULT_SIZE,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """A training batch: uniform labels and fresh instance seeds (below :data:`EVAL_SEED_BASE`) drawn
    from ``generator``; returns ``(images, labels)`` on ``device`` (default: the generator's)."""
    device = torch.device(device) if device is not None else generator.device
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator, device=generator.device)
    seeds = torch.randint(0, EVAL_SEED_BASE, (batch_size,), generator=generator, device=generator.device)
    return generate_batch(num_classes, labels, seeds, size, device), labels.to(device)


def held_out_labels_seeds(num_classes: int, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The held-out set's labels (balanced: ``i mod num_classes``) and seeds (>= EVAL_SEED_BASE)."""
    if count < 0 or seed < 0:
        raise FormulaError(f"count and seed must be non-negative, got {count} and {seed}")
    i = torch.arange(count)
    return i % num_classes, EVAL_SEED_BASE + seed * (1 << 32) + i


def held_out_batch(num_classes: int, count: int, seed: int = 0, size: int = DEFAULT_SIZE,
                   device: torch.device | str | None = "cpu") -> tuple[Tensor, Tensor]:
    """``count`` held-out images and labels, identical on every run and device."""
    labels, seeds = held_out_labels_seeds(num_classes, count, seed)
    return generate_batch(num_classes, labels, seeds, size, device), labels.to(device)


class FormulaDataset(torch.utils.data.Dataset):
    """``count`` held-out formula images (never seen in training), each drawn when indexed.

    ``__getitem__`` returns ``(transform(PIL RGB image), label)`` with a transform, else
    ``(float tensor [3, size, size] in [0, 1], label)``.
    """

    def __init__(self, num_classes: int = DEFAULT_NUM_CLASSES, count: int = 10_000, seed: int = 0,
                 size: int = DEFAULT_SIZE, transform=None):
        self.num_classes, self.size, self.transform = num_classes, size, transform
        self.labels, self.seeds = held_out_labels_seeds(num_classes, count, seed)
        self.targets = self.labels.tolist()
        self.classes = [f"ifs_{c:05d}" for c in range(num_classes)]
        class_table(num_classes)  # build (and validate) the class table up front

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        image = generate_batch(self.num_classes, self.labels[i:i + 1], self.seeds[i:i + 1], self.size)[0]
        label = int(self.labels[i])
        if self.transform is None:
            return image, label
        from PIL import Image

        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(pixels, "RGB")), label
