"""Normalised-difference spectral indices and the facts they contribute to the prompt.

Each index is a normalised difference (a - b) / (a + b) of two bands, so it ranges over [-1, 1] for
non-negative inputs and is unchanged by a common gain (DN vs reflectance); an additive offset (e.g.
Sentinel-2 L2A's BOA_ADD_OFFSET of -1000 since processing baseline 04.00) does change it, so values
from un-offset digital numbers are approximate. The indices are computed on the decimated band arrays
the loader already read, as float64 with invalid pixels and zero denominators excluded.

- NDVI  = (NIR - Red) / (NIR + Red)       Rouse et al. 1974; Tucker 1979, Remote Sens. Environ. 8(2).
- NDWI  = (Green - NIR) / (Green + NIR)   McFeeters 1996, Int. J. Remote Sens. 17(7) (open water).
- MNDWI = (Green - SWIR1) / (Green + SWIR1)  Xu 2006, Int. J. Remote Sens. 27(14).
- NDBI  = (SWIR1 - NIR) / (SWIR1 + NIR)   Zha, Gao & Ni 2003, Int. J. Remote Sens. 24(3).
- NBR   = (NIR - SWIR2) / (NIR + SWIR2)   Key & Benson 2006, FIREMON (burn severity via dNBR).

Named fractions use common thresholds: NDVI > 0.3 vegetation, NDWI > 0 and MNDWI > 0 water,
NDBI > 0 built-up. They are coarse screening values, not a classification.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IndexSpec:
    """A normalised difference (a - b) / (a + b) of two band roles, and an optional named fraction."""

    name: str
    a: str
    b: str
    formula: str
    fraction_name: str | None = None
    fraction_threshold: float = 0.0


INDICES: tuple[IndexSpec, ...] = (
    IndexSpec("ndvi", "nir", "red", "(NIR - Red) / (NIR + Red)", "vegetation_fraction", 0.3),
    IndexSpec("ndwi", "green", "nir", "(Green - NIR) / (Green + NIR)", "water_fraction", 0.0),
    IndexSpec("mndwi", "green", "swir1", "(Green - SWIR1) / (Green + SWIR1)", "water_fraction", 0.0),
    IndexSpec("ndbi", "swir1", "nir", "(SWIR1 - NIR) / (SWIR1 + NIR)", "built_up_fraction", 0.0),
    IndexSpec("nbr", "nir", "swir2", "(NIR - SWIR2) / (NIR + SWIR2)"),
)


def normalized_difference(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(a - b) / (a + b) as float64 (h, w); NaN where invalid, non-finite or a + b == 0."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    den = a64 + b64
    ok = np.isfinite(a64) & np.isfinite(b64) & (den != 0)
    if valid is not None:
        ok &= valid
    out = np.full(den.shape, np.nan, dtype=np.float64)
    np.divide(a64 - b64, den, out=out, where=ok)
    return out


def compute_index(name: str, arrays_by_role: Mapping[str, np.ndarray], valid: np.ndarray | None = None) -> np.ndarray:
    """The named index ("ndvi", "ndwi", "mndwi", "ndbi", "nbr") as a float64 array, NaN where undefined."""
    spec = next((s for s in INDICES if s.name == name.lower()), None)
    if spec is None:
        raise ValueError(f"unknown index {name!r}; known: {', '.join(s.name for s in INDICES)}")
    missing = [r for r in (spec.a, spec.b) if r not in arrays_by_role]
    if missing:
        raise ValueError(f"{spec.name} needs the {' and '.join(missing)} band(s)")
    return normalized_difference(arrays_by_role[spec.a], arrays_by_role[spec.b], valid)


def _r(x: float) -> float:
    return round(float(x), 3)


def spectral_facts(arrays_by_role: Mapping[str, np.ndarray], valid: np.ndarray) -> dict[str, Any]:
    """Statistics of every index whose two roles are present.

    Returns {index: {"formula", "mean", "median", "p10", "p90", [fraction name], "pixels"}} with
    values rounded to 3 decimals; the fraction is over pixels where the index is defined. An index
    with no defined pixel is left out.
    """
    facts: dict[str, Any] = {}
    for spec in INDICES:
        if spec.a not in arrays_by_role or spec.b not in arrays_by_role:
            continue
        values = normalized_difference(arrays_by_role[spec.a], arrays_by_role[spec.b], valid)
        defined = values[np.isfinite(values)]
        if defined.size == 0:
            continue
        p10, median, p90 = np.percentile(defined, [10, 50, 90])
        entry: dict[str, Any] = {
            "formula": spec.formula,
            "mean": _r(defined.mean()),
            "median": _r(median),
            "p10": _r(p10),
            "p90": _r(p90),
        }
        if spec.fraction_name:
            entry[spec.fraction_name] = _r(np.mean(defined > spec.fraction_threshold))
        entry["pixels"] = int(defined.size)
        facts[spec.name] = entry
    return facts
