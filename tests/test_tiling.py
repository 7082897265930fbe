"""Tiled chat over large rasters: tile plans, box merging, and map coordinates of tile boxes."""

from __future__ import annotations

from pathlib import Path

import pytest

from geochat import GeoChat
from geochat.answer import Answer
from geochat.grounding import Box
from geochat.imagery import load_image, pixel_to_lonlat
from geochat.tiling import cut_edges, join_cut_boxes, merge_boxes, plan_tiles
from tests.tiny import tiny_config


def test_plan_tiles_cover_with_overlap() -> None:
    tiles = plan_tiles(2500, 1000, tile=1024, overlap=128)
    assert {(t.col, t.row) for t in tiles} == {(0, 0), (896, 0), (1476, 0)}
    assert all(t.col + t.width <= 2500 and t.row + t.height <= 1000 for t in tiles)
    covered = set()
    for t in tiles:
        covered.update(range(t.col, t.col + t.width))
    assert covered == set(range(2500))
    assert plan_tiles(300, 200) == [plan_tiles(300, 200)[0]] and plan_tiles(300, 200)[0].width == 300
    with pytest.raises(ValueError):
        plan_tiles(100, 100, tile=64, overlap=64)


def test_merge_boxes_per_phrase() -> None:
    a = Box(0, 0, 100, 100)
    near_dup = Box(5, 5, 100, 100)
    other = Box(300, 300, 350, 350)
    merged = merge_boxes([("car", near_dup), ("car", a), ("car", other), ("tree", near_dup)])
    assert ("car", a) in merged and ("car", other) in merged and ("tree", near_dup) in merged
    assert ("car", near_dup) not in merged and len(merged) == 3


def test_tile_boxes_land_in_raster_and_map_coordinates(tiny_llm_dir: Path, geotiffs: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tile reports a 20 px box at its centre; merged boxes must sit at the tiles' centres in the raster."""
    gc = GeoChat.from_config(tiny_config(tiny_llm_dir), max_new_tokens=4)
    path = geotiffs["rect_600x300_utm.tif"]
    real_chat = gc.chat

    def chat_with_a_full_tile_box(image, message, **kwargs):  # type: ignore[no-untyped-def]
        answer: Answer = real_chat(image, message, **kwargs)
        h, w = image.shape[:2]
        from geochat.answer import BoxResult
        box = (w / 2 - 10, h / 2 - 10, w / 2 + 10, h / 2 + 10, 0.0)
        return Answer(**{**answer.__dict__, "boxes": [BoxResult("tile", box, None)]})

    monkeypatch.setattr(gc, "chat", chat_with_a_full_tile_box)
    answer = gc.chat_tiled(path, "everything", tile=256, overlap=32)
    tiles = plan_tiles(600, 300, 256, 32)
    assert len(answer.boxes) == len(tiles)
    expected = sorted((round(t.col + t.width / 2 - 10), round(t.row + t.height / 2 - 10),
                       round(t.col + t.width / 2 + 10), round(t.row + t.height / 2 + 10)) for t in tiles)
    got = sorted(tuple(round(v) for v in b.pixel[:4]) for b in answer.boxes)
    assert got == expected
    info = load_image(path).info
    first = min(answer.boxes, key=lambda b: (b.pixel[1], b.pixel[0]))
    assert first.polygon_lonlat is not None
    corner = pixel_to_lonlat(info, [(first.pixel[0], first.pixel[1])])
    assert corner is not None and first.polygon_lonlat[0] == pytest.approx(corner[0])
    assert answer.geojson is not None and len(answer.geojson["features"]) == len(tiles)


def test_pieces_of_an_object_cut_by_tile_edges_are_joined() -> None:
    tiles = plan_tiles(600, 300, 256, 32)
    left, middle = tiles[0], tiles[1]  # columns 0-256 and 224-480 (rows 0-256)
    assert cut_edges(Box(200, 100, 256, 140), left, 600, 300) and cut_edges(Box(224, 100, 300, 140), middle, 600, 300)
    assert not cut_edges(Box(0, 0, 40, 40), left, 600, 300)  # the raster's own border is no cut
    pieces = [("tank", Box(120, 100, 256, 140), left, True), ("tank", Box(224, 100, 400, 140), middle, True),  # wide
              ("tank", Box(230, 180, 256, 200), left, True), ("tank", Box(230, 180, 250, 200), middle, False),
              ("car", Box(226, 10, 234, 20), left, False), ("car", Box(240, 10, 250, 20), left, False),  # two cars,
              ("car", Box(224, 5, 330, 25), middle, True),                      # and one box over both: kept apart
              ("ship", Box(240, 100, 300, 140), middle, True)]
    joined = sorted(join_cut_boxes(pieces), key=lambda pb: (pb[0] or "", pb[1].y1, pb[1].x1))
    assert joined == [("car", Box(224, 5, 330, 25)), ("car", Box(226, 10, 234, 20)), ("car", Box(240, 10, 250, 20)),
                      ("ship", Box(240, 100, 300, 140)), ("tank", Box(120, 100, 400, 140)),
                      ("tank", Box(230, 180, 256, 200))]
    turned = join_cut_boxes([("ship", Box(150, 100, 256, 130, 10), left, True),
                             ("ship", Box(224, 95, 330, 125, 10), middle, True)])
    assert len(turned) == 1 and turned[0][1].theta == pytest.approx(10)  # the turned rectangle around both pieces,
    hull = turned[0][1]
    assert (hull.x2 - hull.x1) * (hull.y2 - hull.y1) < 6_900  # and the smallest one: 180 x 38 px
    for piece in (Box(150, 100, 256, 130, 10), Box(224, 95, 330, 125, 10)):
        assert all(hull.x1 - 1e-6 <= x <= hull.x2 + 1e-6 and hull.y1 - 1e-6 <= y <= hull.y2 + 1e-6
                   for x, y in _unturned(piece.corners(), hull))


def _unturned(points: list[tuple[float, float]], box: Box) -> list[tuple[float, float]]:
    """`points` in the frame of `box` before its turn (so that they can be compared with its x1..x2)."""
    import math

    cx, cy = box.center
    c, s = math.cos(math.radians(box.theta)), math.sin(math.radians(box.theta))
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def test_an_object_across_a_seam_is_one_box(tiny_llm_dir: Path, geotiffs: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tile reports what it sees of three tanks: one longer than twice the overlap across the seam of the first
    two columns (each tile sees a cut piece), one across that seam but whole in the second column, one inside."""
    from geochat.answer import BoxResult

    gc = GeoChat.from_config(tiny_config(tiny_llm_dir), max_new_tokens=4)
    real_chat = gc.chat
    tiles = iter(plan_tiles(600, 300, 256, 32))
    tanks = [(150, 100, 330, 140), (230, 200, 300, 240), (40, 40, 80, 90)]

    def chat_seeing_the_tanks(image, message, **kwargs):  # type: ignore[no-untyped-def]
        answer: Answer = real_chat(image, message, **kwargs)
        t = next(tiles)  # tiles are asked in the planned order, at full resolution here
        seen = []
        for x1, y1, x2, y2 in tanks:
            a, b, c, d = max(x1, t.col), max(y1, t.row), min(x2, t.col + t.width), min(y2, t.row + t.height)
            if a < c and b < d:
                seen.append(BoxResult("tank", (a - t.col, b - t.row, c - t.col, d - t.row, 0.0), None))
        return Answer(**{**answer.__dict__, "boxes": seen})

    monkeypatch.setattr(gc, "chat", chat_seeing_the_tanks)
    answer = gc.chat_tiled(geotiffs["rect_600x300_utm.tif"], "tank", tile=256, overlap=32)
    assert sorted(tuple(round(v) for v in b.pixel[:4]) for b in answer.boxes) == sorted(tanks)


def test_a_turned_box_at_the_raster_edge_is_cut_there(tiny_llm_dir: Path, geotiffs: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The last column's tile reports a box turned 30° that reaches past the raster's right edge, and one in its
    padding: the GeoJSON polygon of the first ends at the edge, as on one view; the second is dropped."""
    from rasterio.warp import transform

    from geochat.answer import BoxResult
    from geochat.imagery import map_to_pixel

    gc = GeoChat.from_config(tiny_config(tiny_llm_dir), max_new_tokens=4)
    real_chat = gc.chat
    tiles = plan_tiles(600, 300, 256, 32)
    last = max(tiles, key=lambda t: (t.col, t.row))
    order = iter(tiles)

    def chat_at_the_edge(image, message, **kwargs):  # type: ignore[no-untyped-def]
        answer: Answer = real_chat(image, message, **kwargs)
        t = next(order)
        boxes = []
        if t == last:  # tile pixels: this tile ends at the raster's edge (column 600)
            boxes = [BoxResult("pier", (t.width - 60, 40, t.width + 20, 80, 30.0), None),
                     BoxResult("ghost", (t.width + 10, 40, t.width + 60, 80, 0.0), None)]
        return Answer(**{**answer.__dict__, "boxes": boxes})

    monkeypatch.setattr(gc, "chat", chat_at_the_edge)
    path = geotiffs["rect_600x300_utm.tif"]
    answer = gc.chat_tiled(path, "pier", tile=256, overlap=32)
    assert [b.phrase for b in answer.boxes] == ["pier"]
    assert answer.boxes[0].pixel[2] > 600  # the model's rectangle, as it said it
    assert answer.geojson is not None and len(answer.geojson["features"]) == 1
    ring = answer.geojson["features"][0]["geometry"]["coordinates"][0]
    info = load_image(path).info
    east, north = transform("EPSG:4326", info.crs, [p[0] for p in ring], [p[1] for p in ring])
    xs = [x for x, _ in map_to_pixel(info, list(zip(east, north, strict=True)))]
    assert max(xs) == pytest.approx(600, abs=0.01) and min(xs) < 560
