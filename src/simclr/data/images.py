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

An image is turned upright as its EXIF orientation says (a phone stores a portrait photo sideways, with
orientation 6): PIL's decoder ignores the tag. :func:`jpeg_orientation` reads it from a JPEG's header bytes for
the fast loader, which turns its device-decoded JPEGs the same way.
"""
from __future__ import annotations

import struct

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2..8 mirrored and/or turned
# what open_rgb makes of a file: part of the decoded-array cache's key, so pixels decoded by an earlier rule (2:
# EXIF orientation applied) are never served from the cache
DECODER = 2


def open_rgb(source) -> Image.Image:
    """An image file (a path or a binary file object) as an upright 8-bit RGB image. PIL's errors pass through
    (callers turn them into a DataError naming the file)."""
    with Image.open(source) as im:
        return to_rgb(upright(im))


def upright(im: Image.Image) -> Image.Image:
    """``im`` as its EXIF orientation says it is seen (``im`` itself when it has none, or 1)."""
    try:
        turned = im.getexif().get(ORIENTATION, 1) in range(2, 9)
    except (ValueError, TypeError, OSError, SyntaxError, struct.error):  # unreadable EXIF: as stored
        return im
    return ImageOps.exif_transpose(im) if turned else im


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) in the header of the JPEG bytes ``data``; 1 when there is none."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # the image data: no header follows
            break
        size = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
            return _tiff_orientation(data[i + 10:i + 2 + size])
        i += 2 + size
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = struct.unpack(order + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    for k in range(struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        if len(entry) < 12:
            break
        if struct.unpack(order + "H", entry[:2])[0] == ORIENTATION:
            value = struct.unpack(order + "H", entry[8:10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


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
