"""GeoChat box grammar: formatting, lenient/strict parsing, re-projection, rotated geometry."""

from __future__ import annotations

import math
import random

import pytest

from geochat.box_geometry import (
    MERGE_IOU,
    box_extent,
    iou_within,
    merge_boxes,
    min_area_rectangle,
    polygon_to_rotated_box,
    rotated_iou,
)
from geochat.errors import GroundingParseError
from geochat.grounding import (
    Box,
    box_to_pixel_polygon,
    format_box,
    format_grounded,
    grid_to_pixel,
    parse_boxes,
    parse_boxes_strict,
    parse_region,
    pixel_box_to_grid,
    pixel_to_grid,
    strip_grounding,
)


def close(a, b, tol=1e-9):
    return all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True))


def close_points(a, b, tol=1e-9):
    return len(a) == len(b) and all(close(p, q, tol) for p, q in zip(a, b, strict=True))


def random_boxes(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x1, x2 = sorted(rng.uniform(0, 100) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, 100) for _ in range(2))
        out.append(Box(x1, y1, x2, y2, rng.uniform(-90, 90)))
    return out


def rounded(box):
    r = lambda v: math.copysign(math.floor(abs(v) + 0.5), v)  # noqa: E731
    return (r(box.x1), r(box.y1), r(box.x2), r(box.y2), r(box.theta))


# --- formatting ----------------------------------------------------------------------------------


def test_format_box_exact_strings():
    box = Box(10.4, 20.5, 30.6, 40.0, theta=-44.6)
    assert format_box(box) == "{<10><21><31><40>|<-45>}"
    assert format_box(box, with_theta=False) == "{<10><21><31><40>}"
    assert format_box(Box(0, 0, 100, 100)) == "{<0><0><100><100>|<0>}"


def test_format_grounded_exact_string():
    a, b = Box(10, 20, 30, 40, 45), Box(50, 20, 70, 40)
    text = format_grounded([("two planes", [a, b]), (None, [Box(1, 2, 3, 4)])])
    assert text == "<p>two planes</p> {<10><20><30><40>|<45>}{<50><20><70><40>|<0>} {<1><2><3><4>|<0>}"
    assert format_grounded([("a {tank}", [a])], with_theta=False) == "<p>a tank</p> {<10><20><30><40>}"


@pytest.mark.parametrize("seed", range(5))
def test_format_parse_round_trip(seed):
    boxes = random_boxes(20, seed)
    parsed = parse_boxes("".join(format_box(b) for b in boxes))
    assert [rounded(p) for p in parsed] == [rounded(b) for b in boxes]
    # parsing what was formatted and formatting again is a fixed point
    assert "".join(format_box(p) for p in parsed) == "".join(format_box(b) for b in boxes)


@pytest.mark.parametrize("seed", range(3))
def test_format_grounded_round_trip_keeps_phrases(seed):
    boxes = random_boxes(6, seed)
    text = format_grounded([("plane", boxes[:2]), ("storage tank", boxes[2:5]), (None, boxes[5:])])
    parsed = parse_boxes_strict("Here: " + text + " done.")
    assert [p.phrase for p in parsed] == ["plane"] * 2 + ["storage tank"] * 4  # None keeps nearest
    assert [rounded(p) for p in parsed] == [rounded(b) for b in boxes]


# --- lenient parsing -----------------------------------------------------------------------------


def test_parse_theta_absent_and_several_boxes():
    boxes = parse_boxes("{<10><20><30><40>}{<50><60><70><80>|<30>}")
    assert [(b.x1, b.y1, b.x2, b.y2, b.theta) for b in boxes] == [(10, 20, 30, 40, 0), (50, 60, 70, 80, 30)]


def test_parse_stray_text_spaces_floats_negative_theta():
    text = "I see { < 10.5 > <20> <30.25><40 > | < -12.5 > } and also, nearby, {<1><2><3><4>}."
    a, b = parse_boxes(text)
    assert (a.x1, a.y1, a.x2, a.y2, a.theta) == (10.5, 20, 30.25, 40, -12.5)
    assert (b.x1, b.y1, b.x2, b.y2) == (1, 2, 3, 4)


def test_parse_clamps_and_swaps():
    (box,) = parse_boxes("{<120><-5><30><40>|<10>}")
    assert (box.x1, box.y1, box.x2, box.y2, box.theta) == (30, 0, 100, 40, 10)


@pytest.mark.parametrize(
    "fragment",
    [
        "{<10><20><30>}",
        "{<a><b><c><d>}",
        "{<10><20><30><x>}",
        "{<1><2><3><4><5><6>}",
        "{}",
        "{<10><20><30><40>|<x>}",
    ],
)
def test_parse_skips_malformed(fragment):
    text = f"before {fragment} middle {{<1><2><3><4>}} after"
    boxes = parse_boxes(text)
    assert [(b.x1, b.y1, b.x2, b.y2) for b in boxes] == [(1, 2, 3, 4)]


def test_parse_theta_without_bar_and_unclosed_last_box():
    a, b = parse_boxes("{<10><20><30><40><15>} then {<5><6><7><8>|<20>")
    assert a.theta == 15 and (b.x1, b.theta) == (5, 20)


def test_phrase_is_nearest_preceding():
    text = "<p>a ship</p> {<1><2><3><4>} and <p> the <b>pier</b> </p> {<5><6><7><8>}{<9><9><10><10>}"
    boxes = parse_boxes(text)
    assert [b.phrase for b in boxes] == ["a ship", "the <b>pier</b>", "the <b>pier</b>"]
    assert parse_boxes("{<1><2><3><4>}")[0].phrase is None


# --- strict parsing ------------------------------------------------------------------------------


def test_strict_accepts_well_formed():
    boxes = parse_boxes_strict("<p>x</p> { <1><2> <3><4> | <5> }{<0><0><100><100>}")
    assert [(b.x1, b.theta, b.phrase) for b in boxes] == [(1, 5, "x"), (0, 0, "x")]
    assert parse_boxes_strict("no boxes here") == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("see {<10><20><30>}", "{<10><20><30>}"),
        ("{<10><20><30><x>}", "{<10><20><30><x>}"),
        ("{<10><20><30><40><50>}", "{<10><20><30><40><50>}"),  # θ without "|"
        ("{<10><20><30><40>", "{<10><20><30><40>"),  # unclosed
        ("{<10><20><300><40>}", "{<10><20><300><40>}"),  # off the grid
        ("{<30><20><10><40>}", "{<30><20><10><40>}"),  # reversed corners
        ("{<1><2><3><4>} <5><6>", "<5>"),  # stray tokens outside a box
        ("{<1><2><3><4>}}", "}"),
    ],
)
def test_strict_raises_with_fragment(text, fragment):
    with pytest.raises(GroundingParseError) as err:
        parse_boxes_strict(text)
    assert fragment in str(err.value)


def test_parse_region():
    assert parse_region("10,20,30,40") == Box(10, 20, 30, 40)
    assert parse_region(" 10, 20.5, 30, 40, -15 ") == Box(10, 20.5, 30, 40, -15)
    assert parse_region("{<10><20><30><40>|<5>}") == Box(10, 20, 30, 40, 5)
    for bad in ["10,20,30", "a,b,c,d", "10,20,30,40,5,6", "30,20,10,40", "0,0,101,50", "{<1><2><3>}", ""]:
        with pytest.raises(GroundingParseError):
            parse_region(bad)


# --- display text --------------------------------------------------------------------------------


def test_strip_grounding():
    text = "There are <p>two planes</p> {<10><20><30><40>|<45>}{<50><20><70><40>} on the apron .\n\n\n\nOK"
    assert strip_grounding(text) == "There are two planes on the apron.\n\nOK"
    assert strip_grounding("A broken {<1><2> box") == "A broken box"
    # generation stopped by the token limit right after a box's "|": no stray "|" in the answer
    assert strip_grounding("<p>buildings</p> {<2><13><3><26>|<-2>}{<2><25><40><53>|") == "buildings"
    assert strip_grounding("plain {set} text") == "plain {set} text"
    # cut off inside a box's numbers or right after its "{": the final answer keeps no markup
    assert strip_grounding("x {<12><3") == "x"
    assert strip_grounding("Africa {<") == "Africa"
    assert strip_grounding("Africa {") == "Africa"
    assert strip_grounding("the <p>runway</p> <p") == "the runway"
    for text in ("NDVI < 0.2", "NDVI<0.2", "cloud cover <10%", "a<b"):  # comparisons are text, not open tags
        assert strip_grounding(text) == text


# --- grid <-> pixel ------------------------------------------------------------------------------


def test_grid_to_pixel_non_square():
    assert close_points(grid_to_pixel([(0, 0), (100, 100)], 600, 300), [(0, -150), (600, 450)])
    assert close_points(grid_to_pixel([(0, 0), (100, 100)], 300, 600), [(-150, 0), (450, 600)])
    # a box covering the real image maps to exactly its bounds
    box = Box(0, 25, 100, 75)
    poly = box_to_pixel_polygon(box, 600, 300)
    assert close_points(poly, [(0, 0), (600, 0), (600, 300), (0, 300)])
    assert pixel_box_to_grid(0, 0, 600, 300, 600, 300) == box


@pytest.mark.parametrize(("w", "h"), [(600, 300), (300, 600), (257, 257), (1, 999)])
def test_pixel_grid_inverse(w, h):
    rng = random.Random(w * h)
    pts = [(rng.uniform(-50, w + 50), rng.uniform(-50, h + 50)) for _ in range(50)]
    assert close_points(grid_to_pixel(pixel_to_grid(pts, w, h), w, h), pts, 1e-9)


def test_pixel_box_to_grid_keeps_angle_and_orders():
    box = pixel_box_to_grid(600, 300, 300, 150, 600, 300, theta=30)
    assert close((box.x1, box.y1, box.x2, box.y2, box.theta), (50, 50, 100, 75, 30))


def test_grid_size_must_be_positive():
    with pytest.raises(ValueError):
        grid_to_pixel([(0, 0)], 0, 10)


# --- rotation ------------------------------------------------------------------------------------


def test_corners_unrotated_order():
    assert Box(10, 20, 50, 40).corners() == [(10, 20), (50, 20), (50, 40), (10, 40)]


def test_corners_theta_90_non_square():
    # 40 wide, 20 tall, centre (30, 30). +90 = counter-clockwise on screen (y down):
    # the right end of the box swings up, the unrotated TR corner lands at the top-left.
    got = Box(10, 20, 50, 40, theta=90).corners()
    assert close_points(got, [(20, 50), (20, 10), (40, 10), (40, 50)])
    # the point right of the centre moves above it
    right_mid = ((got[1][0] + got[2][0]) / 2, (got[1][1] + got[2][1]) / 2)
    assert close(right_mid, (30, 10))


def test_corners_small_positive_theta_is_counter_clockwise_on_screen():
    tl, tr, br, bl = Box(0, 0, 20, 10, theta=10).corners()
    assert tr[1] < tl[1]  # right end rises (smaller y) under a counter-clockwise turn on screen


def test_pixel_polygon_is_rotated_rectangle_with_same_angle():
    box = Box(10, 30, 50, 45, theta=25)
    poly = box_to_pixel_polygon(box, 600, 300)
    x1, y1, x2, y2, theta = polygon_to_rotated_box(poly)
    assert math.isclose(theta, 25)
    assert close((x2 - x1, y2 - y1), (40 * 6, 15 * 6))  # grid unit = 6 px (S=600)


# --- rotated IoU ---------------------------------------------------------------------------------


def test_rotated_iou_cases():
    a = Box(0, 0, 10, 10)
    assert math.isclose(rotated_iou(a, a), 1.0)
    assert rotated_iou(a, Box(20, 20, 30, 30)) == 0.0
    assert math.isclose(rotated_iou(a, Box(5, 0, 15, 10)), 1 / 3)
    assert math.isclose(rotated_iou(a, Box(0, 0, 10, 10, theta=90)), 1.0)
    assert math.isclose(rotated_iou(Box(10, 20, 30, 40, 33), Box(10, 20, 30, 40, 33)), 1.0)


def test_rotated_iou_45_degree_square():
    # a square turned 45° about its centre overlaps the original in a regular octagon
    a, b = Box(0, 0, 2, 2), Box(0, 0, 2, 2, theta=45)
    octagon = 8 * (math.sqrt(2) - 1)  # area of the octagon inscribed in a 2x2 square
    assert math.isclose(rotated_iou(a, b), octagon / (8 - octagon))
    assert math.isclose(rotated_iou(a, b), rotated_iou(b, a))


def test_rotated_iou_non_square_90_and_degenerate():
    a = Box(0, 0, 20, 10)
    b = Box(0, 0, 20, 10, theta=90)  # 10x20 cross: overlap 10x10
    assert math.isclose(rotated_iou(a, b), 100 / 300)
    assert rotated_iou(Box(1, 1, 1, 5), Box(1, 1, 1, 5)) == 0.0


# --- DOTA quadrilaterals -------------------------------------------------------------------------


def test_polygon_to_rotated_box_axis_aligned_and_start_corner():
    quad = [(10, 20), (50, 20), (50, 40), (10, 40)]
    for k in range(4):
        assert close(polygon_to_rotated_box(quad[k:] + quad[:k]), (10, 20, 50, 40, 0))
    # tall box: the longest edge is vertical, so θ = 90 and the width is the long side
    x1, y1, x2, y2, theta = polygon_to_rotated_box([(0, 0), (10, 0), (10, 40), (0, 40)])
    assert math.isclose(abs(theta), 90) and close((x2 - x1, y2 - y1), (40, 10))
    assert close(((x1 + x2) / 2, (y1 + y2) / 2), (5, 20))


@pytest.mark.parametrize("seed", range(3))
def test_polygon_to_rotated_box_recovers_rectangles(seed):
    for box in random_boxes(20, seed):
        if box.x2 - box.x1 <= box.y2 - box.y1 + 1e-6:
            continue  # width must be the longest side for the angle to be recoverable as given
        for clockwise in (False, True):
            corners = box.corners()
            quad = corners[::-1] if clockwise else corners
            x1, y1, x2, y2, theta = polygon_to_rotated_box(quad)
            got = Box(x1, y1, x2, y2, theta)
            assert math.isclose(theta, box.theta, abs_tol=1e-6)
            assert close_points(got.corners(), box.corners(), 1e-6) or close_points(
                got.corners(), box.corners()[2:] + box.corners()[:2], 1e-6
            )
            assert rotated_iou(got, box) > 1 - 1e-9


def test_polygon_to_rotated_box_encloses_skewed_quad():
    quad = [(0, 0), (10, 1), (11, 6), (1, 5)]
    x1, y1, x2, y2, theta = polygon_to_rotated_box(quad)
    rect = Box(x1, y1, x2, y2, theta)
    # every quad corner lies inside (or on) the rectangle
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    cx, cy = rect.center
    for px, py in quad:
        u = (px - cx) * c - (py - cy) * s
        v = (px - cx) * s + (py - cy) * c
        assert abs(u) <= (x2 - x1) / 2 + 1e-9 and abs(v) <= (y2 - y1) / 2 + 1e-9


def test_box_validates():
    with pytest.raises(ValueError):
        Box(30, 0, 10, 10)
    with pytest.raises(ValueError):
        Box(0, 0, 10, float("nan"))


@pytest.mark.parametrize("seed", range(3))
def test_merge_boxes_looks_at_neighbours_only_and_keeps_what_all_pairs_keep(seed):
    rng = random.Random(seed)
    centres = [(rng.uniform(0, 20_000), rng.uniform(0, 20_000)) for _ in range(40)]
    boxes = []
    for _ in range(400):  # clusters of near-copies, some turned, over a 20,000 px scene, two phrases
        cx, cy = rng.choice(centres)
        w, h = rng.uniform(100, 160), rng.uniform(100, 160)
        x, y = cx + rng.uniform(-20, 20), cy + rng.uniform(-20, 20)
        boxes.append((rng.choice(["car", "ship"]), Box(x, y, x + w, y + h, rng.choice([0.0, 0.0, 30.0, -60.0]))))

    def all_pairs(items):
        kept = []
        for phrase, box in sorted(items, key=lambda pb: -(pb[1].x2 - pb[1].x1) * (pb[1].y2 - pb[1].y1)):
            if all(p != phrase or rotated_iou(box, k) < MERGE_IOU for p, k in kept):
                kept.append((phrase, box))
        return kept

    kept = all_pairs(boxes)
    assert merge_boxes(boxes) == kept and 80 < len(kept) < 200  # many dropped, many kept
    with pytest.raises(ValueError, match="above 0"):
        merge_boxes(boxes, iou_threshold=0)


@pytest.mark.parametrize("seed", range(5))
def test_min_area_rectangle_of_a_turned_rectangle_and_points_inside_it(seed):
    rng = random.Random(seed)
    box = Box(100, 200, 100 + rng.uniform(10, 400), 200 + rng.uniform(10, 400), rng.uniform(-89, 89))
    corners = box.corners()
    inside = [(cx + (ax - cx) * t, cy + (ay - cy) * t) for (ax, ay) in corners for t in (0.3, 0.7)
              for cx, cy in [box.center]]
    found = min_area_rectangle([*inside, *corners, *inside])
    assert rotated_iou(Box(*polygon_to_rotated_box(found)), box) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="not all on one line"):
        min_area_rectangle([(0, 0), (1, 1), (2, 2), (1, 1)])


def test_iou_within_a_region():
    a, b = Box(0, 0, 100, 10), Box(50, 0, 200, 10)
    assert iou_within(a, b, (50, 0, 100, 10)) == pytest.approx(1.0)  # they agree inside the strip
    assert iou_within(a, b, (0, 0, 200, 10)) == pytest.approx(rotated_iou(a, b))
    assert iou_within(a, b, (100, 0, 150, 10)) == 0.0  # a only touches that region
    assert iou_within(a, Box(5, 5, 5, 9), (0, 0, 200, 10)) == 0.0  # a degenerate box
    assert box_extent(Box(0, 0, 10, 10, 45)) == pytest.approx((5 - 50**0.5, 5 - 50**0.5, 5 + 50**0.5, 5 + 50**0.5))
