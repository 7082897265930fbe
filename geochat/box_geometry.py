"""Geometry of (rotated) boxes: overlap, clipping, hulls, and the merging of duplicate boxes.

Boxes are `geochat.grounding.Box` (grid or pixel units, θ counter-clockwise on screen); polygons are lists
of (x, y) points. Overlap is exact for convex polygons: Sutherland–Hodgman clipping and the shoelace area
(`rotated_iou`, `iou_within`). `BoxGrid` hashes box extents into cells so that merging and the seam join of a
tiled run compare neighbours only (31,360 boxes in about a second; `benchmarks/box_merge.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from geochat.grounding import Box, Point


def _signed_area(poly: Sequence[Point]) -> float:
    """Shoelace formula; positive when the vertices run clockwise on screen (y down)."""
    n = len(poly)
    return 0.5 * sum(poly[i][0] * poly[(i + 1) % n][1] - poly[(i + 1) % n][0] * poly[i][1] for i in range(n))


def _clip_convex(subject: list[Point], clip: list[Point]) -> list[Point]:
    """Sutherland–Hodgman: the part of convex polygon ``subject`` inside convex polygon ``clip``."""
    orientation = 1.0 if _signed_area(clip) >= 0 else -1.0

    def side(a: Point, b: Point, p: Point) -> float:
        return orientation * ((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]))

    out = subject
    for i in range(len(clip)):
        a, b = clip[i], clip[(i + 1) % len(clip)]
        inp, out = out, []
        for j in range(len(inp)):
            p, q = inp[j], inp[(j + 1) % len(inp)]
            sp, sq = side(a, b, p), side(a, b, q)
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
        if not out:
            return []
    return out


def clip_to_frame(polygon: Sequence[Point], width: int, height: int, keep: float = 0.1) -> list[Point]:
    """The part of a convex pixel polygon inside the image (0..width × 0..height); [] when less than `keep`
    of its area is inside (a box the model put in the padding of its square input, or all but a sliver)."""
    points = [(float(x), float(y)) for x, y in polygon]
    inside = _clip_convex(points, _rectangle(0.0, 0.0, float(width), float(height)))
    area = _area(inside)
    return inside if area > 0 and area >= keep * _area(points) else []


def rotated_iou(a: Box, b: Box) -> float:
    """Intersection over union of two rotated rectangles (0 when either is degenerate)."""
    return _polygon_iou(a.corners(), b.corners())


def iou_within(a: Box, b: Box, region: tuple[float, float, float, float]) -> float:
    """IoU of the parts of two rotated rectangles inside `region` (x1, y1, x2, y2); 0 when either has none."""
    frame = _rectangle(*region)
    return _polygon_iou(_clip_convex(a.corners(), frame), _clip_convex(b.corners(), frame))


def _polygon_iou(pa: list[Point], pb: list[Point]) -> float:
    """Intersection over union of two convex polygons (0 when either has no area)."""
    area_a, area_b = _area(pa), _area(pb)
    if area_a == 0.0 or area_b == 0.0:
        return 0.0
    inter = _area(_clip_convex(pa, pb))
    union = area_a + area_b - inter
    return max(0.0, min(1.0, inter / union)) if union > 0 else 0.0


def _area(polygon: Sequence[Point]) -> float:
    return abs(_signed_area(polygon)) if len(polygon) >= 3 else 0.0


def _rectangle(x1: float, y1: float, x2: float, y2: float) -> list[Point]:
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def min_area_rectangle(points: Sequence[Point]) -> list[Point]:
    """4 corners of the smallest rotated rectangle around `points`: one of its sides lies on an edge of their
    convex hull, so only the hull's edges are tried."""
    hull = _convex_hull(points)
    if len(hull) < 3:
        raise ValueError("a rotated rectangle needs at least 3 points that are not all on one line")
    best: tuple[float, list[Point]] | None = None
    for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1], strict=True):
        norm = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / norm, (y1 - y0) / norm
        pu = [x * ux + y * uy for x, y in hull]
        pv = [-x * uy + y * ux for x, y in hull]
        area = (max(pu) - min(pu)) * (max(pv) - min(pv))
        if best is None or area < best[0] - 1e-9:
            corners = [(a * ux - b * uy, a * uy + b * ux) for a, b in
                       ((min(pu), min(pv)), (max(pu), min(pv)), (max(pu), max(pv)), (min(pu), max(pv)))]
            best = (area, corners)
    assert best is not None
    return best[1]


def _convex_hull(points: Sequence[Point]) -> list[Point]:
    """The convex hull, counter-clockwise without repeats (Andrew's monotone chain); collinear points dropped."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def half(seq: Sequence[Point]) -> list[Point]:
        out: list[Point] = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return lower[:-1] + upper[:-1]


def box_extent(box: Box) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of the axis-aligned rectangle around a (turned) box."""
    xs, ys = zip(*box.corners(), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


class BoxGrid:
    """Which boxes may overlap a given one: extents (`box_extent`) hashed into square cells sized from the
    extents it is made with, so that comparing thousands of boxes (a tiled run over a large scene) looks at
    neighbours only, not at every pair."""

    def __init__(self, extents: Sequence[tuple[float, float, float, float]]) -> None:
        sides = sorted(max(e[2] - e[0], e[3] - e[1]) for e in extents) or [1.0]
        # about the typical box, but coarse enough that the largest one spans at most 64 cells a side
        self.cell = max(1.0, sides[len(sides) // 2], sides[-1] / 64)
        self._cells: dict[tuple[int, int], list[int]] = {}

    def _keys(self, extent: tuple[float, float, float, float]) -> list[tuple[int, int]]:
        c = self.cell
        return [(i, j) for i in range(math.floor(extent[0] / c), math.floor(extent[2] / c) + 1)
                for j in range(math.floor(extent[1] / c), math.floor(extent[3] / c) + 1)]

    def add(self, index: int, extent: tuple[float, float, float, float]) -> None:
        for key in self._keys(extent):
            self._cells.setdefault(key, []).append(index)

    def near(self, extent: tuple[float, float, float, float]) -> set[int]:
        return {i for key in self._keys(extent) for i in self._cells.get(key, ())}


MERGE_IOU = 0.5


def merge_boxes(boxes: Sequence[tuple[str | None, Box]], iou_threshold: float = MERGE_IOU) -> list[tuple[str | None, Box]]:
    """Greedy NMS per phrase: larger boxes first; drop a box that overlaps a kept one above the threshold."""
    if not iou_threshold > 0:
        raise ValueError(f"iou_threshold must be above 0, got {iou_threshold}")  # boxes apart have IoU 0
    order = sorted(boxes, key=lambda pb: -(pb[1].x2 - pb[1].x1) * (pb[1].y2 - pb[1].y1))
    extents = [box_extent(b) for _, b in order]
    grid = BoxGrid(extents)
    kept: list[tuple[str | None, Box]] = []
    for (phrase, box), extent in zip(order, extents, strict=True):
        if all(kept[i][0] != phrase or rotated_iou(box, kept[i][1]) < iou_threshold for i in grid.near(extent)):
            grid.add(len(kept), extent)
            kept.append((phrase, box))
    return kept


def polygon_to_rotated_box(points4: Sequence[Point]) -> tuple[float, float, float, float, float]:
    """A DOTA quadrilateral (4 corners, any order around the shape) → ``(x1, y1, x2, y2, θ)``.

    The rectangle's width runs along the longest edge, whose direction gives θ (same convention as
    `Box`, normalised to (-90, 90]); width and height are the points' extents along that edge and
    across it, so a true rectangle comes back exactly and a skewed quadrilateral gets a snug
    enclosing rectangle. Units are those of the input (pixels or grid).
    """
    pts = [(float(x), float(y)) for x, y in points4]
    if len(pts) != 4:
        raise ValueError(f"expected 4 corner points, got {len(pts)}")
    edges = [(pts[(i + 1) % 4][0] - pts[i][0], pts[(i + 1) % 4][1] - pts[i][1]) for i in range(4)]
    dx, dy = max(edges, key=lambda e: math.hypot(*e))
    if dx == 0.0 and dy == 0.0:
        raise ValueError("degenerate quadrilateral: all corners coincide")
    theta = math.degrees(math.atan2(-dy, dx))  # counter-clockwise on screen is -y
    if theta <= -90.0:
        theta += 180.0
    elif theta > 90.0:
        theta -= 180.0
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    u, v = (c, -s), (s, c)  # the rotated box's x and y axes, in screen coordinates
    pu = [x * u[0] + y * u[1] for x, y in pts]
    pv = [x * v[0] + y * v[1] for x, y in pts]
    mu, mv = (min(pu) + max(pu)) / 2, (min(pv) + max(pv)) / 2
    w, h = max(pu) - min(pu), max(pv) - min(pv)
    cx, cy = mu * u[0] + mv * v[0], mu * u[1] + mv * v[1]
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theta)
