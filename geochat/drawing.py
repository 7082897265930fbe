"""Draw (rotated) boxes with labels on an RGB preview of a raster.

Polygons arrive in pixel coordinates of the ORIGINAL raster (from
`geochat.grounding.box_to_pixel_polygon`); the preview may be a downsampled view of a large scene,
so every point is divided by ``scale`` (original pixels per preview pixel) to land on it. Only
PIL's built-in font is used, so nothing depends on font files being installed.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated, mutually distinct colours first; beyond them, hues spaced by the golden ratio.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 59, 48),
    (0, 122, 255),
    (255, 204, 0),
    (52, 199, 89),
    (175, 82, 222),
    (255, 149, 0),
    (90, 200, 250),
    (255, 45, 85),
    (162, 132, 94),
    (0, 199, 190),
)


def colour(i: int) -> tuple[int, int, int]:
    """A distinct colour for the i-th box."""
    if i < len(PALETTE):
        return PALETTE[i]
    hue = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def draw_boxes(
    rgb: np.ndarray,
    polygons: Sequence[Sequence[tuple[float, float]]],
    labels: Sequence[str | None],
    scale: float = 1.0,
) -> Image.Image:
    """Outline each polygon in its own colour and put its label (if any) on a filled tag.

    ``rgb``: (h, w, 3) uint8 preview. ``polygons``: one list of (x, y) corners per box, in original
    raster pixels. ``labels``: one per polygon (None for no tag). Line width and text size grow with
    the preview's size. Returns a new image; ``rgb`` is not modified.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 array, got shape {rgb.shape} dtype {rgb.dtype}")
    if len(polygons) != len(labels):
        raise ValueError(f"{len(polygons)} polygons but {len(labels)} labels")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    image = Image.fromarray(np.ascontiguousarray(rgb)).copy()  # fromarray may share rgb's memory
    draw = ImageDraw.Draw(image)
    h, w = rgb.shape[:2]
    width = max(2, round(min(h, w) / 200))
    font = _font(max(10, round(min(h, w) / 40)))
    pad = max(1, width)
    for i, (poly, label) in enumerate(zip(polygons, labels, strict=True)):
        pts = [(float(x) / scale, float(y) / scale) for x, y in poly]
        if len(pts) < 2:
            continue
        col = colour(i)
        draw.line([*pts, pts[0]], fill=col, width=width, joint="curve")
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        ax, ay = min(pts, key=lambda p: (p[1], p[0]))  # the top-most corner anchors the tag
        x = min(max(ax, 0.0), max(w - tw, 0))
        y = ay - th - width if ay - th - width >= 0 else ay + width
        y = min(max(y, 0.0), max(h - th, 0))
        draw.rectangle([x, y, x + tw, y + th], fill=col)
        luminance = 0.299 * col[0] + 0.587 * col[1] + 0.114 * col[2]
        text_col = (0, 0, 0) if luminance > 150 else (255, 255, 255)
        draw.text((x + pad - left, y + pad - top), label, fill=text_col, font=font)
    return image
