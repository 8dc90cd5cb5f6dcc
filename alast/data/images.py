"""Image files as 8-bit RGB, whatever their depth, upright as their camera recorded, and a pre-run
check that a file is whole (cheap, or a full decode with ``--skip-bad-images``).

torchvision's ``pil_loader`` is ``Image.open(f).convert("RGB")``. Pillow's conversion clips 16- and
32-bit grey at 255 (a 16-bit photo comes out almost white) and warns when a palette image stores its
transparency per palette entry; :func:`to_rgb` scales wide pixels down and takes palettes via RGBA.
Phones store a photo as the sensor read it and its rotation in an EXIF tag: :func:`read_rgb` applies it.

PIL warns (``DecompressionBombWarning``, with its own source line) when it opens an image of more than
``Image.MAX_IMAGE_PIXELS`` pixels (about 89 million) and refuses one of twice that. alast reports both
itself (:func:`check_file` returns the pixel count; :func:`failure` names the limit), so the files read
here do not raise PIL's warning (:func:`quiet_bomb_warning`).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, BinaryIO

import numpy as np

JPEG_EOI = b"\xff\xd9"  # end-of-image marker, the last two bytes of a complete JPEG
# the image files alast reads; .jfif and .jpe are JPEG's other names (Windows saves web images as .jfif)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                  ".gif")
EXIF_ORIENTATION = 0x0112


def read_rgb(path: str) -> Any:
    """The image file at ``path`` decoded, turned upright by its EXIF orientation and made RGB
    (:func:`to_rgb`); PIL's own exception where it cannot."""
    from PIL import Image, ImageOps

    quiet_bomb_warning()
    with Image.open(path) as im:
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return to_rgb(im)


def check_file(path: str, decode: bool = False) -> int:
    """Raise PIL's exception where the file at ``path`` is not a whole image :func:`read_rgb` reads;
    else return its pixel count (PIL warns past ``Image.MAX_IMAGE_PIXELS``: the caller may say so).

    ``decode``: every file is decoded as :func:`read_rgb` decodes it (upright, RGB), the one check
    that finds damage inside the compressed data (a PNG whose chunk CRCs hold but whose data does
    not inflate, a JPEG damaged in its middle): PIL's "broken data stream". A JPEG is decoded at 1/8
    scale (PIL's ``draft``: every coefficient is still read, so damage is found alike), about half
    the time of a full decode. Otherwise the cheap check: PNG: every chunk's CRC; JPEG: its header,
    its end marker (:func:`jpeg_has_end`) and its EXIF (:func:`read_rgb` reads the orientation
    there); WebP: decoded when opened; BMP, TIFF, GIF, PPM and a JPEG without its end marker (cut
    short, or trailing bytes), whose headers do not show a short file: decoded, and their EXIF read.
    Pixels are not decoded where the header shows a whole file.
    """
    from PIL import Image, ImageOps

    quiet_bomb_warning()
    with Image.open(path) as im:
        pixels = im.size[0] * im.size[1]
        if decode:
            if im.format in ("JPEG", "MPO"):
                im.draft(im.mode, (1, 1))  # the largest reduction PIL's JPEG decoder has: 1/8
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            to_rgb(im)
            return pixels
        if "exif" in im.info:  # read at open; PNG's getexif would decode the pixels without it
            im.getexif()
        if im.format == "PNG" or im.format == "WEBP" or im.format in ("JPEG", "MPO") and jpeg_has_end(im.fp):
            im.verify()
        else:
            im.load()
            im.getexif()
    return pixels


def quiet_bomb_warning() -> None:
    """Ignore PIL's ``DecompressionBombWarning`` in this process (once: the filter is added where
    it is not there yet, e.g. after a test restored the filters). alast says itself which images
    are that large (:func:`check_file`), in one note instead of PIL's warning and source line."""
    from PIL import Image

    category = Image.DecompressionBombWarning
    if not any(f[0] == "ignore" and f[2] is category for f in warnings.filters):
        warnings.filterwarnings("ignore", category=category)


def failure(exc: BaseException) -> str:
    """Why :func:`read_rgb` or :func:`check_file` failed with ``exc``, in a few words: PIL's reason,
    or for its decompression-bomb guard, which refuses valid but very large images, the pixel count."""
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        found = re.findall(r"\d+", str(exc))  # "Image size (N pixels) exceeds limit of M pixels, ..."
        count = f" ({int(found[0]):,} pixels; the limit is {int(found[1]):,})" if len(found) >= 2 else ""
        return f"too many pixels for PIL's safety limit{count}"
    return first_line(exc)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its class name where it has none."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def to_rgb(img: Any) -> Any:
    """``img`` (a PIL image) as RGB with 8 bits a channel, its brightness kept.

    16-bit grey (``I;16``, ``I;16B``, ``I;16L``: PNG, TIFF) keeps its top 8 bits (value >> 8), so
    mid-grey stays mid-grey. 32-bit ``I`` and float ``F`` follow :func:`_wide_to_uint8`.
    """
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):  # numpy reads either byte order as the value it stores
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        return Image.fromarray(_wide_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # P -> RGB warns when the alpha is per palette entry; P -> RGBA does not
    return img.convert("RGB")


def _wide_to_uint8(a: np.ndarray) -> np.ndarray:
    """32-bit integer (``I``) or float (``F``) grey as uint8, by the depth its values show.

    ``I`` holds 16-bit data in practice (older Pillow opened 16-bit PNGs as ``I``, and so does
    Pillow for signed or big-endian 16-bit TIFFs), so values within 0..65535 are scaled as 16-bit.
    ``F`` within [0, 1] is the float image convention and is scaled by 255; its NaN and infinite
    pixels count as 0. Values no fixed depth explains (negative, past 65535 or past 1.0) are
    stretched from the image's own min..max to 0..255, the one scale that keeps their detail; such
    images lose their absolute brightness, which no depth would give them anyway.
    """
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = a.min(), a.max()
    if a.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        return (a >> 8).astype(np.uint8)
    if a.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return np.round(a * 255).astype(np.uint8)
    scale = 255.0 / (float(hi) - float(lo)) if hi > lo else 0.0
    return np.round((a.astype(np.float64) - float(lo)) * scale).astype(np.uint8)


def jpeg_has_end(fp: BinaryIO, tail_bytes: int = 64) -> bool:
    """Whether the JPEG file ``fp`` ends with its end-of-image marker (trailing zero bytes allowed).

    ``Image.verify`` parses a JPEG's header only, so a file cut short passes it and fails when its
    pixels are decoded ("image file is truncated"). Decoding takes about 2 ms a 500x375 JPEG on one
    core (some 45 minutes for ImageNet's 1.28M); reading its last bytes adds nothing measurable to
    the 0.1 ms of opening it. The marker cannot occur inside the compressed data (an FF byte there
    is followed by 00 or a restart marker), so a file ending with it was written to its end. One
    that does not is cut short or carries bytes after the image (some cameras append them): only
    decoding it tells which. ``fp`` (the open image's own file: no second open) is left where it was.
    """
    pos = fp.tell()
    try:
        fp.seek(max(0, fp.seek(0, os.SEEK_END) - tail_bytes))
        return fp.read().rstrip(b"\0").endswith(JPEG_EOI)
    finally:
        fp.seek(pos)
