"""GeoChat's box grammar: format, parse and re-project (rotated) boxes (their overlap: `geochat.box_geometry`).

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
