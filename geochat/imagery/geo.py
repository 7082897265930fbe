"""Pixel <-> map coordinates, lon/lat, ground sample distance, and GeoJSON output.

Pixel coordinates here are (col, row) in the ORIGINAL raster's pixel grid with the corner convention
of GDAL and rasterio: (0, 0) is the top-left corner of the top-left pixel, (0.5, 0.5) its centre and
(width, height) the bottom-right corner of the raster. The affine geotransform (a, b, c, d, e, f) maps
them to the raster's CRS:

    x = a * col + b * row + c
    y = d * col + e * row + f

(b and d are non-zero for rotated grids, e.g. SAR slant geometry; e < 0 for north-up images.)
Reprojection to lon/lat goes through `rasterio.warp.transform` (PROJ), which returns longitude first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from affine import Affine
from rasterio._err import CPLE_BaseError  # GDAL/PROJ errors rasterio does not wrap (local CRSs, off-domain points)
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from geochat.errors import ImageryError

if TYPE_CHECKING:
    from geochat.imagery.raster import RasterInfo

Transform6 = tuple[float, float, float, float, float, float]
Point = tuple[float, float]

# CRSs whose nominal pixel size is true only at the equator (scale factor 1 / cos(latitude)).
_MERCATOR_EPSG = (3857, 3395, 900913)


def crs_to_string(crs: CRS | None) -> str | None:
    """"EPSG:nnnn" when the CRS has an EPSG code, else its WKT; None for no CRS."""
    if crs is None or not crs.to_wkt():
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _affine(transform: Transform6) -> Affine:
    return Affine(*transform)


def _corners(transform: Transform6, width: int, height: int) -> list[Point]:
    aff = _affine(transform)
    return [aff @ (0, 0), aff @ (width, 0), aff @ (width, height), aff @ (0, height)]


def lonlat_bounds(crs: str | None, transform: Transform6 | None, width: int, height: int) -> tuple[float, float, float, float] | None:
    """(west, south, east, north) in EPSG:4326 of the raster footprint; None without a CRS, or with one that
    has no conversion to lon/lat (a local engineering grid, another planet, points off the projection, a
    footprint past a pole).

    Longitudes are in [-180, 180]: a grid in 0–360° longitudes is moved a turn west, and a footprint across the
    antimeridian has west > east (RFC 7946), as a projected one (UTM zone 60) gets from the transform."""
    if crs is None or transform is None:
        return None
    xs, ys = zip(*_corners(transform, width, height), strict=True)
    try:
        w, s, e, n = transform_bounds(CRS.from_user_input(crs), "EPSG:4326", min(xs), min(ys), max(xs), max(ys),
                                      densify_pts=21)
    except (CRSError, ValueError, CPLE_BaseError):
        return None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        return None
    if s < -90 - POLE_SLACK_DEG or n > 90 + POLE_SLACK_DEG:
        return None
    if e - w >= 360:
        w, e = -180.0, 180.0
    return (_wrap_lon(w), max(float(s), -90.0), _wrap_lon(e), min(float(n), 90.0))


POLE_SLACK_DEG = 1.0  # a global grid's edge pixels may reach a little past a pole; further, the georeferencing is wrong


def _wrap_lon(lon: float) -> float:
    """A longitude in [-180, 180] (those already there are kept, 180 included)."""
    return float(lon) if -180 <= lon <= 180 else float((lon + 180) % 360 - 180)


def _metres_per_degree(lat_deg: float) -> tuple[float, float]:
    """(metres per degree of longitude, of latitude) on the WGS 84 ellipsoid at `lat_deg`.

    Series expansion of the ellipsoid's radii of curvature (accurate to ~1 cm).
    """
    phi = math.radians(lat_deg)
    m_lat = 111132.954 - 559.822 * math.cos(2 * phi) + 1.175 * math.cos(4 * phi)
    m_lon = 111412.84 * math.cos(phi) - 93.5 * math.cos(3 * phi) + 0.118 * math.cos(5 * phi)
    return m_lon, m_lat


def ground_sample_distance(crs: str | None, transform: Transform6 | None, width: int, height: int) -> float | None:
    """Mean pixel size in metres, or None without a CRS.

    Projected CRSs: the pixel size in the CRS's linear unit times the unit's size in metres (the
    nominal GSD that products advertise), corrected by cos(latitude) for Mercator grids such as
    EPSG:3857 whose units are true only at the equator. Geographic CRSs: degrees converted to metres
    at the raster's centre latitude.
    """
    if crs is None or transform is None:
        return None
    a, b, _, d, e, _ = transform
    px = math.hypot(a, d)    # length of one column step
    py = math.hypot(b, e)    # length of one row step
    crs_obj = CRS.from_user_input(crs)

    def centre_latitude() -> float:
        return pixel_to_lonlat_raw(crs, transform, [(width / 2, height / 2)])[0][1]

    try:
        if crs_obj.is_geographic:
            m_lon, m_lat = _metres_per_degree(centre_latitude())
            return (px * m_lon + py * m_lat) / 2
        try:
            _, factor = crs_obj.linear_units_factor
        except CRSError:
            factor = 1.0
        gsd = (px + py) / 2 * factor
        if crs_obj.to_epsg() in _MERCATOR_EPSG:
            gsd *= math.cos(math.radians(centre_latitude()))
        return gsd
    except ImageryError:  # a geographic or Mercator grid whose centre has no lon/lat (off the projection)
        return None


def _require_transform(info: RasterInfo) -> Transform6:
    if info.transform is None:
        raise ImageryError("the raster has no geotransform, so pixels have no map coordinates")
    return info.transform


def pixel_to_map(info: RasterInfo, points: Sequence[Point]) -> list[Point]:
    """(col, row) in original raster pixels -> (x, y) in the raster's CRS via the affine transform."""
    aff = _affine(_require_transform(info))
    out: list[Point] = []
    for c, r in points:
        x, y = aff @ (float(c), float(r))
        out.append((float(x), float(y)))
    return out


def map_to_pixel(info: RasterInfo, points: Sequence[Point]) -> list[Point]:
    """(x, y) in the raster's CRS -> (col, row) in original raster pixels (inverse affine)."""
    inv = ~_affine(_require_transform(info))
    out: list[Point] = []
    for x, y in points:
        c, r = inv @ (float(x), float(y))
        out.append((float(c), float(r)))
    return out


def pixel_to_lonlat_raw(crs: str, transform: Transform6, points: Sequence[Point]) -> list[Point]:
    """(col, row) -> (lon, lat) for a CRS string and affine transform."""
    aff = _affine(transform)
    xy = [aff @ (float(c), float(r)) for c, r in points]
    return _reproject(crs, "EPSG:4326", xy)


def _reproject(src: str, dst: str, xy: Sequence[Point]) -> list[Point]:
    if not xy:
        return []
    if src == dst:
        return [(float(x), float(y)) for x, y in xy]
    xs, ys = zip(*xy, strict=True)
    try:
        out_x, out_y = warp_transform(CRS.from_user_input(src), CRS.from_user_input(dst), list(xs), list(ys))
    except (CRSError, ValueError, CPLE_BaseError) as exc:
        raise ImageryError(f"cannot reproject from {src[:60]} to {dst[:60]}: {exc}") from exc
    return [(float(x), float(y)) for x, y in zip(out_x, out_y, strict=True)]


def pixel_to_lonlat(info: RasterInfo, points: Sequence[Point]) -> list[Point] | None:
    """(col, row) in original raster pixels -> (lon, lat) in EPSG:4326, longitudes in [-180, 180] as in
    `lonlat_bounds` (a grid in 0–360° longitudes reads a turn west); None when not georeferenced."""
    if info.crs is None or info.transform is None or info.bounds_lonlat is None:
        return None  # no CRS, or one without a conversion to lon/lat: boxes stay in pixels
    return [(_wrap_lon(x), y) for x, y in pixel_to_lonlat_raw(info.crs, info.transform, points)]


def _close_ring(ring: list[Point]) -> list[Point]:
    if ring and ring[0] != ring[-1]:
        ring = [*ring, ring[0]]
    return ring


def _signed_area(ring: Sequence[Point]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False)) / 2


def _unwrap(ring: Sequence[Point]) -> list[Point]:
    """Longitudes made continuous along the ring (no step over 180°), so 179.9 → -179.9 reads 179.9 → 180.1."""
    out = [ring[0]]
    for x, y in ring[1:]:
        prev = out[-1][0]
        out.append((x + 360.0 * round((prev - x) / 360.0), y))
    return out


def _clip(ring: Sequence[Point], meridian: float, keep_west: bool) -> list[Point]:
    """Sutherland–Hodgman: the part of a closed ring west (or east) of `meridian`."""
    def inside(p: Point) -> bool:
        return p[0] <= meridian if keep_west else p[0] >= meridian

    out: list[Point] = []
    for a, b in zip(ring, ring[1:], strict=False):
        if inside(a) != inside(b):  # the edge crosses the meridian: keep the crossing point
            out.append((meridian, a[1] + (b[1] - a[1]) * (meridian - a[0]) / (b[0] - a[0])))
        if inside(b):
            out.append(b)
    return _close_ring(out)


EDGE_PIECES = 16  # points a box edge becomes in lon/lat: 22.5° apart at most on a global grid


def _densify(ring: Sequence[Point], pieces: int = EDGE_PIECES) -> list[Point]:
    """A closed pixel ring with each edge cut into `pieces`: reprojected, its points stay close enough to each
    other for `_unwrap` to follow a box wider than 180° of longitude, and its edges follow a curved projection."""
    out = [ring[0]]
    for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False):
        out += [(x0 + (x1 - x0) * i / pieces, y0 + (y1 - y0) * i / pieces) for i in range(1, pieces)]
        out.append((x1, y1))  # the corner itself: x0 + (x1 - x0) · 1 may miss it by a rounding, and unclose the ring
    return out


def _lonlat_geometry(ring: list[Point]) -> dict[str, Any]:
    """A lon/lat ring as an RFC 7946 geometry: wound counter-clockwise, split at the antimeridian into a
    MultiPolygon (§3.1.9) when it crosses it, and run up to the pole it goes round (a box over a pole on a
    polar stereographic grid)."""
    ring = _unwrap(ring)
    if abs(ring[-1][0] - ring[0][0]) > 180:  # back at its first point a turn away: it went round a pole
        pole = 90.0 if sum(y for _, y in ring) > 0 else -90.0
        ring = [*ring, (ring[-1][0], pole), (ring[0][0], pole), ring[0]]
    if _signed_area(ring) < 0:
        ring = ring[::-1]
    xs = [x for x, _ in ring]
    shift = -360.0 if max(xs) > 180.0 else 360.0 if min(xs) < -180.0 else 0.0
    if min(xs) >= 180.0 or max(xs) <= -180.0:  # wholly a turn off (a 0–360° grid): moved, not split
        ring, shift = [(x + shift, y) for x, y in ring], 0.0
    if not shift:
        return {"type": "Polygon", "coordinates": [[[x, y] for x, y in ring]]}
    meridian = 180.0 if shift < 0 else -180.0
    inner, outer = _clip(ring, meridian, keep_west=shift < 0), _clip(ring, meridian, keep_west=shift > 0)
    parts = [[[x, y] for x, y in inner], [[x + shift, y] for x, y in outer]]
    return {"type": "MultiPolygon", "coordinates": [[part] for part in parts if len(part) >= 4]}


def polygons_to_geojson(polygons: Sequence[Sequence[Point]], info: RasterInfo, properties: Sequence[dict[str, Any]],
                        crs: str = "EPSG:4326") -> dict[str, Any] | None:
    """A GeoJSON FeatureCollection with one Polygon Feature per polygon; None when not georeferenced.

    `polygons` are rings of (col, row) in original raster pixels (a box is its four corners).
    Coordinates are lon/lat (EPSG:4326, RFC 7946) by default; `crs="native"` or any CRS string writes
    them in that CRS and adds a "crs" member naming it (the pre-RFC 7946 convention that GDAL/QGIS
    read). Rings are closed and wound counter-clockwise (RFC 7946's right-hand rule).
    """
    if len(polygons) != len(properties):
        raise ValueError(f"{len(polygons)} polygons but {len(properties)} property dicts")
    if info.crs is None or info.transform is None:
        return None
    if crs == "EPSG:4326" and info.bounds_lonlat is None:
        return None  # a CRS without a conversion to lon/lat (a local grid): boxes stay in pixels
    target = info.crs if crs.lower() == "native" else crs
    if target != "EPSG:4326":
        target = crs_to_string(CRS.from_user_input(target)) or target
    features: list[dict[str, Any]] = []
    for poly, props in zip(polygons, properties, strict=True):
        if len(poly) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(poly)}")
        # Close the ring in pixel space so that first and last points reproject identically.
        ring_px = _close_ring([(float(c), float(r)) for c, r in poly])
        if target == "EPSG:4326" or target != info.crs:  # in a projected raster's own CRS a box edge is straight:
            ring_px = _densify(ring_px)                      # its corners say it all
        ring = _reproject(info.crs, target, pixel_to_map(info, ring_px))
        if target == "EPSG:4326":
            geometry = _lonlat_geometry(ring)
        else:
            ring = ring[::-1] if _signed_area(ring) < 0 else ring
            geometry = {"type": "Polygon", "coordinates": [[[x, y] for x, y in ring]]}
        features.append({"type": "Feature", "geometry": geometry, "properties": dict(props)})
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if target != "EPSG:4326":
        epsg = CRS.from_user_input(target).to_epsg()
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else target
        collection["crs"] = {"type": "name", "properties": {"name": name}}
    return collection
