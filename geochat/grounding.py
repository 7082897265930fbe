"""GeoChat's box grammar: format, parse, re-project and compare (rotated) boxes.

The model speaks about locations in text. A box is ``{<x1><y1><x2><y2>|<θ>}``: integers on a 0–100
grid of the model's *square* input, θ the rotation in degrees (``|<θ>`` may be absent for an
axis-aligned box). A phrase is tagged ``<p>…</p>`` before its boxes, and several boxes follow one
another as ``}{``::

    There are <p>two planes</p> {<10><20><30><40>|<45>}{<50><20><70><40>|<45>} on the apron.

Why boxes must be mapped back from the padded square
----------------------------------------------------
The image processor (LLaVA-1.5 / GeoChat "pad" aspect mode) pastes a w×h image into the centre of a
square of side ``S = max(w, h)`` before resizing it, so the 0–100 grid spans that padded square, not
the image. For a 600×300 image the real pixels occupy grid rows 25–75; grid ``(0, 0)`` is the pixel
``(0, -150)``, above the image. GeoChat's demo scales grid values by the image's own width and
height, which is right only for square images and squashes every box vertically (or horizontally)
on others. Here a grid point ``g`` maps to the original pixel ``p = g / 100 · S − offset`` with
``offset = ((S − w) / 2, (S − h) / 2)``. Because that map is a uniform scale plus a shift, a rotated
rectangle on the grid stays a rectangle with the same angle in pixels; only then is it sent through
the raster's affine transform to map coordinates (elsewhere).

Angle convention
----------------
θ is in degrees about the box centre, and **positive θ turns the box counter-clockwise as seen on
screen** (image axes: x right, y down). This is the project's one convention, used by
`polygon_to_rotated_box` for DOTA quadrilaterals too; a data set that counts angles the other way
must flip the sign when it is loaded. A point at
offset ``(dx, dy)`` from the centre moves to ``(dx·cosθ + dy·sinθ, −dx·sinθ + dy·cosθ)``; so with
θ = 90 the unrotated top-right corner ends up at the top-left.

Parsing comes in two strengths: `parse_boxes` is lenient (model output: odd spacing, missing θ,
values off the grid; broken fragments are skipped), `parse_boxes_strict` raises
`GroundingParseError` on any malformed fragment (inputs that meet the model, e.g. ``--region``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from geochat.errors import GroundingParseError

GRID = 100.0  # the grid spans 0..GRID on both axes of the padded square

Point = tuple[float, float]

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = rf"<\s*({_NUM})\s*>"
# Lenient body: 4 numbers, then an optional θ with or without "|"; spaces anywhere.
_LENIENT_BODY = re.compile(
    rf"\s*{_TOKEN}\s*{_TOKEN}\s*{_TOKEN}\s*{_TOKEN}\s*(?:\|?\s*{_TOKEN}\s*)?(?:\}}|(?![<|\d.+\-]))"
)
# Strict fragment: exactly the grammar (whitespace tolerated), closing brace required.
_STRICT_BOX = re.compile(rf"\{{\s*{_TOKEN}\s*{_TOKEN}\s*{_TOKEN}\s*{_TOKEN}\s*(?:\|\s*{_TOKEN}\s*)?\}}")
_PHRASE = re.compile(r"<p>(.*?)</p>", re.DOTALL | re.IGNORECASE)
_BOX_LIKE = re.compile(r"\{(?:\s*\|?\s*<[^<>{}]*>)+(?:\s*\|)?\s*\}?")  # a box, also broken, unclosed or cut after |
_STRAY_TOKEN = re.compile(rf"<\s*{_NUM}\s*>")
_UNFINISHED_TAIL = re.compile(r"(?:\{[\s|<>\d.+\-]*|</?p?)\Z")  # a box or <p> tag open at the end ("<10%" stays)


@dataclass(frozen=True)
class Box:
    """A (possibly rotated) box on the 0–100 grid of the model's square, centre-padded input.

    ``(x1, y1, x2, y2)`` bound the *unrotated* rectangle; ``theta`` (degrees, positive =
    counter-clockwise on screen) turns it about its centre. Values may lie off the grid (a rotated
    box near the edge does); parsing is where clamping happens.
    """

    x1: float
    y1: float
    x2: float
    y2: float
    theta: float = 0.0
    phrase: str | None = None

    def __post_init__(self) -> None:
        values = (self.x1, self.y1, self.x2, self.y2, self.theta)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"box values must be finite, got {values}")
        if self.x1 > self.x2 or self.y1 > self.y2:
            raise ValueError(f"box needs x1<=x2 and y1<=y2, got ({self.x1}, {self.y1}, {self.x2}, {self.y2})")

    @property
    def center(self) -> Point:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def corners(self) -> list[Point]:
        """The 4 corners (grid units), unrotated order TL, TR, BR, BL, turned by θ about the centre."""
        cx, cy = self.center
        c, s = math.cos(math.radians(self.theta)), math.sin(math.radians(self.theta))
        out = []
        for x, y in ((self.x1, self.y1), (self.x2, self.y1), (self.x2, self.y2), (self.x1, self.y2)):
            dx, dy = x - cx, y - cy
            out.append((cx + dx * c + dy * s, cy - dx * s + dy * c))
        return out


def _round(v: float) -> int:
    """Round half away from zero (Python's round() is banker's rounding)."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def format_box(box: Box, with_theta: bool = True) -> str:
    """``{<x1><y1><x2><y2>|<θ>}`` with rounded integers; ``{<x1><y1><x2><y2>}`` without θ."""
    body = "".join(f"<{_round(v)}>" for v in (box.x1, box.y1, box.x2, box.y2))
    return "{" + body + (f"|<{_round(box.theta)}>" if with_theta else "") + "}"


def format_grounded(
    phrases_and_boxes: Sequence[tuple[str | None, Sequence[Box]]], with_theta: bool = True
) -> str:
    """``<p>two planes</p> {<..>..|<..>}{<..>..|<..>}`` per item, items joined by a space.

    A phrase of None gives the boxes alone. Characters of the grammar (``<>{}``) are dropped from a
    phrase so that it cannot break the tagging.
    """
    parts = []
    for phrase, boxes in phrases_and_boxes:
        joined = "".join(format_box(b, with_theta) for b in boxes)
        if phrase is None:
            parts.append(joined)
        else:
            clean = re.sub(r"[<>{}]", "", phrase).strip()
            parts.append(f"<p>{clean}</p> {joined}".rstrip())
    return " ".join(parts)


def _phrase_before(text: str, pos: int) -> str | None:
    phrase = None
    for m in _PHRASE.finditer(text, 0, pos):
        phrase = m.group(1).strip() or None
    return phrase


def _clamp(v: float) -> float:
    return min(max(v, 0.0), GRID)


def parse_boxes(text: str) -> list[Box]:
    """Every box in ``text``, leniently.

    Tolerates: θ absent (0), θ without ``|``, several boxes ``}{``, stray text between boxes,
    spaces inside, floats, negative θ, a missing closing brace at the end. Coordinates off the grid
    are clamped to 0–100 and reversed corners swapped. A fragment with fewer than 4 numbers, more
    than 5, or non-numbers is skipped. Each box gets the nearest preceding ``<p>…</p>`` phrase.
    """
    boxes = []
    for m in re.finditer(r"\{", text):
        body = _LENIENT_BODY.match(text, m.end())
        if body is None:
            continue
        x1, y1, x2, y2 = (_clamp(float(g)) for g in body.groups()[:4])
        theta = float(body.group(5)) if body.group(5) is not None else 0.0
        if not math.isfinite(theta):
            continue
        boxes.append(
            Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), theta, _phrase_before(text, m.start()))
        )
    return boxes


def _snippet(text: str, start: int, end: int) -> str:
    frag = text[start:end]
    return frag if len(frag) <= 60 else frag[:57] + "..."


def _checked_box(values: Sequence[float], theta: float, frag: str) -> Box:
    if not all(math.isfinite(v) and 0.0 <= v <= GRID for v in values):
        raise GroundingParseError(f"box {frag!r} has a coordinate outside the 0-100 grid")
    x1, y1, x2, y2 = values
    if x1 > x2 or y1 > y2:
        raise GroundingParseError(f"box {frag!r} needs x1<=x2 and y1<=y2 (top-left corner first)")
    if not math.isfinite(theta):
        raise GroundingParseError(f"box {frag!r} has a non-finite angle")
    return Box(x1, y1, x2, y2, theta)


def parse_boxes_strict(text: str) -> list[Box]:
    """Every box in ``text``; raise `GroundingParseError` on anything box-like that is malformed.

    Every ``{`` must open a well-formed ``{<x1><y1><x2><y2>}`` or ``{<x1><y1><x2><y2>|<θ>}``
    (whitespace tolerated) with coordinates in 0–100, x1<=x2 and y1<=y2; a stray ``}`` or a ``<n>``
    token outside a box is an error too. Text without any box gives ``[]``.
    """
    boxes = []
    pos = 0
    outside = []  # spans of text between boxes, checked for stray grammar
    while True:
        start = text.find("{", pos)
        outside.append((pos, len(text) if start < 0 else start))
        if start < 0:
            break
        m = _STRICT_BOX.match(text, start)
        if m is None:
            close = text.find("}", start)
            end = len(text) if close < 0 else close + 1
            raise GroundingParseError(
                f"malformed box {_snippet(text, start, end)!r}: expected {{<x1><y1><x2><y2>}} or "
                "{<x1><y1><x2><y2>|<theta>} with numbers on the 0-100 grid"
            )
        values = [float(g) for g in m.groups()[:4]]
        theta = float(m.group(5)) if m.group(5) is not None else 0.0
        box = _checked_box(values, theta, _snippet(text, start, m.end()))
        boxes.append(replace(box, phrase=_phrase_before(text, start)))
        pos = m.end()
    for a, b in outside:
        stray = re.search(rf"\}}|{_STRAY_TOKEN.pattern}", text[a:b])
        if stray is not None:
            s = a + stray.start()
            raise GroundingParseError(
                f"stray box fragment {_snippet(text, max(0, s - 20), s + 20)!r} outside {{...}}"
            )
    return boxes


def strip_grounding(text: str) -> str:
    """Answer text for display: ``<p>x</p>`` becomes ``x``, boxes go (a box cut off at the end of an answer
    that ran out of tokens too), whitespace is tidied."""
    out = _BOX_LIKE.sub(" ", _UNFINISHED_TAIL.sub("", text))
    out = re.sub(r"</?p>", "", out, flags=re.IGNORECASE)
    out = re.sub(r"[ \t]+", " ", out)
    out = re.sub(r" +([.,;:!?)])", r"\1", out)
    out = re.sub(r"\( +", "(", out)
    out = "\n".join(line.strip() for line in out.splitlines())
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip()


def parse_region(spec: str) -> Box:
    """A region given on the command line, on the 0–100 grid: ``"x1,y1,x2,y2"``,
    ``"x1,y1,x2,y2,theta"`` or the box grammar ``{<x1><y1><x2><y2>|<θ>}``.

    Strict: raises `GroundingParseError` on anything else. Pixel regions go through
    `pixel_box_to_grid` instead.
    """
    s = spec.strip()
    if s.startswith("{"):
        boxes = parse_boxes_strict(s)
        if len(boxes) != 1 or _STRICT_BOX.fullmatch(s) is None:
            raise GroundingParseError(f"region {spec!r} must hold exactly one box")
        return boxes[0]
    parts = [p.strip() for p in s.split(",")]
    if len(parts) not in (4, 5) or not all(re.fullmatch(_NUM, p) for p in parts):
        raise GroundingParseError(
            f"region {spec!r} must be 'x1,y1,x2,y2' or 'x1,y1,x2,y2,theta' (numbers on the 0-100 grid)"
        )
    values = [float(p) for p in parts]
    return _checked_box(values[:4], values[4] if len(values) == 5 else 0.0, spec)


def _geometry(width: int, height: int) -> tuple[float, float, float]:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = float(max(width, height))
    return side, (side - width) / 2, (side - height) / 2


def grid_to_pixel(points: Sequence[Point], width: int, height: int) -> list[Point]:
    """Grid points (0–100 of the centre-padded square, side S = max(w, h)) → original pixels."""
    side, ox, oy = _geometry(width, height)
    return [(gx / GRID * side - ox, gy / GRID * side - oy) for gx, gy in points]


def pixel_to_grid(points: Sequence[Point], width: int, height: int) -> list[Point]:
    """Original pixel points → grid points; the inverse of `grid_to_pixel`."""
    side, ox, oy = _geometry(width, height)
    return [((px + ox) / side * GRID, (py + oy) / side * GRID) for px, py in points]


def box_to_pixel_polygon(box: Box, width: int, height: int) -> list[Point]:
    """The box's rotated corners (TL, TR, BR, BL before rotation) in original pixel coordinates."""
    return grid_to_pixel(box.corners(), width, height)


def pixel_box_to_grid(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int, theta: float = 0.0
) -> Box:
    """A pixel box (corners in either order) on a w×h image → grid `Box`; θ is unchanged because
    the map is a uniform scale plus a shift."""
    (gx1, gy1), (gx2, gy2) = pixel_to_grid([(x1, y1), (x2, y2)], width, height)
    return Box(min(gx1, gx2), min(gy1, gy2), max(gx1, gx2), max(gy1, gy2), float(theta))


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
