"""SpaceNet building footprints over a panchromatic WorldView scene.

- Source: SpaceNet (Van Etten, Lindenbaum, Bacastow, "SpaceNet: A Remote Sensing Dataset and
  Challenge Series", arXiv:1807.01232, 2018); CC BY-SA 4.0.
- Sensor: WorldView-2/3 panchromatic; the sample in `../shared/data/georef` is 900×900 px at 0.5 m,
  EPSG:32616 (UTM 16N, Atlanta), uint16, nodata 0.
- Bands: 1 (panchromatic), shown as grey RGB after a percentile stretch.
- Classes: one, `building` (footprint polygons in a GeoJSON in the raster's CRS).
- Splits: none in the sample; the full release splits by area of interest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from geochat.box_geometry import min_area_rectangle, polygon_to_rotated_box
from geochat.errors import GeoChatError
from geochat.imagery import map_to_pixel, read_info

Point = tuple[float, float]


@dataclass(frozen=True)
class Footprint:
    polygon: tuple[Point, ...]  # pixels of the raster, open ring

    @property
    def rotated_box(self) -> tuple[float, float, float, float, float]:
        """(x1, y1, x2, y2, θ): the minimum-area rectangle around the footprint, in pixels."""
        return polygon_to_rotated_box(min_area_rectangle(self.polygon))


def load_footprints(raster: Path, geojson: Path) -> list[Footprint]:
    """Building polygons of `geojson` (in the raster's CRS) as pixel polygons of `raster`."""
    info = read_info(raster)
    data = json.loads(geojson.read_text(encoding="utf-8"))
    out = []
    for feature in data.get("features", []):
        geom = feature.get("geometry") or {}
        rings = []
        if geom.get("type") == "Polygon":
            rings = [geom["coordinates"][0]]
        elif geom.get("type") == "MultiPolygon":
            rings = [poly[0] for poly in geom["coordinates"]]
        for ring in rings:
            pixels = map_to_pixel(info, [(float(x), float(y)) for x, y, *_ in ring])
            if len(pixels) > 1 and pixels[0] == pixels[-1]:
                pixels = pixels[:-1]
            if len(set(pixels)) >= 3:
                out.append(Footprint(tuple(pixels)))
    if not out:
        raise GeoChatError(f"{geojson} holds no building polygons")
    return out
