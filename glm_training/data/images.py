"""Opening image files the one way every reader, dataset and check uses.

`open_image(path)` returns an 8-bit RGB PIL image:
- EXIF orientation applied (phones store rotated pixels plus an orientation tag);
- 16-bit gray (PIL modes I;16* and I) scaled to 8 bit (value / 257), not clipped at 255 (which
  turns almost every pixel white);
- transparency (RGBA, LA, palette with a transparent colour) composited on white;
- CMYK, palette, gray and the other modes converted by PIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_ORIENTATION = 0x0112


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (rules in the module docstring)."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """The file at `path` as an upright 8-bit RGB image (see the module docstring)."""
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)  # a new, loaded image (a copy when upright already)
        upright.load()
    return to_rgb(upright)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as `open_image` returns it, from the header only (no decoding)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_ORIENTATION) in _TRANSPOSED:
            return height, width
    return width, height


def check_image(path: Path) -> str | None:
    """None when `path` opens as `open_image` opens it, else the problem, naming the file."""
    if not path.is_file():
        return f"{path}: file not found"
    try:
        with Image.open(path) as image:
            image.verify()
        open_image(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"{path}: not a readable image ({error})"
    return None
