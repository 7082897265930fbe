"""Seconds to turn large rasters into the model's view, for the cases where reading is the slow part.

- a complex SAR scene (complex64, SIZE × SIZE, speckle) shrunk to a 1024-px view: multilooked as
  `load_image` does it (up to 4 × 4 looks within MAX_LOOK_SAMPLES) against one nearest sample a pixel;
- a float32 reflectance scene (3 bands, SIZE × SIZE, no nodata value declared, NaN outside a corner)
  shrunk to 1024 px: the mean of its finite values over up to 4 × 4 samples against one nearest sample;
- a sparse 50,000 × 50,000 uint8 GeoTIFF (2.5 billion pixels, over the one-view limit): the overview that a
  tiled run reads first, and one 16,384-px tile window shrunk to 1,024 px.

Files are generated in a temporary directory (seeded); the best of `--repeats` runs is reported.

    .venv/bin/python benchmarks/imagery_read.py [--size 4096] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]

from report import print_results  # noqa: E402  (benchmarks/report.py, beside this script)

sys.path.insert(0, str(REPO))

from geochat.imagery import load_image, read_window  # noqa: E402
from geochat.imagery import raster as raster_module  # noqa: E402
from geochat.imagery.raster import TILED_MAX_PIXELS  # noqa: E402


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times), 3)


def write_sar(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))).astype(np.complex64)
    z[:, size // 2:] *= 10.0
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="complex64",
                       crs="EPSG:32631", transform=from_origin(500_000.0, 5_700_000.0, 2.5, 2.5), tiled=True) as ds:
        ds.write(z[None])


def write_float(path: Path, size: int) -> None:
    rng = np.random.default_rng(1)
    f = rng.uniform(0.0, 0.4, size=(3, size, size)).astype(np.float32)
    f[:, : size // 8, : size // 8] = np.nan  # outside the footprint, undeclared
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="float32",
                       crs="EPSG:32631", transform=from_origin(500_000.0, 5_700_000.0, 10.0, 10.0), tiled=True) as ds:
        ds.write(f)


def write_sparse(path: Path, size: int = 50_000, block: int = 512) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=from_origin(200_000.0, 4_600_000.0, 1.0, 1.0), nodata=0, tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate", sparse_ok=True) as ds:
        ds.write(np.full((1, block, block), 200, np.uint8), window=Window(20_480, 20_480, block, block))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="side of the SAR scene in pixels (default 4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"sar_size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        sar, reflectance, sparse = Path(tmp) / "sar.tif", Path(tmp) / "float.tif", Path(tmp) / "sparse.tif"
        write_sar(sar, args.size)
        write_float(reflectance, args.size)
        write_sparse(sparse)
        results["sar_multilook_s"] = best_of(args.repeats, lambda: load_image(sar))
        with mock.patch.object(raster_module, "LOOKS", 1):  # the view as it was read before multilooking
            results["sar_one_sample_s"] = best_of(args.repeats, lambda: load_image(sar))
        results["float_block_mean_s"] = best_of(args.repeats, lambda: load_image(reflectance))
        with mock.patch.object(raster_module, "LOOKS", 1):
            results["float_one_sample_s"] = best_of(args.repeats, lambda: load_image(reflectance))
        results["sparse_2.5e9_overview_s"] = best_of(args.repeats, lambda: load_image(sparse, max_pixels=TILED_MAX_PIXELS))
        results["sparse_tile_16384_to_1024_s"] = best_of(
            args.repeats, lambda: read_window(sparse, (16_384, 16_384, 16_384, 16_384), out_size=1024))
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
