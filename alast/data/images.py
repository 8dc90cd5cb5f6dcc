"""Image files as 8-bit RGB, whatever their depth, and a cheap test that a JPEG was written to its end.

torchvision's ``pil_loader`` is ``Image.open(f).convert("RGB")``. Pillow's conversion clips 16- and
32-bit grey at 255 (a 16-bit photo comes out almost white) and warns when a palette image stores its
transparency per palette entry; :func:`to_rgb` scales wide pixels down and takes palettes via RGBA.
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO

import numpy as np

JPEG_EOI = b"\xff\xd9"  # end-of-image marker, the last two bytes of a complete JPEG


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
