"""Large scenes: chat tile by tile, then merge the boxes in raster (and so map) coordinates.

A 20,000 × 20,000 scene shrunk to the model's 224 px input loses every car and most buildings.
`chat_tiled` cuts the raster into overlapping windows (read one at a time with `read_window`, never
the whole raster), asks the same question of each tile, maps each tile's boxes back to raster pixels
(a uniform scale plus an offset, so rotations survive), and merges boxes that overlapping tiles both
found with greedy non-maximum suppression on rotated IoU, per phrase. An object that crosses a seam comes
back from each tile cut at that tile's edge: such pieces are joined first (`join_cut_boxes`), so that it is
one box, not a whole box and a sliver beside it or two halves. The overview's stretch is
reused for every tile so that all tiles look alike to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from geochat.answer import Answer, Timings
from geochat.box_geometry import (
    BoxGrid,
    box_extent,
    clip_to_frame,
    iou_within,
    merge_boxes,
    min_area_rectangle,
    polygon_to_rotated_box,
)
from geochat.errors import GeoChatError
from geochat.georeference import box_results
from geochat.grounding import Box
from geochat.imagery import LoadedImage, load_image, read_window
from geochat.imagery.raster import TILED_MAX_PIXELS

if TYPE_CHECKING:
    from geochat.engine import GeoChat

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128
EDGE_MARGIN = 0.015  # a box within this fraction of the tile's side from an inner edge is cut there (grid step 1 %)
JOIN_IOU = 0.5       # cut pieces join when their parts in the tiles' shared area overlap this much


@dataclass(frozen=True)
class Tile:
    col: int
    row: int
    width: int
    height: int


def plan_tiles(width: int, height: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> list[Tile]:
    """Windows of at most `tile` pixels covering the raster, neighbours sharing `overlap` pixels."""
    if tile <= overlap or overlap < 0:
        raise ValueError(f"tile size ({tile}) must exceed the overlap ({overlap}) and the overlap must be >= 0")

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        step = tile - overlap
        positions = list(range(0, size - tile, step))
        return [*positions, size - tile]  # the last tile sits flush with the edge

    return [Tile(c, r, min(tile, width - c), min(tile, height - r)) for r in starts(height) for c in starts(width)]


def cut_edges(box: Box, tile: Tile, width: int, height: int) -> bool:
    """Whether `box` (raster pixels) reaches an edge of `tile` that lies inside the raster: the object may go on
    in the neighbouring tile."""
    x1, y1, x2, y2 = box_extent(box)
    margin = EDGE_MARGIN * max(tile.width, tile.height)
    return ((tile.col > 0 and x1 <= tile.col + margin)
            or (tile.col + tile.width < width and x2 >= tile.col + tile.width - margin)
            or (tile.row > 0 and y1 <= tile.row + margin)
            or (tile.row + tile.height < height and y2 >= tile.row + tile.height - margin))


def join_cut_boxes(pieces: Sequence[tuple[str | None, Box, Tile, bool]]) -> list[tuple[str | None, Box]]:
    """(phrase, raster box, its tile, cut at an inner tile edge) → boxes with the pieces of one object joined.

    Two pieces of one object seen from two tiles agree where the tiles overlap, however far the object runs
    out of that strip on either side. So two boxes of one phrase from different tiles, at least one of them
    cut, whose parts inside the tiles' shared area have an IoU of JOIN_IOU or more are one object. Pieces linked
    that way (an object over the corner of four tiles: four pieces) become the rectangle around them all: the
    axis-aligned one when none is turned, else the smallest turned rectangle around their corners.
    """
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    extents = [box_extent(box) for _, box, _, _ in pieces]
    grid = BoxGrid(extents)
    for i, extent in enumerate(extents):
        grid.add(i, extent)
    for i, (phrase, a, tile, cut) in enumerate(pieces):
        if not cut:  # a pair needs a cut piece: look from those only
            continue
        for j in grid.near(extents[i]):
            other_phrase, b, other_tile, _ = pieces[j]
            if other_phrase != phrase or other_tile == tile or not _touch(extents[i], extents[j]):
                continue
            shared = _shared(tile, other_tile)
            if shared is not None and iou_within(a, b, shared) >= JOIN_IOU:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        boxes = [pieces[i][1] for i in members]
        if len(boxes) == 1:
            box = boxes[0]
        elif any(b.theta for b in boxes):
            x1, y1, x2, y2, theta = polygon_to_rotated_box(min_area_rectangle([c for b in boxes for c in b.corners()]))
            box = Box(x1, y1, x2, y2, theta)
        else:
            box = Box(min(b.x1 for b in boxes), min(b.y1 for b in boxes), max(b.x2 for b in boxes),
                      max(b.y2 for b in boxes))
        out.append((pieces[members[0]][0], box))
    return out


def _shared(a: Tile, b: Tile) -> tuple[float, float, float, float] | None:
    """The area two tiles share (x1, y1, x2, y2), None when they only touch or lie apart."""
    x1, y1 = max(a.col, b.col), max(a.row, b.row)
    x2, y2 = min(a.col + a.width, b.col + b.width), min(a.row + a.height, b.row + b.height)
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def _touch(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def check_tiling(tile: int, overlap: int) -> None:
    """Refuse a tile size or overlap that plans no tiling, saying which value is wrong."""
    if tile < 1:
        raise GeoChatError(f"--tile ({tile}) must be a positive number of pixels, e.g. 1024")
    if overlap < 0:
        raise GeoChatError(f"--overlap ({overlap}) must be 0 or more pixels")
    if tile <= overlap:
        raise GeoChatError(f"--tile ({tile}) must be larger than --overlap ({overlap}, the default when not given): "
                           "pass a larger --tile or a smaller --overlap")


def chat_tiled(
    gc: GeoChat,
    source: str | Path,
    message: str,
    *,
    task: str = "grounding",
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    bands: Sequence[int] | str | None = None,
    sensor: str | None = None,
    overview: LoadedImage | None = None,
    progress: bool = False,
    **chat_kwargs: Any,
) -> Answer:
    """Ask `message` of every tile of a large raster; boxes come back merged in raster pixels and EPSG:4326.
    `progress` shows a bar on stderr (a tile takes as long as one answer: seconds to a minute on a CPU)."""
    check_tiling(tile, overlap)
    if overview is None:  # the caller may already hold it (the CLI draws the boxes on it)
        overview = load_image(source, bands=bands, sensor=sensor, max_pixels=TILED_MAX_PIXELS)
    info = overview.info
    found: list[tuple[str | None, Box, Tile, bool]] = []
    texts: list[str] = []
    encode = ttft = total = 0.0
    tiles = plan_tiles(info.width, info.height, tile, overlap)
    bar = tqdm(tiles, desc=f"{len(tiles)} tiles", unit="tile", disable=not progress)
    for t in bar:
        rgb = read_window(source, (t.col, t.row, t.width, t.height), bands, out_size=min(tile, DEFAULT_TILE),
                          sensor=sensor, stretch=overview.stretch)
        answer = gc.chat(rgb, message, task=task, **chat_kwargs)
        encode, ttft, total = encode + answer.timings.encode_s, ttft + answer.timings.ttft_s, total + answer.timings.total_s
        if answer.answer and answer.answer not in texts:
            texts.append(answer.answer)
        scale = t.width / rgb.shape[1]  # tile-array pixels → raster pixels
        for result in answer.boxes:
            x1, y1, x2, y2, theta = result.pixel
            box = Box(t.col + x1 * scale, t.row + y1 * scale, t.col + x2 * scale, t.row + y2 * scale, theta)
            found.append((result.phrase, box, t, cut_edges(box, t, info.width, info.height)))
        bar.set_postfix(boxes=len(found))
    located = []
    for phrase, b in merge_boxes(join_cut_boxes(found)):
        # a turned box at the raster's edge is cut there, as on one view (`pixel` stays the model's rectangle)
        polygon = clip_to_frame(b.corners(), info.width, info.height)
        if polygon:
            located.append((phrase, (b.x1, b.y1, b.x2, b.y2, b.theta), polygon))
    results, geojson = box_results(located, info)
    return Answer(
        answer=" ".join(texts),
        reasoning=None,
        task=task,
        boxes=results,
        geojson=geojson,
        facts=overview.facts,
        sources=[],
        model=gc.model_info,
        timings=Timings(encode_s=round(encode, 4), ttft_s=round(ttft, 4), total_s=round(total, 4)),
    )
