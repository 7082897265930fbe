"""Contrast stretch from raw band values (any dtype) to 8-bit display/model values.

Satellite bands are rarely 8-bit: Sentinel-2 and Landsat store reflectance x 10000 in 16 bits, SAR
stores complex numbers, analysis products store floats. The display view maps each channel's 2nd-98th
percentile of the valid pixels linearly to 0-255 (the default of QGIS and most viewers), which
ignores outliers such as clouds, glint and nodata. SAR amplitude is stretched in decibels
(20 * log10 |z|), since its speckle spans orders of magnitude. 8-bit data (PNG/JPEG photos, RGB
GeoTIFFs) is already display-ready and passes through unchanged under the "auto" mode, so photos keep
their colour balance; 8-bit codes (a 0/1 mask, a class map with values up to 15) are spread over 0-255.

The limits are kept in a `Stretch` so that tiles read later (`read_window`) look like the overview.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRETCH_MODES = ("auto", "percentile")
PERCENTILES = (2.0, 98.0)
CONSTANT_GREY = 128       # value of a valid pixel of a constant channel (no contrast to stretch)
CODED_UINT8_MAX = 15      # 8-bit data no higher than this is codes (a mask, classes), not a picture


@dataclass(frozen=True)
class Stretch:
    """Per-channel (low, high) limits, in display units (dB when `decibels`), mapped to 0 and 255."""

    limits: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    decibels: bool = False

    def __post_init__(self) -> None:
        if len(self.limits) != 3:
            raise ValueError(f"a Stretch needs limits for 3 channels, got {len(self.limits)}")


def display_values(band: np.ndarray, decibels: bool) -> np.ndarray:
    """Band values in display units: |z| for complex, in dB when `decibels`; float (h, w). A zero amplitude
    has no decibels (NaN): it is a SAR scene's fill, which would otherwise sit at -200 dB in the stretch
    and wash the picture out; it shows black."""
    values = np.abs(band) if np.iscomplexobj(band) else band
    values = values.astype(np.float64, copy=False)
    if decibels:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, 20.0 * np.log10(values), np.nan)
    return values


def compute_stretch(channels: list[np.ndarray], valid: np.ndarray, *, mode: str = "auto",
                    raw_dtype: str = "float32", decibels: bool = False, colours: bool = False) -> Stretch:
    """Limits for three display-unit channels (each (h, w)) from their valid pixels.

    `mode="auto"` keeps uint8 data as is (limits 0, 255), except codes (every channel at most
    `CODED_UINT8_MAX`: a 0/1 mask, a class map; not `colours`, a palette's), which go from 0 to their
    highest value; otherwise, and for
    `mode="percentile"`, the limits are the 2nd and 98th percentiles of each channel's valid, finite pixels.
    """
    if mode not in STRETCH_MODES:
        raise ValueError(f"unknown stretch mode {mode!r}; choose one of {STRETCH_MODES}")
    if len(channels) != 3:
        raise ValueError(f"expected 3 channels, got {len(channels)}")
    if mode == "auto" and raw_dtype == "uint8" and not decibels:
        top = max(_valid_max(ch, valid) for ch in channels)
        if not colours and 0 < top <= CODED_UINT8_MAX:
            # a mask or class map (0/1, a few codes): shown as is it is black; one range for all three channels,
            # from 0, so that 0 stays black and every other code (and the channels' balance) stays apart
            return Stretch(((0.0, top), (0.0, top), (0.0, top)), decibels)
        return Stretch(((0.0, 255.0), (0.0, 255.0), (0.0, 255.0)), decibels)
    limits: list[tuple[float, float]] = []
    cache: dict[int, tuple[float, float]] = {}
    for ch in channels:
        if id(ch) not in cache:
            vals = ch[valid & np.isfinite(ch)]
            if vals.size == 0:
                cache[id(ch)] = (0.0, 0.0)
            else:
                lo, hi = np.percentile(vals, PERCENTILES)
                cache[id(ch)] = (float(lo), float(hi))
        limits.append(cache[id(ch)])
    return Stretch((limits[0], limits[1], limits[2]), decibels)


def _valid_max(ch: np.ndarray, valid: np.ndarray) -> float:
    vals = ch[valid & np.isfinite(ch)]
    return float(vals.max()) if vals.size else 0.0


def apply_stretch(channels: list[np.ndarray], valid: np.ndarray, stretch: Stretch) -> np.ndarray:
    """(h, w, 3) uint8: each channel mapped linearly from its (low, high) to 0-255 and clipped;
    invalid and non-finite pixels are 0; a channel with high <= low is CONSTANT_GREY where valid."""
    h, w = valid.shape
    out = np.zeros((h, w, 3), dtype=np.uint8)
    for k, (ch, (lo, hi)) in enumerate(zip(channels, stretch.limits, strict=True)):
        ok = valid & np.isfinite(ch)
        if hi > lo:
            scaled = np.clip((np.where(ok, ch, lo) - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
            out[..., k] = np.where(ok, np.rint(scaled), 0).astype(np.uint8)
        else:
            out[..., k] = np.where(ok, CONSTANT_GREY, 0).astype(np.uint8)
    return out
