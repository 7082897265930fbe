"""Seeded generator for the imagery test fixtures (torchgeo `tests/data/*/data.py` style).

Every fixture is written by this code with rasterio and a seeded numpy generator, so the bytes are
reproducible and their contents are documented here rather than hidden in binaries:

- `s2_13band_uint16_utm33.tif`: Sentinel-2 L1C-like stack, 64x64, 13 bands described B1..B12 with
  B8A (file order B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B10 B11 B12), uint16 reflectance x 10000,
  EPSG:32633 at 10 m. Columns 0-31 are vegetation (red 0.04, NIR 0.40), columns 32-63 water
  (green 0.06, NIR 0.01); an 8x8 block in the top-left corner is nodata 0 in every band.
- `landsat8_int16_utm18.tif`: Landsat 8 OLI surface-reflectance-like stack of the 7 SR bands
  (B1..B7) without descriptions, int16, nodata -9999 on the last row, EPSG:32618 at 30 m.
- `rgb_uint8_3857.tif`: 3-band uint8 RGB with colour interpretation, EPSG:3857 at 2 m; band 1 is a
  horizontal gradient 0..255, band 2 a vertical one, band 3 constant 77.
- `gray_float32_nan_4326.tif`: 1-band float32, NaN nodata in the first column, EPSG:4326, 0.001 deg.
- `float64_lcc.tif`: 2-band float64 in a custom Lambert conformal conic CRS (no EPSG code).
- `nongeo.png`: 48x32 RGB PNG with no georeferencing.
- `rect_600x300_utm.tif`: 600 wide x 300 high uint8 RGB, EPSG:32618, origin (500000, 4000000),
  5 m pixels, for box re-projection checks.
- `corrupt.tif`: the first 400 bytes of a valid GeoTIFF: the header itself is cut off.
- `truncated.tif`: the first half of `rect_600x300_utm.tif`: the header opens, the pixels are missing.
- `text_as.tif`: a text file with a .tif name.
- `sparse_20000.tif`: 20000x20000 uint8, 512x512 tiles, DEFLATE, SPARSE_OK, nodata 0; only four
  blocks hold data (value 200; see SPARSE_BLOCKS), so the file is a few
  kilobytes on disk while a naive full read would need 400 MB.

Run `python tests/data/make_fixtures.py OUT_DIR` to write them.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

SEED = 0

S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
# Reflectance (0-1) per band for the two halves of the Sentinel-2 fixture.
S2_VEGETATION = {
    "B1": 0.03, "B2": 0.03, "B3": 0.08, "B4": 0.04, "B5": 0.10, "B6": 0.30, "B7": 0.38,
    "B8": 0.40, "B8A": 0.41, "B9": 0.12, "B10": 0.005, "B11": 0.20, "B12": 0.10,
}
S2_WATER = {
    "B1": 0.07, "B2": 0.07, "B3": 0.06, "B4": 0.03, "B5": 0.02, "B6": 0.015, "B7": 0.012,
    "B8": 0.01, "B8A": 0.01, "B9": 0.004, "B10": 0.001, "B11": 0.005, "B12": 0.003,
}
S2_SIZE = 64
S2_NODATA_CORNER = 8

SPARSE_SIZE = 20_000
SPARSE_BLOCK = 512
# (col_off, row_off) of the blocks that hold data in the sparse raster.
SPARSE_BLOCKS = ((0, 0), (10_240, 10_240), (19_456, 0), (5_120, 15_360))
SPARSE_VALUE = 200

RECT_ORIGIN = (500_000.0, 4_000_000.0)
RECT_PIXEL = 5.0

LCC_PROJ = "+proj=lcc +lat_1=45 +lat_2=55 +lat_0=50 +lon_0=10 +x_0=0 +y_0=0 +ellps=WGS84 +units=m +no_defs"


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """North-up affine transform with its top-left corner at (west, north)."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def _s2(path: Path, rng: np.random.Generator) -> None:
    h = w = S2_SIZE
    data = np.zeros((len(S2_BANDS), h, w), dtype=np.uint16)
    for i, name in enumerate(S2_BANDS):
        veg = S2_VEGETATION[name] * 10_000 + rng.integers(-20, 21, size=(h, w // 2))
        wat = S2_WATER[name] * 10_000 + rng.integers(-5, 6, size=(h, w // 2))
        data[i, :, : w // 2] = np.clip(veg, 1, None)
        data[i, :, w // 2 :] = np.clip(wat, 1, None)
    data[:, :S2_NODATA_CORNER, :S2_NODATA_CORNER] = 0
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": len(S2_BANDS), "dtype": "uint16",
        "crs": CRS.from_epsg(32633), "transform": from_origin(399_960.0, 5_000_040.0, 10.0, 10.0),
        "nodata": 0,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(S2_BANDS, start=1):
            dst.set_band_description(i, name)


def _landsat8(path: Path, rng: np.random.Generator) -> None:
    h, w = 40, 50
    # Typical surface reflectance x 10000 of a mixed scene for OLI bands 1-7.
    base = np.array([400, 500, 800, 700, 3000, 2000, 1200], dtype=np.int32)
    data = (base[:, None, None] + rng.integers(-300, 301, size=(7, h, w))).astype(np.int16)
    data[:, -1, :] = -9999
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 7, "dtype": "int16",
        "crs": CRS.from_epsg(32618), "transform": from_origin(300_000.0, 4_500_000.0, 30.0, 30.0),
        "nodata": -9999,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _rgb_3857(path: Path) -> None:
    h, w = 64, 256
    data = np.zeros((3, h, w), dtype=np.uint8)
    data[0] = np.arange(w, dtype=np.uint8)[None, :]
    data[1] = np.linspace(0, 255, h).astype(np.uint8)[:, None]
    data[2] = 77
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 3, "dtype": "uint8", "photometric": "RGB",
        "crs": CRS.from_epsg(3857), "transform": from_origin(1_113_194.9, 6_446_275.8, 2.0, 2.0),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _gray_nan_4326(path: Path, rng: np.random.Generator) -> None:
    h, w = 20, 30
    data = rng.random((1, h, w), dtype=np.float32)
    data[0, :, 0] = np.nan
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "float32",
        "crs": CRS.from_epsg(4326), "transform": from_origin(12.0, 45.0, 0.001, 0.001), "nodata": float("nan"),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _float64_lcc(path: Path, rng: np.random.Generator) -> None:
    h, w = 24, 24
    data = rng.normal(100.0, 10.0, size=(2, h, w))
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 2, "dtype": "float64",
        "crs": CRS.from_proj4(LCC_PROJ), "transform": from_origin(-12_000.0, 12_000.0, 1000.0, 1000.0),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _nongeo_png(path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 256, size=(3, 32, 48), dtype=np.uint8)
    profile = {"driver": "PNG", "width": 48, "height": 32, "count": 3, "dtype": "uint8"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)   # a PNG without georeferencing is the point
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)


def _rect(path: Path, rng: np.random.Generator) -> None:
    h, w = 300, 600
    data = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 3, "dtype": "uint8", "photometric": "RGB",
        "crs": CRS.from_epsg(32618), "transform": from_origin(*RECT_ORIGIN, RECT_PIXEL, RECT_PIXEL),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _sparse(path: Path) -> None:
    profile = {
        "driver": "GTiff", "width": SPARSE_SIZE, "height": SPARSE_SIZE, "count": 1, "dtype": "uint8",
        "crs": CRS.from_epsg(32618), "transform": from_origin(200_000.0, 4_600_000.0, 1.0, 1.0),
        "nodata": 0, "tiled": True, "blockxsize": SPARSE_BLOCK, "blockysize": SPARSE_BLOCK,
        "compress": "deflate", "sparse_ok": True,
    }
    block = np.full((1, SPARSE_BLOCK, SPARSE_BLOCK), SPARSE_VALUE, dtype=np.uint8)
    with rasterio.open(path, "w", **profile) as dst:
        for col, row in SPARSE_BLOCKS:
            dst.write(block, window=Window(col, row, SPARSE_BLOCK, SPARSE_BLOCK))


def make_all(out_dir: Path) -> dict[str, Path]:
    """Write every fixture into `out_dir` (created if needed) and return {file name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    paths: dict[str, Path] = {}

    def target(name: str) -> Path:
        paths[name] = out_dir / name
        return paths[name]

    _s2(target("s2_13band_uint16_utm33.tif"), rng)
    _landsat8(target("landsat8_int16_utm18.tif"), rng)
    _rgb_3857(target("rgb_uint8_3857.tif"))
    _gray_nan_4326(target("gray_float32_nan_4326.tif"), rng)
    _float64_lcc(target("float64_lcc.tif"), rng)
    _nongeo_png(target("nongeo.png"), rng)
    _rect(target("rect_600x300_utm.tif"), rng)
    _sparse(target("sparse_20000.tif"))
    rect_bytes = paths["rect_600x300_utm.tif"].read_bytes()
    target("corrupt.tif").write_bytes(rect_bytes[:400])
    target("truncated.tif").write_bytes(rect_bytes[: len(rect_bytes) // 2])
    target("text_as.tif").write_text("this is not a raster\n")
    # GDAL leaves .aux.xml side-cars for PNG metadata; they are not fixtures.
    for aux in out_dir.glob("*.aux.xml"):
        aux.unlink()
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/make_fixtures.py OUT_DIR")
    for name, p in make_all(Path(sys.argv[1])).items():
        print(f"{p}  ({p.stat().st_size} bytes)  {name}")
