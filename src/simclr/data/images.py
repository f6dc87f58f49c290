"""The one image decoder of the package: any image file -> an 8-bit RGB PIL image.

Every reader of image files (datasets, the decoded-array cache, ``simclr embed``, the fast loader's
non-JPEG files, and through the datasets the evaluations and the report's pictures) calls
:func:`open_rgb`. The fast loader alone decodes standard JPEGs itself, on the device
(``torchvision.io.decode_jpeg``); its output equals this one's on the CPU (tested).

PIL's ``convert("RGB")`` is right for 8-bit modes (``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``,
``1``) but clips the wide ones: a 16-bit grey PNG (mode ``I;16`` or ``I``) came out all white, a float
image (``F``) all white or all black. Those are scaled here by hand (PIL has no scaling conversion):

* 16-bit (``I;16*``, and ``I``, which PIL gives 16-bit PGM files): the high byte, ``v >> 8``, the
  reduction PIL itself applies to 16-bit RGB PNGs, so a grey and an RGB 16-bit file agree;
* float (``F``): values within [0, 1] are scaled by 255, others taken as 0..255; NaN is 0, clipped.

Alpha is dropped (each pixel keeps its stored colour, as torchvision's folder loader does); a palette
image with transparency goes through RGBA, which gives the same colours without PIL's warning.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def open_rgb(source) -> Image.Image:
    """An image file (a path or a binary file object) as an 8-bit RGB image. PIL's errors pass through
    (callers turn them into a DataError naming the file)."""
    with Image.open(source) as im:
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, wide modes scaled rather than clipped (see the module docstring)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        grey = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            a = a * 255.0
        grey = np.rint(np.clip(np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha: undo it first
        im = im.convert(mode.upper())
    elif mode == "PA" or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")
