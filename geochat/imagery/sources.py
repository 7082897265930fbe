"""Opening any image source as a rasterio dataset, and turning GDAL failures into user messages.

Sources: a path (or a GDAL URL such as /vsicurl/...), encoded bytes (an in-memory file), a PIL image
or a numpy array (both written to an in-memory GeoTIFF, without georeferencing, so that the rest of
the imagery layer has one code path). `open_source` raises `ImageryError` for a missing file, a
directory, or something GDAL cannot open; `read_guard` does the same for failed pixel reads
(truncated or corrupt data). `gdal_env` caps GDAL's block cache for a read and silences
NotGeoreferencedWarning, which is expected for PNG/JPEG and arrays. GDAL's cache size is process-wide,
so a concurrent read elsewhere in the process shares the cap while one of ours runs.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import rasterio
from PIL import Image

# CPLE_BaseError is what GDAL errors surface as when rasterio does not wrap them in a RasterioError;
# rasterio exposes it only from this module.
from rasterio._err import CPLE_BaseError
from rasterio.enums import ColorInterp
from rasterio.env import get_gdal_config, hasenv, set_gdal_config
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile

from geochat.errors import ImageryError
from geochat.paths import utf8_name

ImageSource = Union[str, "os.PathLike[str]", bytes, Image.Image, np.ndarray]

GDAL_CACHE_BYTES = 64 * 1024 * 1024   # block cache cap while reading (GDAL's default is 5 % of RAM)


@contextmanager
def gdal_env() -> Iterator[None]:
    """Quiet NotGeoreferencedWarning (PNG/JPEG/arrays) and cap GDAL's block cache for one read."""
    nested = hasenv()
    previous = get_gdal_config("GDAL_CACHEMAX")
    cap = min(previous, GDAL_CACHE_BYTES) if isinstance(previous, int) and previous > 0 else GDAL_CACHE_BYTES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.Env(GDAL_CACHEMAX=cap):
                yield
    finally:
        if nested and previous is not None and get_gdal_config("GDAL_CACHEMAX") != previous:
            set_gdal_config("GDAL_CACHEMAX", previous)   # a nested Env does not restore it by itself


def _reason(exc: BaseException) -> str:
    """GDAL's message without the file name it starts with (the caller names the file)."""
    if "See previous exception" in str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__   # rasterio's "Read failed" wraps GDAL's own message
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^'[^']*'\s+", "", text)           # "'/path/x.tif' not recognized as ..."
    text = re.sub(r"^[^\s:,'\"]+\.\w+[:,]\s*", "", text)   # "x.tif: TIFFReadDirectory: ...", "x.tif, band 1: ..."
    return text.rstrip(".")[:200]


@contextmanager
def _checked_open(opener: Callable[[], DatasetReader], name: str) -> Iterator[DatasetReader]:
    try:
        ds = opener()
    except (RasterioError, CPLE_BaseError) as exc:
        raise ImageryError(
            f"{name} is not a readable raster ({_reason(exc)}); pass a GeoTIFF/COG, PNG or JPEG file, "
            f"and if it is one, it is damaged or truncated: download or export it again"
        ) from exc
    with ds:
        yield ds


@contextmanager
def read_guard(name: str) -> Iterator[None]:
    """Turn GDAL read failures (truncated or corrupt pixel data) into an ImageryError."""
    try:
        yield
    except (RasterioError, CPLE_BaseError) as exc:
        raise ImageryError(
            f"{name} is truncated or corrupt: reading its pixels failed ({_reason(exc)}); "
            f"download or export it again"
        ) from exc


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, tuple[ColorInterp, ...] | None]:
    """(h, w[, c]) array in native byte order and its colour interpretation."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    ci = ColorInterp
    interp = {"RGB": (ci.red, ci.green, ci.blue), "RGBA": (ci.red, ci.green, ci.blue, ci.alpha),
              "LA": (ci.gray, ci.alpha)}.get(img.mode)
    return arr, interp


@contextmanager
def _array_dataset(arr: np.ndarray, interp: tuple[ColorInterp, ...] | None) -> Iterator[DatasetReader]:
    """An in-memory GeoTIFF of an (h, w) or (h, w, bands) array, without georeferencing."""
    if arr.ndim == 3 and arr.shape[2] > 64 and arr.shape[0] <= 64:
        raise ImageryError(
            f"numpy images are read as (height, width, bands) but this one is {arr.shape}, which looks "
            f"like (bands, height, width); pass np.moveaxis(array, 0, -1)"
        )
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageryError(f"a numpy image must be (height, width) or (height, width, bands), got shape {arr.shape}")
    bands = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    if bands.dtype == np.bool_:
        bands = bands.astype(np.uint8)
    elif bands.dtype == np.float16:
        bands = bands.astype(np.float32)
    elif bands.dtype.kind not in "uifc":
        raise ImageryError(f"a numpy image must hold numbers, got dtype {bands.dtype}")
    if interp is None and bands.shape[0] == 3:
        interp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    count, height, width = bands.shape
    with MemoryFile() as mf:
        # ALPHA=YES makes GTiff record the last band as alpha (an ExtraSample), so GDAL masks with it.
        options = {"alpha": "YES"} if interp is not None and interp[-1] == ColorInterp.alpha else {}
        with mf.open(driver="GTiff", width=width, height=height, count=count, dtype=bands.dtype.name,
                     **options) as dst:
            dst.write(bands)
            if interp is not None:
                dst.colorinterp = list(interp)
        with mf.open() as ds:
            yield ds


def _png_is_cut(f: BinaryIO, size: int) -> bool:
    """Whether a PNG file ends before its IEND chunk. GDAL's PNG driver reports no error for pixels past a cut:
    it returns whatever its buffer held (seen: bytes of text), a different image on every read."""
    pos = 8  # the signature
    while pos + 8 <= size:
        f.seek(pos)
        length, kind = struct.unpack(">I4s", f.read(8))
        if kind == b"IEND":
            return False
        pos += 12 + length  # length, type, data, CRC
    return True


def _refuse_cut_png(ds: DatasetReader, data: Callable[[], BinaryIO], size: int, name: str) -> None:
    """`data` opens the file's bytes; it is called for a PNG only."""
    if ds.driver != "PNG":
        return
    with data() as f:
        if _png_is_cut(f, size):
            raise ImageryError(f"{name} is truncated: its PNG data stops before the end of the image; "
                               "download or export it again")


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("/vsi")


@contextmanager
def open_source(source: ImageSource) -> Iterator[tuple[DatasetReader, str | None, str]]:
    """Yield (dataset, path or None, a name for messages) for any supported source."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not _is_remote(path):
            p = Path(path)
            if not p.exists():
                raise ImageryError(f"file not found: {path}; check the path (relative paths start at {Path.cwd()})")
            if p.is_dir():
                raise ImageryError(f"{path} is a directory; pass an image file (GeoTIFF/COG, PNG, JPEG)")
        if not utf8_name(path):
            raise ImageryError(f"{os.fsencode(path)!r}: the file name is not valid UTF-8, which GDAL needs; rename "
                               "the file")
        with _checked_open(lambda: rasterio.open(path), path) as ds:
            if not _is_remote(path):
                _refuse_cut_png(ds, lambda: open(path, "rb"), os.path.getsize(path), path)
            yield ds, path, path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageryError("the image bytes are empty; upload the file again")
        with MemoryFile(bytes(source)) as mf, _checked_open(mf.open, "the uploaded image") as ds:
            _refuse_cut_png(ds, lambda: io.BytesIO(source), len(source), "the uploaded image")
            yield ds, None, "the uploaded image"
    elif isinstance(source, Image.Image):
        arr, interp = _pil_to_array(source)
        with _array_dataset(arr, interp) as ds:
            yield ds, None, "the PIL image"
    elif isinstance(source, np.ndarray):
        with _array_dataset(source, None) as ds:
            yield ds, None, "the numpy image"
    else:
        raise ImageryError(
            f"cannot read an image from a {type(source).__name__}; pass a file path, bytes, a PIL image or a numpy array"
        )
