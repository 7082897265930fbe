"""Large scenes: chat tile by tile, then merge the boxes in raster (and so map) coordinates.

A 20,000 × 20,000 scene shrunk to the model's 224 px input loses every car and most buildings.
`chat_tiled` cuts the raster into overlapping windows (read one at a time with `read_window`, never
the whole raster), asks the same question of each tile, maps each tile's boxes back to raster pixels
(a uniform scale plus an offset, so rotations survive), and merges boxes that overlapping tiles both
found with greedy non-maximum suppression on rotated IoU, per phrase. The overview's stretch is
reused for every tile so that all tiles look alike to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geochat.answer import Answer, BoxResult, Timings
from geochat.errors import GeoChatError
from geochat.grounding import Box, merge_boxes
from geochat.imagery import LoadedImage, load_image, pixel_to_lonlat, polygons_to_geojson, read_window

if TYPE_CHECKING:
    from geochat.engine import GeoChat

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128


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
    **chat_kwargs: Any,
) -> Answer:
    """Ask `message` of every tile of a large raster; boxes come back merged in raster pixels and EPSG:4326."""
    if tile <= overlap or overlap < 0:
        raise GeoChatError(f"--tile ({tile}) must be larger than --overlap ({overlap}), and --overlap at least 0")
    if overview is None:  # the caller may already hold it (the CLI draws the boxes on it)
        overview = load_image(source, bands=bands, sensor=sensor)
    info = overview.info
    found: list[tuple[str | None, Box]] = []
    texts: list[str] = []
    encode = ttft = total = 0.0
    for t in plan_tiles(info.width, info.height, tile, overlap):
        rgb = read_window(source, (t.col, t.row, t.width, t.height), bands, out_size=min(tile, DEFAULT_TILE),
                          sensor=sensor, stretch=overview.stretch)
        answer = gc.chat(rgb, message, task=task, **chat_kwargs)
        encode, ttft, total = encode + answer.timings.encode_s, ttft + answer.timings.ttft_s, total + answer.timings.total_s
        if answer.answer and answer.answer not in texts:
            texts.append(answer.answer)
        scale = t.width / rgb.shape[1]  # tile-array pixels → raster pixels
        for result in answer.boxes:
            x1, y1, x2, y2, theta = result.pixel
            found.append((result.phrase, Box(t.col + x1 * scale, t.row + y1 * scale, t.col + x2 * scale,
                                        t.row + y2 * scale, theta)))
    merged = merge_boxes(found)
    polygons = [b.corners() for _, b in merged]
    results = []
    for (phrase, b), polygon in zip(merged, polygons, strict=True):
        lonlat = pixel_to_lonlat(info, polygon)
        results.append(BoxResult(phrase, (b.x1, b.y1, b.x2, b.y2, b.theta), [*lonlat, lonlat[0]] if lonlat else None))
    properties = [{"phrase": p, "pixel": [b.x1, b.y1, b.x2, b.y2, b.theta]} for p, b in merged]
    return Answer(
        answer=" ".join(texts),
        reasoning=None,
        task=task,
        boxes=results,
        geojson=polygons_to_geojson(polygons, info, properties) if polygons else None,
        facts=overview.facts,
        sources=[],
        model=gc.model_info,
        timings=Timings(encode_s=round(encode, 4), ttft_s=round(ttft, 4), total_s=round(total, 4)),
    )
