"""Typeset capital letters A-Z in many fonts: an offline, OCR-like fine-tuning task (32x32 RGB).

Each image is one capital letter (26 classes, ``A``..``Z``) typeset with Pillow from the TrueType
fonts that ship inside matplotlib (``matplotlib.get_data_path()/fonts/ttf``): DejaVu Sans, Serif and
Sans Mono in four styles each, five Computer Modern faces and STIX General in four styles. Symbol
fonts (cmex10, cmmi10, cmsy10, STIXNonUni*, STIXSiz*, LastResort) and DejaVu*Display are not used.

The split tests generalisation to unseen typefaces, like real OCR: the validation set is drawn only
from fonts never seen in training -- the whole STIX General family (a Times-like serif, four styles)
and Computer Modern Sans (``cmss10``), 5 of the 21 files (:data:`VAL_FONTS`); training uses the other
16 (:data:`TRAIN_FONTS`). A font file that is missing or does not render 26 distinct, non-empty capitals
is skipped; fewer than 8 training or 3 validation fonts left is an error (:class:`FontError`).

Every glyph is rendered once per font into a 64x64 mask with the font size chosen so that ``H`` is
40 px tall (letters keep their font's proportions). Each image then draws, from a seeded torch
generator: the font, letter height 45-90% of the image, rotation within +-15 degrees, shear, a
horizontal stretch, stroke weight (a gamma on the coverage) and position jitter keeping the letter in
frame; a background colour with a gradient and low-frequency texture (a quarter are dark grey), a
stroke colour with a clear luminance contrast (light-on-dark whenever the background is dark); in
half of the images a thin distractor stroke, in a fifth a small occluding patch of background; then
slight blur and pixel noise. Sizes and seeds are fixed (:data:`SPLITS`: 6000 training and 1500
validation images), so the data are identical wherever the fonts, Pillow's FreeType and torch are the
same; both splits take a few seconds to generate, once per run, and nothing is cached on disk.

API: :data:`LETTERS`, :data:`TRAIN_FONTS`, :data:`VAL_FONTS`, :func:`font_dir`, :func:`load_glyphs`,
:func:`generate`, :class:`LettersDataset`, :class:`FontError` (``build_data`` reports it as a ``DataError``).
"""
from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alast.data import drawing as D
from alast.data.drawing import SIZE

LETTERS = tuple(string.ascii_uppercase)
TRAIN_FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "cmr10", "cmb10", "cmti10", "cmtt10",
)
VAL_FONTS = ("STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta", "cmss10")
SPLITS = {"train": (TRAIN_FONTS, 6000, 31_337), "val": (VAL_FONTS, 1500, 31_338)}  # fonts, size, seed
MIN_FONTS = {"train": 8, "val": 3}  # fewer usable fonts than this and the split is refused
GLYPH = 64  # side of a glyph mask, px
CAP = 40  # height of the letter H in a glyph mask, px
_CHUNK = 1024  # images generated together (part of the determinism)
_MIN_INK = 30  # a usable glyph covers at least this many mask pixels


class FontError(ValueError):
    """Too few usable fonts for a split; the message names the directory and the fonts."""


def font_dir() -> Path:
    """The directory of matplotlib's bundled TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render_font(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Masks [26, GLYPH, GLYPH] in [0, 1] centred on each letter's ink, and its half extents [26, 2]
    (x, y in mask px); None when the file is missing, unreadable, or does not render 26 distinct,
    non-empty capitals (a symbol font or tofu boxes)."""
    from PIL import Image, ImageDraw, ImageFont

    def draw(font, letter: str, side: int) -> np.ndarray:
        im = Image.new("L", (side, side))
        ImageDraw.Draw(im).text((side / 2, side / 2), letter, font=font, fill=255, anchor="mm")
        return np.asarray(im)

    if not path.is_file():  # Pillow would look the bare file name up in the system's font folders
        return None
    try:
        probe = draw(ImageFont.truetype(str(path), 48), "H", 128)
        rows = np.flatnonzero(probe.max(1) > 127)
        if rows.size < 4:
            return None
        font = ImageFont.truetype(str(path), max(8, round(48 * CAP / (rows[-1] - rows[0] + 1))))
    except OSError:
        return None
    masks, extents = np.zeros((26, GLYPH, GLYPH), np.float32), np.zeros((26, 2), np.float32)
    for i, letter in enumerate(LETTERS):
        a = draw(font, letter, 2 * GLYPH)
        if np.count_nonzero(a > 127) < _MIN_INK:
            return None
        ys, xs = np.nonzero(a)  # the box includes the anti-aliased edge
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        h, w = min(y1 - y0, GLYPH), min(x1 - x0, GLYPH)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        top, left = (GLYPH - h) // 2, (GLYPH - w) // 2
        masks[i, top:top + h, left:left + w] = a[cy - h // 2:cy - h // 2 + h, cx - w // 2:cx - w // 2 + w] / 255.0
        extents[i] = (w / 2, h / 2)
    if len({m.tobytes() for m in masks}) < 26:
        return None
    return masks, extents


def load_glyphs(fonts: Sequence[str], split: str = "train", directory: Path | None = None
                ) -> tuple[list[str], Tensor, Tensor]:
    """(usable font names, masks [F, 26, GLYPH, GLYPH], half extents [F, 26, 2]) of ``fonts``.

    Fonts that are missing or fail the glyph check are left out; fewer than ``MIN_FONTS[split]``
    usable ones raise :class:`FontError`.
    """
    directory = font_dir() if directory is None else Path(directory)
    names, masks, extents = [], [], []
    for name in fonts:
        got = _render_font(directory / f"{name}.ttf")
        if got is not None:
            names.append(name)
            masks.append(got[0])
            extents.append(got[1])
    need = MIN_FONTS.get(split, 1)
    if len(names) < need:
        raise FontError(f"letters: only {len(names)} of the {len(fonts)} {split} fonts under {directory} render "
                        f"A-Z (need {need}: {', '.join(fonts)}); reinstall matplotlib, whose bundled fonts these are")
    return names, torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(extents))


def _place(rng: D.Rng, masks: Tensor, half: Tensor) -> Tensor:
    """Coverage [m, SIZE, SIZE] of glyph ``masks`` [m, GLYPH, GLYPH] (ink half extents ``half`` [m, 2])
    under a random height, rotation, shear, stretch and position; rendered at 2x and averaged down."""
    m = masks.shape[0]
    height = rng.u(m, lo=0.45, hi=0.9) * SIZE
    th = rng.u(m, lo=-15 * D.DEG, hi=15 * D.DEG)
    shear, stretch = rng.u(m, lo=-0.3, hi=0.3), rng.u(m, lo=0.8, hi=1.2)
    c, s = torch.cos(th), torch.sin(th)
    rot = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    shape = torch.zeros(m, 2, 2)
    shape[:, 0, 0], shape[:, 0, 1], shape[:, 1, 1] = stretch, shear, 1.0
    lin = rot @ shape * (height / CAP)[:, None, None]  # glyph mask px -> image px, about the glyph centre
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0]])[None] * half[:, None, :]  # two box corners [m, 2, 2]
    ext = (corners @ lin.transpose(1, 2)).abs().amax(1)  # half extents in the image, [m, 2]
    fit = (SIZE / 2 - 0.5) / ext.amax(1).clamp(min=1e-3)
    shrink = fit.clamp(max=1.0)  # wide letters are made smaller rather than cut off
    lin, ext = lin * shrink[:, None, None], ext * shrink[:, None]
    centre = SIZE / 2 + rng.u(m, 2, lo=-1.0, hi=1.0) * (SIZE / 2 - 0.5 - ext).clamp(min=0)
    inv = torch.linalg.inv(lin)
    # affine_grid maps output coordinates in [-1, 1] to input ones: image px p = SIZE/2 * (x + 1)
    theta = torch.cat([inv * (SIZE / GLYPH), (inv @ (SIZE / 2 - centre)[:, :, None]) / (GLYPH / 2)], 2)
    grid = F.affine_grid(theta, [m, 1, 2 * SIZE, 2 * SIZE], align_corners=False)
    cover = F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cover = F.avg_pool2d(cover, 2)[:, 0].clamp(0, 1)
    return cover ** D.per_image(rng.u(m, lo=0.7, hi=1.4))  # stroke weight: < 1 thickens, > 1 thins


def _texture(rng: D.Rng, m: int) -> Tensor:
    """Low-frequency texture [m, 3, SIZE, SIZE]: smooth 4x4 noise, mostly shared by the channels."""
    coarse = rng.n(m, 1, 4, 4) + 0.4 * rng.n(m, 3, 4, 4)
    smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return smooth * rng.u(m, hi=0.12)[:, None, None, None]


def _images(rng: D.Rng, glyphs: Tensor, half: Tensor, labels: Tensor, font_of: Tensor) -> Tensor:
    """Float images [m, 3, SIZE, SIZE] in [0, 1] of ``labels`` in fonts ``font_of``."""
    m = labels.shape[0]
    x, y = D.grid("cpu")
    img, bg, gray = D.background(rng, m, x, y, gray_frac=0.25)
    img = (img + _texture(rng, m)).clamp(0, 1)
    img = D.over(img, _place(rng, glyphs[font_of, labels], half[font_of, labels]), D.fg_colours(rng, bg, gray))
    # a thin distractor stroke in half of the images
    u, v = D.local(x, y, rng.u(m, lo=2.0, hi=SIZE - 2.0), rng.u(m, lo=2.0, hi=SIZE - 2.0), rng.u(m, hi=math.pi))
    half_len = D.per_image(rng.u(m, lo=2.0, hi=7.0))
    d = D.sd_segment(u, v, -half_len, half_len) - D.per_image(rng.u(m, lo=0.3, hi=0.8))
    img = D.over(img, D.alpha(d) * D.per_image((rng.u(m) < 0.5).float()), D.fg_colours(rng, bg, gray))
    # a small patch of background colour hiding part of the letter in a fifth of them
    u, v = D.local(x, y, rng.u(m, lo=8.0, hi=SIZE - 8.0), rng.u(m, lo=8.0, hi=SIZE - 8.0), rng.u(m, hi=math.pi))
    patch = D.alpha(D.sd_box(u, v, D.per_image(rng.u(m, lo=2.0, hi=4.0))))
    img = D.over(img, patch * D.per_image((rng.u(m) < 0.2).float()), bg)
    return D.finish(rng, img, blur_prob=0.5, noise_hi=0.12)


def generate(glyphs: Tensor, half: Tensor, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``size`` images uint8 [size, SIZE, SIZE, 3], labels int64 [size] and font indices int64 [size].

    ``glyphs`` and ``half`` come from :func:`load_glyphs`. Labels are balanced within each chunk of
    ``_CHUNK`` images and shuffled; fonts are drawn uniformly. A function of the arguments only.
    """
    g = torch.Generator().manual_seed(int(seed))
    rng = D.Rng(g, torch.device("cpu"))
    images, labels, fonts = [], [], []
    for start in range(0, size, _CHUNK):
        m = min(_CHUNK, size - start)
        offset = int(torch.randint(26, (1,), generator=g))
        lab = ((torch.arange(m) + offset) % 26)[torch.randperm(m, generator=g)]
        font_of = torch.randint(glyphs.shape[0], (m,), generator=g)
        img = _images(rng, glyphs, half, lab, font_of)
        images.append((img * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
        labels.append(lab)
        fonts.append(font_of)
    if not images:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(images).numpy(), torch.cat(labels).numpy(), torch.cat(fonts).numpy()


class LettersDataset(torch.utils.data.Dataset):
    """One split of the letters task, generated once at construction and kept as uint8 32x32 RGB.

    ``split`` is ``train`` or ``val`` (:data:`SPLITS` gives its fonts, size and seed; ``size`` and
    ``seed`` override the last two). ``images`` is uint8 [N, 32, 32, 3]; ``fonts`` are the font files
    used (stems) and ``font_of[i]`` indexes the font of image ``i``. Like ``ArrayImageDataset``,
    ``transform`` runs per sample on a PIL RGB image, and the dataset is picklable.
    """

    def __init__(self, split: str, transform: Callable, size: int | None = None, seed: int | None = None,
                 directory: Path | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown letters split {split!r}; use {' or '.join(SPLITS)}")
        fonts, default_size, default_seed = SPLITS[split]
        names, glyphs, half = load_glyphs(fonts, split, directory)
        images, labels, font_of = generate(glyphs, half, default_size if size is None else size,
                                           default_seed if seed is None else seed)
        self.images, self.targets, self.transform = images, labels.tolist(), transform
        self.split, self.fonts, self.font_of, self.classes = split, names, font_of, list(LETTERS)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.targets[i]
