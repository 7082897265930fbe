"""Tests of geochat.imagery.geo: pixel <-> map <-> lon/lat, ground sample distance, GeoJSON output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.warp import transform as warp_transform

from geochat.errors import ImageryError
from geochat.imagery import (
    RasterInfo,
    map_to_pixel,
    pixel_to_lonlat,
    pixel_to_map,
    polygons_to_geojson,
    read_info,
)
from tests.data import make_fixtures as mf

SHARED_GEOREF = Path(__file__).resolve().parents[2] / "shared" / "data" / "georef"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return mf.make_all(tmp_path_factory.mktemp("geo"))


@pytest.fixture(scope="module")
def rect(fixtures: dict[str, Path]) -> RasterInfo:
    return read_info(fixtures["rect_600x300_utm.tif"])


def _utm_central_meridian_lat(northing: float) -> float:
    """Latitude of a point on a UTM zone's central meridian (northern hemisphere), WGS 84.

    Independent of PROJ: the footpoint latitude of the meridian arc M = northing / k0 (Snyder 1987,
    "Map Projections: A Working Manual", eqs. 3-26 and 7-19); on the central meridian it is the latitude.
    """
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    mu = northing / k0 / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi = (mu + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
           + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
           + (151 * e1**3 / 96) * math.sin(6 * mu) + (1097 * e1**4 / 512) * math.sin(8 * mu))
    return math.degrees(phi)


def test_pixel_corner_convention(rect: RasterInfo) -> None:
    x0, y0 = mf.RECT_ORIGIN
    px = mf.RECT_PIXEL
    assert pixel_to_map(rect, [(0, 0)]) == [(x0, y0)]                         # top-left corner of pixel (0,0)
    assert pixel_to_map(rect, [(0.5, 0.5)]) == [(x0 + px / 2, y0 - px / 2)]    # its centre
    assert pixel_to_map(rect, [(600, 300)]) == [(x0 + 600 * px, y0 - 300 * px)]


def test_map_to_pixel_inverts(rect: RasterInfo) -> None:
    pts = [(0.0, 0.0), (123.25, 45.5), (600.0, 300.0)]
    back = map_to_pixel(rect, pixel_to_map(rect, pts))
    assert back == [pytest.approx(p) for p in pts]


def test_rotated_transform_uses_all_six_terms() -> None:
    info = RasterInfo(None, 10, 10, 1, "uint8", "EPSG:32631", (0.0, -2.0, 100.0, 2.0, 0.0, 200.0), None,
                      (None,), ("gray",), 2.0, None)
    assert pixel_to_map(info, [(1, 0), (0, 1)]) == [(100.0, 202.0), (98.0, 200.0)]
    assert map_to_pixel(info, [(98.0, 200.0)]) == [pytest.approx((0.0, 1.0))]


def test_utm_to_lonlat_on_central_meridian(rect: RasterInfo) -> None:
    # The fixture's west edge is easting 500000, the central meridian of zone 18N (75 W).
    (lon0, lat0), (lon1, lat1) = pixel_to_lonlat(rect, [(0, 0), (0, 300)]) or []
    assert lon0 == pytest.approx(-75.0, abs=1e-9) and lon1 == pytest.approx(-75.0, abs=1e-9)
    assert lat0 == pytest.approx(_utm_central_meridian_lat(4_000_000.0), abs=1e-7)
    assert lat1 == pytest.approx(_utm_central_meridian_lat(4_000_000.0 - 300 * mf.RECT_PIXEL), abs=1e-7)


def test_utm_to_lonlat_off_meridian_matches_warp(fixtures: dict[str, Path]) -> None:
    info = read_info(fixtures["s2_13band_uint16_utm33.tif"])
    (lon, lat), = pixel_to_lonlat(info, [(10, 20)]) or []
    xs, ys = warp_transform("EPSG:32633", "EPSG:4326", [399_960.0 + 100.0], [5_000_040.0 - 200.0])
    assert (lon, lat) == pytest.approx((xs[0], ys[0]), abs=1e-9)
    assert 13.0 < lon < 14.0 and 45.0 < lat < 45.5   # zone 33N (15 E meridian), ~45 N


def test_geographic_raster_is_identity(fixtures: dict[str, Path]) -> None:
    info = read_info(fixtures["gray_float32_nan_4326.tif"])
    pts = [(0, 0), (30, 20), (15, 10)]
    lonlat = pixel_to_lonlat(info, pts) or []
    assert lonlat == pixel_to_map(info, pts)
    assert lonlat[0] == pytest.approx((12.0, 45.0)) and lonlat[1] == pytest.approx((12.03, 44.98))
    assert info.bounds_lonlat == pytest.approx((12.0, 44.98, 12.03, 45.0))


def test_custom_lcc_origin(fixtures: dict[str, Path]) -> None:
    info = read_info(fixtures["float64_lcc.tif"])
    # Pixel (12, 12) is projected (0, 0): the projection's origin lon_0=10, lat_0=50.
    assert (pixel_to_lonlat(info, [(12, 12)]) or [])[0] == pytest.approx((10.0, 50.0), abs=1e-9)


def test_gcp_only_raster_gets_an_affine_fit(tmp_path: Path) -> None:
    # Corner GCPs of a 10x10 grid with 0.01 deg pixels from (5 E, 50 N), as Sentinel-1 GRD carries them.
    gcps = [GroundControlPoint(row=r, col=c, x=5.0 + 0.01 * c, y=50.0 - 0.01 * r) for r, c in
            [(0, 0), (0, 10), (10, 0), (10, 10)]]
    path = tmp_path / "gcps.tif"
    with rasterio.open(path, "w", driver="GTiff", width=10, height=10, count=1, dtype="uint8",
                       gcps=gcps, crs="EPSG:4326") as dst:
        dst.write(np.ones((1, 10, 10), np.uint8))
    info = read_info(path)
    assert info.georeferenced and info.crs == "EPSG:4326"
    assert info.transform == pytest.approx((0.01, 0.0, 5.0, 0.0, -0.01, 50.0))
    assert (pixel_to_lonlat(info, [(5, 5)]) or [])[0] == pytest.approx((5.05, 49.95))


def test_ground_sample_distance(fixtures: dict[str, Path], rect: RasterInfo) -> None:
    assert rect.gsd_m == pytest.approx(mf.RECT_PIXEL)
    assert read_info(fixtures["s2_13band_uint16_utm33.tif"]).gsd_m == pytest.approx(10.0)
    # Web Mercator: 2 m grid units are 2 * cos(50 deg) m on the ground at the fixture's latitude.
    merc = read_info(fixtures["rgb_uint8_3857.tif"])
    assert merc.gsd_m == pytest.approx(2.0 * math.cos(math.radians(50.0)), rel=1e-3)
    # 0.001 deg at ~45 N: ~78.8 m east-west, ~111.1 m north-south.
    geo = read_info(fixtures["gray_float32_nan_4326.tif"])
    assert geo.gsd_m == pytest.approx(0.001 * (111_320 * math.cos(math.radians(44.99)) + 111_132) / 2, rel=2e-3)


def test_bounds_contain_corners(rect: RasterInfo) -> None:
    west, south, east, north = rect.bounds_lonlat or (0, 0, 0, 0)
    for lon, lat in pixel_to_lonlat(rect, [(0, 0), (600, 0), (600, 300), (0, 300)]) or []:
        assert west - 1e-9 <= lon <= east + 1e-9 and south - 1e-9 <= lat <= north + 1e-9


def _ring_area(ring: list[list[float]]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False)) / 2


def test_box_to_geojson_native_crs(rect: RasterInfo) -> None:
    box = [(100, 50), (300, 50), (300, 150), (100, 150)]      # 200 x 100 px, wider than tall
    gj = polygons_to_geojson([box], rect, [{"label": "airport", "score": 0.9}], crs="native")
    assert gj is not None and gj["type"] == "FeatureCollection"
    assert gj["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}}
    feat, = gj["features"]
    assert feat["properties"] == {"label": "airport", "score": 0.9}
    ring = feat["geometry"]["coordinates"][0]
    assert feat["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
    x0, y0 = mf.RECT_ORIGIN
    px = mf.RECT_PIXEL
    assert sorted({tuple(p) for p in ring}) == sorted({
        (x0 + 100 * px, y0 - 50 * px), (x0 + 300 * px, y0 - 50 * px),
        (x0 + 300 * px, y0 - 150 * px), (x0 + 100 * px, y0 - 150 * px)})
    assert _ring_area(ring) == pytest.approx(200 * px * 100 * px)     # counter-clockwise, right size


def test_box_to_geojson_lonlat(rect: RasterInfo) -> None:
    boxes = [[(100, 50), (300, 50), (300, 150), (100, 150)], [(0, 0), (10, 0), (10, 10)]]
    gj = polygons_to_geojson(boxes, rect, [{"i": 0}, {"i": 1}])
    assert gj is not None and "crs" not in gj and len(gj["features"]) == 2
    json.dumps(gj, allow_nan=False)
    for feat in gj["features"]:
        ring = feat["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and _ring_area(ring) > 0
        for lon, lat in ring:                                   # lon first
            assert -75.1 < lon < -74.9 and 36.0 < lat < 36.2
    first = gj["features"][0]["geometry"]["coordinates"][0]
    corners = pixel_to_lonlat(rect, [(100, 50), (300, 50), (300, 150), (100, 150)]) or []
    assert set(corners) <= {tuple(p) for p in first}  # with points along each edge, reprojected too
    assert len(first) == 4 * 16 + 1


def test_geojson_properties_must_match() -> None:
    info = RasterInfo(None, 4, 4, 1, "uint8", "EPSG:4326", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), None,
                      (None,), ("gray",), None, None)
    with pytest.raises(ValueError, match="2 polygons but 1 property dicts"):
        polygons_to_geojson([[(0, 0), (1, 0), (1, 1)]] * 2, info, [{}])


def test_not_georeferenced_gives_none(fixtures: dict[str, Path]) -> None:
    info = read_info(fixtures["nongeo.png"])
    box = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert pixel_to_lonlat(info, box) is None
    assert polygons_to_geojson([box], info, [{}]) is None
    with pytest.raises(ImageryError, match="no geotransform"):
        pixel_to_map(info, box)


@pytest.mark.skipif(not SHARED_GEOREF.is_dir(), reason=f"real data not present at {SHARED_GEOREF}")
def test_real_float_nan_has_transform_but_no_crs() -> None:
    info = read_info(SHARED_GEOREF / "float_nan.tif")
    assert not info.georeferenced and pixel_to_lonlat(info, [(0, 0)]) is None
    assert polygons_to_geojson([[(0, 0), (1, 0), (1, 1)]], info, [{}]) is None


@pytest.mark.skipif(not SHARED_GEOREF.is_dir(), reason=f"real data not present at {SHARED_GEOREF}")
def test_real_buildings_footprints_line_up() -> None:
    """The SpaceNet sample's building footprints (GeoJSON in EPSG:32616) map inside the raster's pixels."""
    info = read_info(SHARED_GEOREF / "buildings_uint16_utm16.tif")
    gj = json.loads((SHARED_GEOREF / "buildings_uint16_utm16.geojson").read_text())
    assert gj["crs"]["properties"]["name"].endswith("32616") and info.crs == "EPSG:32616"
    pts = [(p[0], p[1]) for f in gj["features"] for ring in f["geometry"]["coordinates"] for p in ring]
    cols, rows = zip(*map_to_pixel(info, pts), strict=True)
    assert min(cols) > -1e-6 and max(cols) < info.width + 1e-6
    assert min(rows) > -1e-6 and max(rows) < info.height + 1e-6
    # A footprint polygon round-trips through pixels back to the same map coordinates.
    ring = [(p[0], p[1]) for p in gj["features"][0]["geometry"]["coordinates"][0]]
    back = polygons_to_geojson([map_to_pixel(info, ring)], info, [{}], crs="native") or {}
    out = back["features"][0]["geometry"]["coordinates"][0]
    assert len(out) == len(ring)
    for got, want in zip(sorted(map(tuple, out)), sorted(ring), strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_a_box_across_the_antimeridian_is_split_into_two_counter_clockwise_parts(tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    from geochat.imagery import read_info
    from geochat.imagery.geo import _signed_area, polygons_to_geojson

    path = tmp_path / "utm60.tif"  # UTM zone 60N, 100 km wide, straddling 180°
    with rasterio.open(path, "w", driver="GTiff", width=100, height=100, count=1, dtype="uint8", crs="EPSG:32660",
                       transform=from_origin(700000, 5000000, 1000, 1000)) as ds:
        ds.write(np.ones((1, 100, 100), np.uint8))
    info = read_info(path)
    whole = polygons_to_geojson([[(0, 0), (100, 0), (100, 100), (0, 100)]], info, [{}])
    geometry = whole["features"][0]["geometry"]
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    for (ring,) in geometry["coordinates"]:
        assert all(-180 <= x <= 180 for x, _ in ring) and ring[0] == ring[-1]
        assert _signed_area([tuple(p) for p in ring]) > 0  # RFC 7946: exterior rings counter-clockwise
    east = polygons_to_geojson([[(0, 0), (20, 0), (20, 20), (0, 20)]], info, [{}])  # west of 180°: one polygon
    assert east["features"][0]["geometry"]["type"] == "Polygon"


def test_lonlat_bounds_keep_longitudes_in_range_and_refuse_past_a_pole() -> None:
    from geochat.imagery.geo import lonlat_bounds

    def bounds(x0: float, y0: float, size: float, w: int, h: int) -> tuple[float, ...] | None:
        return lonlat_bounds("EPSG:4326", (size, 0.0, x0, 0.0, -size, y0), w, h)

    # across the antimeridian, written past 180: west > east, as a UTM zone 60 footprint gets
    assert bounds(179.96, 10.0, 0.0002, 900, 900) == pytest.approx((179.96, 9.82, -179.86, 10.0))
    assert bounds(-180.1, 10.0, 0.0002, 900, 900) == pytest.approx((179.9, 9.82, -179.92, 10.0))
    assert bounds(200.0, 10.0, 1.0, 10, 10) == pytest.approx((-160.0, 0.0, -150.0, 10.0))  # a 0-360° grid
    assert bounds(0.0, 90.0, 1.0, 360, 180) == (-180.0, -90.0, 180.0, 90.0)  # the whole globe, 0-360°
    assert bounds(-180.0, 90.0, 1.0, 360, 180) == (-180.0, -90.0, 180.0, 90.0)
    assert bounds(10.0, 95.0, 0.1, 500, 500) is None  # a footprint past the pole: wrong georeferencing
    assert bounds(-180.0, 90.25, 0.5, 720, 361) == (-180.0, -90.0, 180.0, 90.0)  # edge pixels just past it


def test_box_rings_of_a_0_360_grid_read_in_minus_180_180() -> None:
    from geochat.georeference import box_results
    from geochat.imagery.geo import lonlat_bounds

    transform = (1.0, 0.0, 200.0, 0.0, -1.0, 10.0)  # a grid in 0-360° longitudes
    info = RasterInfo(None, 10, 10, 1, "uint8", "EPSG:4326", transform, None, (None,), ("gray",), None,
                      lonlat_bounds("EPSG:4326", transform, 10, 10))
    (box,), geojson = box_results([("a field", (1, 1, 3, 3, 0.0), [(1, 1), (3, 1), (3, 3), (1, 3)])], info)
    ring = [(round(x, 9), round(y, 9)) for x, y in box.polygon_lonlat or []]
    assert ring == [(-159, 9), (-157, 9), (-157, 7), (-159, 7), (-159, 9)]
    geometry = geojson["features"][0]["geometry"]["coordinates"][0]
    assert set(ring) <= {(round(x, 9), round(y, 9)) for x, y in geometry}  # one place both ways


@pytest.mark.parametrize("west, box, want", [
    (-180.0, (10, 10, 90, 90), [(-144.0, 144.0)]),               # 80 % of a world map: one polygon, this side round
    (-180.0, (0, 0, 100, 100), [(-180.0, 180.0)]),               # the whole map
    (0.0, (10, 10, 90, 90), [(36.0, 180.0), (-180.0, -36.0)]),   # a 0-360° grid: split at 180°
    (0.0, (50, 10, 100, 90), [(-180.0, 0.0)]),                   # ... or moved whole
])
def test_boxes_wider_than_half_the_globe_cover_their_own_pixels(west: float, box: tuple[int, ...],
                                                               want: list[tuple[float, float]]) -> None:
    from geochat.imagery.geo import lonlat_bounds

    transform = (3.6, 0.0, west, 0.0, -1.8, 90.0)  # 100 × 100 pixels over the whole globe
    info = RasterInfo(None, 100, 100, 1, "uint8", "EPSG:4326", transform, None, (None,), ("gray",), None,
                      lonlat_bounds("EPSG:4326", transform, 100, 100))
    x1, y1, x2, y2 = box
    gj = polygons_to_geojson([[(x1, y1), (x2, y1), (x2, y2), (x1, y2)]], info, [{}]) or {}
    geometry = gj["features"][0]["geometry"]
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    spans = [(min(x for x, _ in p[0]), max(x for x, _ in p[0])) for p in polygons]
    assert spans == [pytest.approx(w) for w in want]
    for (ring,) in polygons:
        assert _ring_area(ring) > 0 and ring[0] == ring[-1]


def test_a_box_over_a_pole_reaches_it(tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "arctic.tif"  # NSIDC polar stereographic north, 1,000 km square round the pole
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=1, dtype="uint8", crs="EPSG:3413",
                       transform=from_origin(-500000, 500000, 5000, 5000)) as ds:
        ds.write(np.ones((1, 200, 200), np.uint8))
    gj = polygons_to_geojson([[(80, 80), (120, 80), (120, 120), (80, 120)]], read_info(path), [{}]) or {}
    geometry = gj["features"][0]["geometry"]
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    points = [p for (ring,) in polygons for p in ring]
    assert max(y for _, y in points) == 90.0 and min(y for _, y in points) > 88.6  # the corners, 141 km out
    assert all(-180 <= x <= 180 for x, _ in points)
    assert sum(_ring_area(ring) for (ring,) in polygons) > 300  # lon × lat degrees: the whole cap, not a sliver


def test_every_ring_closes_exactly_on_fractional_boxes() -> None:
    from geochat.imagery.geo import lonlat_bounds

    rng = np.random.RandomState(0)
    for transform in ((0.1, 0.0, 10.0, 0.0, -0.1, 50.0), (1.0, 0.0, -180.0, 0.0, -1.0, 90.0)):
        info = RasterInfo(None, 360, 180, 1, "uint8", "EPSG:4326", transform, None, (None,), ("gray",), None,
                          lonlat_bounds("EPSG:4326", transform, 360, 180))
        boxes = []
        for x1, y1, w, h in rng.rand(200, 4) * (300, 150, 60, 30):
            boxes.append([(x1, y1), (x1 + w, y1), (x1 + w, y1 + h), (x1, y1 + h)])
        gj = polygons_to_geojson(boxes, info, [{}] * len(boxes)) or {}
        for feature in gj["features"]:
            geometry = feature["geometry"]
            for (ring,) in geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]:
                assert ring[0] == ring[-1]  # RFC 7946: the same position, not one a rounding away
