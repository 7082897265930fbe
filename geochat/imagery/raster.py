"""Read any raster into an 8-bit RGB view, a validity mask and JSON facts, never whole when large.

Everything goes through rasterio/GDAL: GeoTIFF/COG of any dtype and band count (complex SAR becomes
amplitude), PNG/JPEG, encoded bytes (via an in-memory file) and in-memory PIL images or numpy arrays
(written to an in-memory GeoTIFF so that one code path serves all sources).

Memory stays O(max_size^2 * bands): `load_image` asks GDAL for a decimated read (`out_shape`), which
uses overviews when the file has them, of only the bands it needs (the RGB bands plus those the
spectral indices need), and it caps GDAL's block cache (GDAL_CACHEMAX) for the read, since without
overviews GDAL decodes every block once and would otherwise keep up to 5 % of RAM of them cached.
`read_window` reads one window at full or chosen resolution for tiled work.

Every failure a user can fix (missing file, not a raster, truncated data, bad bands, too large)
raises `ImageryError` or `BandSelectionError` with a message saying what to do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.io import DatasetReader
from rasterio.transform import from_gcps
from rasterio.windows import Window

from geochat.errors import ImageryError
from geochat.imagery.bands import INDEX_ROLES, BandSelection, select_bands
from geochat.imagery.geo import crs_to_string, ground_sample_distance, lonlat_bounds
from geochat.imagery.indices import spectral_facts
from geochat.imagery.sources import ImageSource, gdal_env, open_source, read_guard
from geochat.imagery.stretch import Stretch, apply_stretch, compute_stretch, display_values

DEFAULT_MAX_SIZE = 1024
DEFAULT_MAX_PIXELS = 2_000_000_000    # one view of a raster
TILED_MAX_PIXELS = 100_000_000_000    # a scene asked about tile by tile: a decimated overview, then one window a tile


@dataclass(frozen=True)
class RasterInfo:
    """What the file says about itself (no pixel statistics)."""

    path: str | None
    width: int
    height: int
    count: int
    dtype: str                                   # e.g. "uint16", "complex64"
    crs: str | None                              # "EPSG:32618", else WKT; None without georeferencing
    transform: tuple[float, float, float, float, float, float] | None   # affine a..f; None if none
    nodata: float | None
    band_descriptions: tuple[str | None, ...]
    color_interp: tuple[str, ...]                # e.g. ("red", "green", "blue", "alpha")
    gsd_m: float | None                          # ground sample distance in metres
    bounds_lonlat: tuple[float, float, float, float] | None   # west, south, east, north (EPSG:4326)

    @property
    def georeferenced(self) -> bool:
        """Whether pixels have lon/lat: a CRS, a geotransform, and a conversion between that CRS and lon/lat."""
        return self.crs is not None and self.transform is not None and self.bounds_lonlat is not None


@dataclass
class LoadedImage:
    """A raster's display/model view and what is known about it."""

    rgb: np.ndarray            # (h, w, 3) uint8, long side <= max_size, invalid pixels 0
    valid: np.ndarray          # (h, w) bool, False where nodata/NaN/masked in any band read
    info: RasterInfo
    scale: float               # original pixels per preview pixel (>= 1.0)
    bands: BandSelection
    facts: dict[str, Any]      # JSON-serialisable summary for the prompt
    stretch: Stretch           # limits used, so that tiles (read_window) are stretched the same way


def _raster_info(ds: DatasetReader, path: str | None) -> RasterInfo:
    crs, transform = ds.crs, ds.transform
    gcps, gcp_crs = ds.gcps
    if (crs is None or not crs.to_wkt()) and gcps and gcp_crs is not None:
        # GCP-only rasters (e.g. Sentinel-1 GRD): an affine fit to the control points, approximate.
        crs, transform = gcp_crs, from_gcps(gcps)
    crs_s = crs_to_string(crs)
    t6: tuple[float, float, float, float, float, float] | None = tuple(float(v) for v in transform[:6])  # type: ignore[assignment]
    if transform.is_identity:  # no geotransform in the file (GDAL's default), with or without a CRS
        t6 = None
    return RasterInfo(
        path=path, width=ds.width, height=ds.height, count=ds.count, dtype=ds.dtypes[0],
        crs=crs_s, transform=t6, nodata=None if ds.nodata is None else float(ds.nodata),
        band_descriptions=tuple(d or None for d in ds.descriptions),
        color_interp=tuple(c.name for c in ds.colorinterp),
        gsd_m=ground_sample_distance(crs_s, t6, ds.width, ds.height),
        bounds_lonlat=lonlat_bounds(crs_s, t6, ds.width, ds.height),
    )


def read_info(source: ImageSource) -> RasterInfo:
    """The RasterInfo of a source, reading no pixels."""
    with gdal_env(), open_source(source) as (ds, path, _):
        return _raster_info(ds, path)


def _valid_mask(ds: DatasetReader, indexes: Sequence[int], data: np.ndarray, window: Window | None,
                out_shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: False where any band read is nodata, non-finite or masked (alpha/mask band)."""
    valid = np.ones(out_shape, dtype=bool)
    dataset_mask_done = False
    for k, idx in enumerate(indexes):
        band = data[k]
        if band.dtype.kind in "fc":
            valid &= np.isfinite(band)
        flags = ds.mask_flag_enums[idx - 1]
        if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
            if not dataset_mask_done:
                mask = ds.read_masks(idx, window=window, out_shape=out_shape, resampling=Resampling.nearest)
                valid &= mask > 0
                dataset_mask_done = True
        elif MaskFlags.nodata in flags:
            nodata = ds.nodatavals[idx - 1]
            if nodata is not None:
                valid &= ~np.isnan(band) if math.isnan(nodata) else band != nodata
    return valid


def _read_bands(ds: DatasetReader, indexes: Sequence[int], window: Window | None, out_shape: tuple[int, int],
                decimating: bool) -> tuple[np.ndarray, np.ndarray]:
    """(bands, h, w) data and (h, w) validity of `indexes`, resampled to `out_shape`.

    Averaging when decimating (GDAL skips nodata in the average); nearest for palette indices. Two kinds of
    data are averaged here instead, over up to LOOKS × LOOKS samples read for each output pixel (`_block_mean`):
    complex (SAR) data, whose average would cancel by phase, by its intensity |z|² (a multilook, which is what
    a SAR quicklook does against speckle); and float data that does not declare NaN as nodata, which GDAL
    would average into every output pixel that touches a NaN, by its finite values.
    """
    dtype = ds.dtypes[0]
    undeclared_nan = not is_complex(dtype) and np.dtype(dtype).kind == "f" and ds.nodata is None
    if decimating and (is_complex(dtype) or undeclared_nan):
        looks = _looks(window.height if window else ds.height, window.width if window else ds.width, out_shape)
        if looks > 1:
            fine = (out_shape[0] * looks, out_shape[1] * looks)
            data = ds.read(list(indexes), window=window, out_shape=(len(indexes), *fine), resampling=Resampling.nearest)
            return _block_mean(data, _valid_mask(ds, indexes, data, window, fine), looks)
    nearest = not decimating or is_complex(dtype) or undeclared_nan or ds.colorinterp[0] == ColorInterp.palette
    data = ds.read(list(indexes), window=window, out_shape=(len(indexes), *out_shape),
                   resampling=Resampling.nearest if nearest else Resampling.average)
    return data, _valid_mask(ds, indexes, data, window, out_shape)


LOOKS = 4                      # at most 4 × 4 samples an output pixel for a decimated SAR or float view (none under 2×)
MAX_LOOK_SAMPLES = 16_000_000  # and at most this many samples a band: 128 MB as complex64 (a 1024² view gets 3 × 3)


def _looks(height: float, width: float, out_shape: tuple[int, int]) -> int:
    """Samples a side per output pixel for a multilooked view: the decimation, at most LOOKS, within the budget."""
    looks = min(LOOKS, int(height // out_shape[0]), int(width // out_shape[1]))
    while looks > 1 and looks * looks * out_shape[0] * out_shape[1] > MAX_LOOK_SAMPLES:
        looks -= 1
    return max(1, looks)


def _block_mean(data: np.ndarray, valid: np.ndarray, looks: int) -> tuple[np.ndarray, np.ndarray]:
    """(bands, h·looks, w·looks) samples → (bands, h, w): each block's mean over its valid samples, and the
    blocks where at least half of the samples are valid. Complex samples give the amplitude √mean(|z|²) (as
    complex, phase 0), real ones the mean value."""
    n, fh, fw = data.shape
    h, w = fh // looks, fw // looks
    sample = np.abs(data) ** 2 if np.iscomplexobj(data) else data
    total = np.where(valid, sample, 0).reshape(n, h, looks, w, looks).sum(axis=(2, 4))
    count = valid.reshape(h, looks, w, looks).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    kept = count * 2 >= looks * looks
    if np.iscomplexobj(data):
        return np.where(kept, np.sqrt(mean), np.nan).astype(np.complex64), kept
    return np.where(kept, mean, np.nan).astype(data.dtype), kept


def is_complex(dtype: str) -> bool:
    """Whether a rasterio dtype name is complex (SAR): complex64, complex128, and `complex_int16` (Sentinel-1
    SLC's CInt16), which numpy has no name for."""
    return dtype.startswith("complex")


def _palette_channels(ds: DatasetReader, band: np.ndarray, valid: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """R, G, B channels (uint8 values as float) of a palette band, and validity with the palette's alpha."""
    cmap = ds.colormap(1)
    size = max(256, max(cmap) + 1, int(band.max()) + 1)
    lut = np.zeros((size, 4), dtype=np.float64)
    for key, rgba in cmap.items():
        lut[key] = rgba
    colours = lut[band.astype(np.int64)]
    return [colours[..., 0], colours[..., 1], colours[..., 2]], valid & (colours[..., 3] > 0)


def _preview_shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    if max(width, height) <= max_size:
        return height, width
    s = max(width, height) / max_size
    return max(1, round(height / s)), max(1, round(width / s))


def _crs_label(crs: str | None) -> str | None:
    """"EPSG:nnnn", or "custom (<PROJ projection name>)" for a CRS known only by its WKT."""
    if crs is None or crs.startswith("EPSG:"):
        return crs
    proj = CRS.from_user_input(crs).to_dict().get("proj")
    return f"custom ({proj or 'no projection name'})"


def _facts(info: RasterInfo, sel: BandSelection, valid: np.ndarray, scale: float, sensor: str | None,
           index_facts: dict[str, Any]) -> dict[str, Any]:
    def r(v: float | None, nd: int = 3) -> float | None:
        return None if v is None else round(float(v), nd)

    nodata: float | str | None = info.nodata
    if info.nodata is not None and math.isnan(info.nodata):
        nodata = "NaN"   # strict JSON has no NaN
    facts: dict[str, Any] = {
        "file": Path(info.path).name if info.path else None,
        "size": [info.width, info.height],
        "band_count": info.count,
        "dtype": info.dtype,
        "crs": _crs_label(info.crs),
        "georeferenced": info.georeferenced,
        "gsd_m": r(info.gsd_m),
        "bounds_lonlat": None if info.bounds_lonlat is None else [round(v, 6) for v in info.bounds_lonlat],
        "nodata": nodata,
        "rgb_bands": list(sel.rgb),
        "band_selection": sel.source,
        "band_roles": dict(sel.roles),
        "band_order": "known" if sel.order_known else "unknown",
        "band_descriptions": [d for d in info.band_descriptions] if any(info.band_descriptions) else None,
        "nodata_fraction": r(1.0 - float(valid.mean())) if valid.size else None,
        "preview_size": [int(valid.shape[1]), int(valid.shape[0])],
        "preview_scale": r(scale),
        "spectral_indices": index_facts,
    }
    if not sel.order_known and info.count >= 4:
        facts["band_order_hint"] = ("the file does not say which band is which; pass a sensor preset "
                                    "(e.g. sentinel2, landsat8, naip, planetscope) to use the extra bands")
    if sensor:
        facts["sensor"] = sel.source.removeprefix("preset:")
    if is_complex(info.dtype):
        facts["display"] = "SAR amplitude |z| in dB, 2-98 % stretch"
    return facts


def load_image(source: ImageSource, *, bands: Sequence[int] | str | None = None, sensor: str | None = None,
               max_size: int = DEFAULT_MAX_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
               stretch: str = "auto") -> LoadedImage:
    """Read a raster's RGB view (long side <= max_size), validity mask, info and facts.

    `bands`: 1-based band numbers [4, 3, 2] or "4,3,2" (one band = grey), or band names. `sensor`:
    a preset name from SENSOR_PRESETS. `stretch`: "auto" (8-bit data as is, anything else 2-98 %
    percentile) or "percentile" (always).
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    with gdal_env(), open_source(source) as (ds, path, name):
        info = _raster_info(ds, path)
        if info.width * info.height > max_pixels:
            tiled = ("ask about it tile by tile (geochat ask IMAGE QUESTION --tile 1024, or GeoChat.chat_tiled), or "
                     if max_pixels < TILED_MAX_PIXELS else "")
            raise ImageryError(
                f"{name} is {info.width}x{info.height} = {info.width * info.height:,} pixels, more than "
                f"the limit of {max_pixels:,} for one view; {tiled}cut a window out first (e.g. gdal_translate "
                f"-srcwin X Y W H in.tif out.tif)"
            )
        palette = info.color_interp[:1] == ("palette",) and info.count == 1 and bands is None
        sel = (BandSelection((1, 1, 1), {}, "colorinterp") if palette else
               select_bands(info.count, info.band_descriptions, info.color_interp, bands, sensor))
        out_shape = _preview_shape(info.width, info.height, max_size)
        scale = max(info.width, info.height) / max(out_shape)
        index_bands = {role: sel.roles[role] for role in INDEX_ROLES if role in sel.roles}
        needed = list(dict.fromkeys([*sel.rgb, *index_bands.values()]))
        with read_guard(name):
            data, valid = _read_bands(ds, needed, None, out_shape, decimating=scale > 1.0)
            if palette:
                channels, valid = _palette_channels(ds, data[0], valid)
                view = compute_stretch(channels, valid, mode=stretch, raw_dtype="uint8", colours=True)
                rgb = apply_stretch(channels, valid, view)
                index_facts: dict[str, Any] = {}
            else:
                decibels = is_complex(info.dtype)
                shown = {idx: display_values(data[needed.index(idx)], decibels) for idx in set(sel.rgb)}
                channels = [shown[i] for i in sel.rgb]
                view = compute_stretch(channels, valid, mode=stretch, raw_dtype=info.dtype, decibels=decibels)
                rgb = apply_stretch(channels, valid, view)
                # indices from physical values: a file's scale/offset tags (Landsat Collection 2 stores
                # reflectance as DN · 2.75e-5 − 0.2) shift a normalised difference when ignored
                arrays = {role: data[needed.index(idx)] * ds.scales[idx - 1] + ds.offsets[idx - 1]
                          for role, idx in index_bands.items()}
                index_facts = {} if decibels else spectral_facts(arrays, valid)
    facts = _facts(info, sel, valid, scale, sensor, index_facts)
    return LoadedImage(rgb=rgb, valid=valid, info=info, scale=scale, bands=sel, facts=facts, stretch=view)


def read_window(source: ImageSource, window: tuple[int, int, int, int], bands: Sequence[int] | str | None = None,
                out_size: int | tuple[int, int] | None = None, *, sensor: str | None = None,
                stretch: Stretch | str = "auto") -> np.ndarray:
    """(h, w, 3) uint8 RGB of one window (col_off, row_off, width, height) in original pixels.

    `out_size`: None for full resolution, an int for the long side, or (width, height). `stretch`: a
    `Stretch` (e.g. `LoadedImage.stretch`, so tiles match the overview) or a mode computed on the
    window alone. Invalid pixels are 0. The window must lie inside the raster.
    """
    col, row, width, height = (int(v) for v in window)
    with gdal_env(), open_source(source) as (ds, _, name):
        if width < 1 or height < 1 or col < 0 or row < 0 or col + width > ds.width or row + height > ds.height:
            raise ImageryError(
                f"window (col {col}, row {row}, {width}x{height}) is not inside {name}, which is "
                f"{ds.width}x{ds.height} pixels; clamp tiles to the raster"
            )
        info = _raster_info(ds, None)
        palette = info.color_interp[:1] == ("palette",) and info.count == 1 and bands is None
        sel = (BandSelection((1, 1, 1), {}, "colorinterp") if palette else
               select_bands(info.count, info.band_descriptions, info.color_interp, bands, sensor))
        if out_size is None:
            out_shape = (height, width)
        elif isinstance(out_size, int):
            s = max(width, height) / out_size
            out_shape = (max(1, round(height / s)), max(1, round(width / s)))
        else:
            out_shape = (int(out_size[1]), int(out_size[0]))
        needed = list(dict.fromkeys(sel.rgb))
        with read_guard(name):
            data, valid = _read_bands(ds, needed, Window(col, row, width, height), out_shape,
                                      decimating=out_shape[0] < height or out_shape[1] < width)
            if palette:
                channels, valid = _palette_channels(ds, data[0], valid)
                raw_dtype, decibels = "uint8", False
            else:
                raw_dtype, decibels = info.dtype, is_complex(info.dtype)
                channels = [display_values(data[needed.index(i)], decibels) for i in sel.rgb]
    view = stretch if isinstance(stretch, Stretch) else compute_stretch(
        channels, valid, mode=stretch, raw_dtype=raw_dtype, decibels=decibels)
    return apply_stretch(channels, valid, view)


def pad_to_square(rgb: np.ndarray, fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre `rgb` (h, w, 3) on a square canvas of side max(h, w) filled with `fill`.

    This is LLaVA's `expand2square`: the shorter side is padded equally on both sides (the extra
    pixel of an odd difference goes after). Returns the (side, side, 3) image and the (left, top)
    offsets of the original inside it, needed to map boxes on the square back to the image.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"pad_to_square expects an (h, w, 3) image, got {rgb.shape}")
    h, w = rgb.shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    out = np.empty((side, side, 3), dtype=rgb.dtype)
    out[...] = np.asarray(fill, dtype=rgb.dtype)
    out[top:top + h, left:left + w] = rgb
    return out, (left, top)
