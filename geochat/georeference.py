"""Boxes between the three frames an answer lives in: the model's 0–100 grid over its square, centre-padded
input; the raster's own pixels; and the map (EPSG:4326 GeoJSON). The engine sends a user's region one way
(`region_to_grid`) and the model's boxes the other (`georeference`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from geochat.answer import BoxResult
from geochat.box_geometry import clip_to_frame, merge_boxes
from geochat.errors import GeoChatError
from geochat.grounding import Box, Point, box_to_pixel_polygon, grid_to_pixel, pixel_box_to_grid
from geochat.imagery import LoadedImage, RasterInfo, pixel_to_lonlat, polygons_to_geojson


def region_to_grid(region: Sequence[float], loaded: LoadedImage | None) -> Box:
    """A region the user gave in raster pixels (x1, y1, x2, y2[, θ]) as a box on the model's grid, checked."""
    if loaded is None:
        raise GeoChatError("a region needs an image")
    if len(region) not in (4, 5):
        raise GeoChatError("a region is x1,y1,x2,y2 or x1,y1,x2,y2,theta in pixels")
    if not all(math.isfinite(float(v)) for v in region):
        raise GeoChatError(f"region {list(region)} holds a value that is not a finite number")
    x1, y1, x2, y2 = region[:4]
    w, h = loaded.info.width, loaded.info.height
    if not (0 <= min(x1, x2) and max(x1, x2) <= w and 0 <= min(y1, y2) and max(y1, y2) <= h):
        raise GeoChatError(f"region {list(region)} lies outside the image ({w}×{h} pixels)")
    theta = region[4] if len(region) == 5 else 0.0
    return pixel_box_to_grid(x1, y1, x2, y2, w, h, theta)


def georeference(boxes: Sequence[Box], loaded: LoadedImage | None) -> tuple[list[BoxResult], dict[str, Any] | None]:
    """The model's boxes (grid units) as raster pixels and, where the raster is georeferenced, EPSG:4326
    polygons and a GeoJSON FeatureCollection (empty without boxes: null says only that the image has no map
    coordinates); one box per object and phrase, boxes off the image dropped."""
    if loaded is None:
        return [], None
    info = loaded.info
    w, h = info.width, info.height
    # one box per object and phrase: a box over much the same ground as a larger one (IoU >= 0.5), such as
    # the same box said twice or walked a step at a time, is dropped, as detectors' NMS does
    distinct = {id(b) for _, b in merge_boxes([(b.phrase, b) for b in boxes])}
    located = []
    for box in (b for b in boxes if id(b) in distinct):
        # the model sees a square with the image centred in it: a box in the padding is off the image (and
        # a latitude past 90°), one that runs into it is cut at the image's edge
        # (`pixel` of a turned box stays the model's rectangle; its polygon and GeoJSON are cut)
        polygon = clip_to_frame(box_to_pixel_polygon(box, w, h), w, h)
        if not polygon:  # off the image, or all but a sliver of it
            continue
        (x1, y1), (x2, y2) = grid_to_pixel([(box.x1, box.y1), (box.x2, box.y2)], w, h)
        if box.theta == 0:
            x1, x2 = sorted(min(max(v, 0.0), float(w)) for v in (x1, x2))
            y1, y2 = sorted(min(max(v, 0.0), float(h)) for v in (y1, y2))
        located.append((box.phrase, (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2), box.theta), polygon))
    return box_results(located, info)


def box_results(boxes: Sequence[tuple[str | None, tuple[float, float, float, float, float], list[Point]]],
                info: RasterInfo) -> tuple[list[BoxResult], dict[str, Any] | None]:
    """(phrase, pixel box, its pixel polygon) → `BoxResult`s with EPSG:4326 rings where the raster is
    georeferenced, and their GeoJSON FeatureCollection (None where the raster is not georeferenced)."""
    results = []
    for phrase, pixel, polygon in boxes:
        lonlat = pixel_to_lonlat(info, polygon)
        results.append(BoxResult(phrase, pixel, [*lonlat, lonlat[0]] if lonlat else None))
    properties = [{"phrase": r.phrase, "pixel": list(r.pixel)} for r in results]
    return results, polygons_to_geojson([polygon for *_, polygon in boxes], info, properties)
