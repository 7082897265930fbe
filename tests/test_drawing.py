"""Box drawing on RGB previews: edges land where the polygons are, labels, colours, scale."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from geochat.drawing import colour, draw_boxes
from geochat.grounding import Box, box_to_pixel_polygon


def edge_midpoints(poly):
    n = len(poly)
    return [
        ((poly[i][0] + poly[(i + 1) % n][0]) / 2, (poly[i][1] + poly[(i + 1) % n][1]) / 2) for i in range(n)
    ]


def changed_near(out, x, y, r=1):
    """Whether any pixel within r of (x, y) was drawn on (anti-aliasing-free lines may miss by one)."""
    yi, xi = round(y), round(x)
    return out[max(yi - r, 0) : yi + r + 1, max(xi - r, 0) : xi + r + 1].any()


def test_pixels_change_along_polygon_edges_only():
    rgb = np.zeros((300, 600, 3), np.uint8)
    poly = box_to_pixel_polygon(Box(20, 35, 60, 65, theta=30), 600, 300)
    out = np.asarray(draw_boxes(rgb, [poly], [None]))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    for x, y in edge_midpoints(poly) + poly:
        assert changed_near(out, x, y), (x, y)
    cx = sum(p[0] for p in poly) / 4
    cy = sum(p[1] for p in poly) / 4
    assert not out[round(cy), round(cx)].any()  # the inside is not filled
    assert not rgb.any()  # the input is untouched


def test_scale_maps_original_pixels_onto_preview():
    preview = np.zeros((100, 200, 3), np.uint8)  # a 4x downsampled view of an 800x400 raster
    poly = [(100.0, 100.0), (700.0, 100.0), (700.0, 300.0), (100.0, 300.0)]
    out = np.asarray(draw_boxes(preview, [poly], [None], scale=4.0))
    for x, y in edge_midpoints([(p[0] / 4, p[1] / 4) for p in poly]):
        assert changed_near(out, x, y)
    assert not out[50, 100].any()


def test_distinct_colours_and_label_background():
    rgb = np.zeros((200, 400, 3), np.uint8)
    polys = [
        [(20, 60), (120, 60), (120, 150), (20, 150)],
        [(220, 60), (380, 60), (380, 150), (220, 150)],
    ]
    img = draw_boxes(rgb, polys, ["plane", "storage tank"])
    assert isinstance(img, Image.Image) and img.size == (400, 200)
    out = np.asarray(img)
    assert tuple(out[105, 20]) == colour(0) and tuple(out[105, 380]) == colour(1)
    assert colour(0) != colour(1)
    # the label tag sits above each box's top edge and holds its colour and some text pixels
    tag0 = out[35:59, 20:60].reshape(-1, 3)
    assert (tag0 == colour(0)).all(axis=1).sum() > 50
    assert (~(tag0 == colour(0)).all(axis=1)).sum() > 5  # glyphs differ from the background


def test_many_colours_are_distinct():
    cols = [colour(i) for i in range(40)]
    assert len(set(cols)) == 40


def test_line_width_grows_with_image_size():
    def drawn_pixels(n):
        rgb = np.zeros((n, n, 3), np.uint8)
        poly = [(n * 0.25, n * 0.25), (n * 0.75, n * 0.25), (n * 0.75, n * 0.75), (n * 0.25, n * 0.75)]
        return np.asarray(draw_boxes(rgb, [poly], [None])).any(axis=2).sum() / n

    assert drawn_pixels(2000) > 2 * drawn_pixels(200)


def test_polygon_partly_outside_and_validation():
    rgb = np.zeros((50, 80, 3), np.uint8)
    out = draw_boxes(rgb, [[(-20, -20), (40, -20), (40, 30), (-20, 30)]], ["off the edge"])
    assert np.asarray(out).any()
    with pytest.raises(ValueError):
        draw_boxes(rgb.astype(np.float32), [], [])
    with pytest.raises(ValueError):
        draw_boxes(rgb, [[(0, 0), (1, 1)]], [])
