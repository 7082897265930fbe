"""Which raster bands make the RGB view, and which bands play which spectral role.

A GeoTIFF says little about its bands: sometimes descriptions ("B8", "nir", "Red"), sometimes a
colour interpretation (red/green/blue/alpha), often nothing. `select_bands` turns whatever is known
(a user's band list, a named sensor preset, the descriptions, the colour interpretation) into a
`BandSelection`: the three 1-based bands shown as RGB and a map from spectral role ("red", "nir",
"swir1", ...) to band index. Roles come only from known information; an unlabelled 4-band raster is
never assumed to be R,G,B,NIR (the facts then say the band order is unknown).

The presets below write down each sensor's band layout in file order, with centre wavelengths (nm)
and native ground sample distances (m), from the agencies' and vendors' published specifications.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from geochat.errors import BandSelectionError

# Roles whose bands the spectral indices need; the loader reads these bands besides the RGB ones.
INDEX_ROLES = ("green", "red", "nir", "swir1", "swir2")


@dataclass(frozen=True)
class SpectralBand:
    """One band of a sensor: its usual name, spectral role, centre wavelength and native GSD."""

    name: str                       # e.g. "B8A"
    role: str | None                # e.g. "nir_narrow"; None for bands without a standard role
    center_nm: float | None         # centre wavelength in nanometres
    resolution_m: float | None      # native ground sample distance in metres


@dataclass(frozen=True)
class SensorPreset:
    """A sensor's band layouts (each in file order) and the bands of its true-colour view."""

    name: str
    description: str
    layouts: tuple[tuple[SpectralBand, ...], ...]
    rgb_names: tuple[str, str, str]

    def __post_init__(self) -> None:
        counts = [len(layout) for layout in self.layouts]
        if len(set(counts)) != len(counts):
            raise ValueError(f"preset {self.name}: two layouts with the same band count")
        for layout in self.layouts:
            names = {b.name for b in layout}
            if not set(self.rgb_names) <= names:
                raise ValueError(f"preset {self.name}: RGB bands {self.rgb_names} missing from a layout")

    @property
    def band_counts(self) -> tuple[int, ...]:
        return tuple(len(layout) for layout in self.layouts)

    def layout_for(self, count: int) -> tuple[SpectralBand, ...] | None:
        """The layout with exactly `count` bands, or None."""
        for layout in self.layouts:
            if len(layout) == count:
                return layout
        return None


@dataclass(frozen=True)
class BandSelection:
    """The bands behind the RGB view and the spectral roles known for the raster.

    `source` says how the RGB bands were chosen: "user" | "descriptions" | "colorinterp" |
    "preset:<name>" | "default".
    """

    rgb: tuple[int, int, int]                        # 1-based band indices shown as R, G, B
    roles: dict[str, int] = field(default_factory=dict)  # role -> 1-based band index
    source: str = "default"

    @property
    def order_known(self) -> bool:
        """True when at least one spectral role (alpha aside) is known."""
        return any(role != "alpha" for role in self.roles)


def _b(name: str, role: str | None, center_nm: float | None, resolution_m: float | None) -> SpectralBand:
    return SpectralBand(name, role, center_nm, resolution_m)


# Sentinel-2 MSI (ESA Sentinel-2 User Handbook; S2A centre wavelengths). L1C products hold 13 bands;
# L2A drops the cirrus band B10, leaving 12. B8 (broad NIR, 10 m) is the "nir" role used by indices.
_S2 = (
    _b("B1", "coastal", 442.7, 60), _b("B2", "blue", 492.4, 10), _b("B3", "green", 559.8, 10),
    _b("B4", "red", 664.6, 10), _b("B5", "red_edge1", 704.1, 20), _b("B6", "red_edge2", 740.5, 20),
    _b("B7", "red_edge3", 782.8, 20), _b("B8", "nir", 832.8, 10), _b("B8A", "nir_narrow", 864.7, 20),
    _b("B9", "water_vapour", 945.1, 60), _b("B10", "cirrus", 1373.5, 60), _b("B11", "swir1", 1613.7, 20),
    _b("B12", "swir2", 2202.4, 20),
)
# Landsat 8/9 OLI + TIRS (USGS Landsat 8-9 Data Users Handbook). Level-1 stacks hold all 11 bands
# (B8 panchromatic is natively 15 m, TIRS 100 m resampled to 30 m); surface reflectance holds B1-B7.
_OLI = (
    _b("B1", "coastal", 443.0, 30), _b("B2", "blue", 482.0, 30), _b("B3", "green", 561.4, 30),
    _b("B4", "red", 654.6, 30), _b("B5", "nir", 864.7, 30), _b("B6", "swir1", 1608.9, 30),
    _b("B7", "swir2", 2200.7, 30), _b("B8", "pan", 589.5, 15), _b("B9", "cirrus", 1373.4, 30),
    _b("B10", "tir1", 10895.0, 100), _b("B11", "tir2", 12005.0, 100),
)
# Landsat 7 ETM+ (USGS Landsat 7 Data Users Handbook): B6 thermal 60 m, B8 panchromatic 15 m.
# Surface reflectance products hold the six reflective bands B1-B5 and B7.
_ETM = (
    _b("B1", "blue", 485.0, 30), _b("B2", "green", 560.0, 30), _b("B3", "red", 660.0, 30),
    _b("B4", "nir", 835.0, 30), _b("B5", "swir1", 1650.0, 30), _b("B6", "tir", 11450.0, 60),
    _b("B7", "swir2", 2220.0, 30), _b("B8", "pan", 710.0, 15),
)
# NAIP (USDA aerial imagery): R, G, B, NIR in that order; 0.6 m since 2018 (1 m before).
_NAIP = (
    _b("R", "red", 635.0, 0.6), _b("G", "green", 555.0, 0.6), _b("B", "blue", 465.0, 0.6),
    _b("NIR", "nir", 845.0, 0.6),
)
# PlanetScope (Planet imagery product specification), 3 m: 4-band analytic is B, G, R, NIR;
# SuperDove (PSB.SD) 8-band adds coastal blue, green I, yellow and red edge.
_PS4 = (
    _b("Blue", "blue", 485.0, 3), _b("Green", "green", 545.0, 3), _b("Red", "red", 630.0, 3),
    _b("NIR", "nir", 820.0, 3),
)
_PS8 = (
    _b("CoastalBlue", "coastal", 443.0, 3), _b("Blue", "blue", 490.0, 3), _b("GreenI", "green_i", 531.0, 3),
    _b("Green", "green", 565.0, 3), _b("Yellow", "yellow", 610.0, 3), _b("Red", "red", 665.0, 3),
    _b("RedEdge", "red_edge", 705.0, 3), _b("NIR", "nir", 865.0, 3),
)


def _worldview(resolution_m: float) -> tuple[SpectralBand, ...]:
    # WorldView-2/-3 8-band multispectral (Maxar spectral response); 1.84 m (WV2) / 1.24 m (WV3) at nadir.
    return (
        _b("Coastal", "coastal", 427.0, resolution_m), _b("Blue", "blue", 478.0, resolution_m),
        _b("Green", "green", 546.0, resolution_m), _b("Yellow", "yellow", 608.0, resolution_m),
        _b("Red", "red", 659.0, resolution_m), _b("RedEdge", "red_edge", 724.0, resolution_m),
        _b("NIR1", "nir", 833.0, resolution_m), _b("NIR2", "nir2", 949.0, resolution_m),
    )


_RGB = (_b("R", "red", None, None), _b("G", "green", None, None), _b("B", "blue", None, None))
_RGBN = (*_RGB, _b("NIR", "nir", None, None))

SENSOR_PRESETS: dict[str, SensorPreset] = {
    p.name: p
    for p in (
        SensorPreset("sentinel2", "Sentinel-2 MSI, 13 bands (L1C) or 12 without B10 (L2A)",
                     (_S2, tuple(b for b in _S2 if b.name != "B10")), ("B4", "B3", "B2")),
        SensorPreset("landsat8", "Landsat 8 OLI/TIRS, 11 bands (Level-1) or B1-B7 (surface reflectance)",
                     (_OLI, _OLI[:7]), ("B4", "B3", "B2")),
        SensorPreset("landsat9", "Landsat 9 OLI-2/TIRS-2, same bands as Landsat 8",
                     (_OLI, _OLI[:7]), ("B4", "B3", "B2")),
        SensorPreset("landsat7", "Landsat 7 ETM+, 8 bands, B1-B7 (7) or reflective B1-B5,B7 (6)",
                     (_ETM, _ETM[:7], tuple(b for b in _ETM[:7] if b.name != "B6")), ("B3", "B2", "B1")),
        SensorPreset("naip", "NAIP aerial R,G,B,NIR (or R,G,B)", (_NAIP, _NAIP[:3]), ("R", "G", "B")),
        SensorPreset("planetscope", "PlanetScope 4-band B,G,R,NIR or 8-band SuperDove",
                     (_PS4, _PS8), ("Red", "Green", "Blue")),
        SensorPreset("worldview2", "WorldView-2 8-band multispectral", (_worldview(1.84),), ("Red", "Green", "Blue")),
        SensorPreset("worldview3", "WorldView-3 8-band multispectral", (_worldview(1.24),), ("Red", "Green", "Blue")),
        SensorPreset("rgb", "plain red, green, blue", (_RGB,), ("R", "G", "B")),
        SensorPreset("rgbn", "red, green, blue, near infrared", (_RGBN,), ("R", "G", "B")),
    )
}

# Descriptions that name a role outright, after lower-casing and removing spaces, "_" and "-".
_ROLE_WORDS: dict[str, str] = {
    "red": "red", "r": "red", "green": "green", "g": "green", "blue": "blue", "b": "blue",
    "nir": "nir", "nearinfrared": "nir", "nearir": "nir", "infrared": "nir", "nir1": "nir", "nir2": "nir2",
    "rededge": "red_edge", "rededge1": "red_edge1", "rededge2": "red_edge2", "rededge3": "red_edge3",
    "swir1": "swir1", "swir16": "swir1", "shortwaveinfrared1": "swir1",
    "swir2": "swir2", "swir22": "swir2", "shortwaveinfrared2": "swir2",
    "coastal": "coastal", "coastalaerosol": "coastal", "coastalblue": "coastal", "yellow": "yellow",
    "pan": "pan", "panchromatic": "pan", "alpha": "alpha",
}
# "SR_B4", "B04", "band 4", "B8A" -> "B4", "B4", "B4", "B8A".
_BAND_NAME = re.compile(r"^(?:SR|TOA|ST)?(?:B|BAND)0*(\d+A?)$")
_ROLE_NAMES_FOR_PRESET_MATCH = ("sentinel2", "landsat8", "landsat7")


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text).lower()


def _band_name(text: str) -> str | None:
    m = _BAND_NAME.match(_squash(text).upper())
    return f"B{m.group(1)}" if m else None


def _roles_from_words(descriptions: Sequence[str | None]) -> dict[str, int]:
    roles: dict[str, int] = {}
    for i, desc in enumerate(descriptions, start=1):
        role = _ROLE_WORDS.get(_squash(desc)) if desc else None
        if role and role not in roles:
            roles[role] = i
    return roles


def _roles_from_band_names(descriptions: Sequence[str | None]) -> dict[str, int]:
    """Roles from "B4"-style names when every description is one and the sensors agree on them.

    "B4" is red for Sentinel-2 and Landsat 8 but NIR for Landsat 7, so the names are matched against
    each multispectral preset and used only when every preset that knows all the names gives them the
    same roles (B1..B12 with B8A is unambiguously Sentinel-2; B2,B3,B4,B8 is not: B8 is Landsat pan).
    """
    names = [_band_name(d) if d else None for d in descriptions]
    if not names or any(n is None for n in names):
        return {}
    readings: list[dict[str, int]] = []
    for preset_name in _ROLE_NAMES_FOR_PRESET_MATCH:
        by_name = {b.name: b.role for layout in SENSOR_PRESETS[preset_name].layouts for b in layout}
        if all(n in by_name for n in names):
            reading: dict[str, int] = {}
            for i, n in enumerate(names, start=1):
                role = by_name[str(n)]
                if role:
                    reading[role] = i
            readings.append(reading)
    if not readings or any(r != readings[0] for r in readings[1:]):
        return {}
    return readings[0]


def _roles_from_colorinterp(color_interp: Sequence[str]) -> dict[str, int]:
    roles: dict[str, int] = {}
    for i, ci in enumerate(color_interp, start=1):
        if ci in ("red", "green", "blue", "alpha") and ci not in roles:
            roles[ci] = i
    return roles


def _preset_roles(preset_name: str, count: int) -> tuple[SensorPreset, dict[str, int]]:
    key = _squash(preset_name)
    if key not in SENSOR_PRESETS:
        raise BandSelectionError(
            f"unknown sensor preset {preset_name!r}; choose one of: {', '.join(SENSOR_PRESETS)}", option="sensor"
        )
    preset = SENSOR_PRESETS[key]
    layout = preset.layout_for(count)
    if layout is None:
        counts = " or ".join(str(c) for c in preset.band_counts)
        raise BandSelectionError(
            f"sensor preset {preset.name!r} expects {counts} bands but the raster has {count}; "
            f"choose the bands by number instead, e.g. {_example(count)}"
        )
    roles = {b.role: i for i, b in enumerate(layout, start=1) if b.role}
    return preset, roles


def _example(count: int) -> str:
    return "3,2,1" if count >= 3 else "1"


def _range_text(count: int) -> str:
    return f"{count} band{'s' if count != 1 else ''} ({'1' if count == 1 else f'1-{count}'})"


def _parse_user_bands(bands: Sequence[int] | str, count: int, descriptions: Sequence[str | None],
                      roles: dict[str, int]) -> tuple[int, int, int]:
    tokens: list[int | str]
    if isinstance(bands, str):
        tokens = [t.strip() for t in bands.split(",") if t.strip()]
    else:
        tokens = list(bands)
    indices: list[int] = []
    for tok in tokens:
        indices.append(_resolve_band(tok, count, descriptions, roles))
    if len(indices) == 1:
        return (indices[0], indices[0], indices[0])
    if len(indices) != 3:
        got = ",".join(str(t) for t in tokens) or "nothing"
        raise BandSelectionError(
            f"a band choice needs one band (grey) or three (red,green,blue); got {len(indices)}: {got}. "
            f"The raster has {_range_text(count)}; e.g. {_example(count)}"
        )
    return (indices[0], indices[1], indices[2])


def _resolve_band(tok: int | str, count: int, descriptions: Sequence[str | None], roles: dict[str, int]) -> int:
    if isinstance(tok, str) and re.fullmatch(r"[+-]?\d+", tok):
        tok = int(tok)
    if isinstance(tok, bool) or not isinstance(tok, (int, str)):
        raise BandSelectionError(f"band {tok!r} is not a band number; bands are numbered from 1, e.g. 3,2,1")
    if isinstance(tok, int):
        if tok < 1:
            raise BandSelectionError(
                f"band {tok} does not exist: band numbers start at 1 and the raster has {_range_text(count)}; "
                f"e.g. {_example(count)}"
            )
        if tok > count:
            hint = "choose three of them, e.g. 3,2,1" if count >= 3 else "choose band 1"
            raise BandSelectionError(f"band {tok} does not exist: the raster has {_range_text(count)}; {hint}")
        return tok
    # A name: a role ("nir") or a description ("B8", "Red").
    if _squash(tok) in roles:
        return roles[_squash(tok)]
    for i, desc in enumerate(descriptions, start=1):
        if desc and (_squash(desc) == _squash(tok) or (_band_name(desc) and _band_name(desc) == _band_name(tok))):
            return i
    known = [d for d in descriptions if d] + sorted(roles)
    names = f"; known names: {', '.join(known)}" if known else ""
    raise BandSelectionError(
        f"band {tok!r} is neither a band number (1-{count}) nor a band name of this raster{names}; "
        f"e.g. {_example(count)}"
    )


def select_bands(count: int, descriptions: Sequence[str | None], color_interp: Sequence[str],
                 bands: Sequence[int] | str | None = None, sensor: str | None = None) -> BandSelection:
    """Choose the RGB bands and the spectral roles of a raster with `count` bands.

    Roles come from the sensor preset when given, else from the band descriptions (role words such
    as "nir", or sensor band names such as "B8A"), else from the colour interpretation; an alpha band
    is always taken from the colour interpretation. The RGB bands are the user's list when given,
    else the preset's true-colour bands, else the red/green/blue roles, else band 1 as grey (1-2
    bands) or bands 1,2,3 (the "default", with the band order unknown).

    Raises BandSelectionError with a message that says which bands exist and what to pass.
    """
    if count < 1:
        raise BandSelectionError("the raster has no bands", option=None)
    descriptions = list(descriptions) + [None] * (count - len(descriptions))
    source = "default"
    rgb: tuple[int, int, int] | None = None
    if sensor:
        preset, roles = _preset_roles(sensor, count)
        layout = preset.layout_for(count) or ()
        idx = {b.name: i for i, b in enumerate(layout, start=1)}
        rgb = (idx[preset.rgb_names[0]], idx[preset.rgb_names[1]], idx[preset.rgb_names[2]])
        source = f"preset:{preset.name}"
    else:
        roles = _roles_from_words(descriptions) or _roles_from_band_names(descriptions)
        if roles:
            source = "descriptions"
        else:
            roles = {k: v for k, v in _roles_from_colorinterp(color_interp).items() if k != "alpha"}
            source = "colorinterp" if roles else "default"
    alpha = _roles_from_colorinterp(color_interp).get("alpha")
    if alpha is not None and "alpha" not in roles:
        roles["alpha"] = alpha

    if bands is not None and not (isinstance(bands, str) and not bands.strip()):
        return BandSelection(_parse_user_bands(bands, count, descriptions, roles), roles, "user")
    if rgb is None and all(r in roles for r in ("red", "green", "blue")):
        rgb = (roles["red"], roles["green"], roles["blue"])
    if rgb is None:
        source = "default"
        data_bands = [i for i in range(1, count + 1) if i != roles.get("alpha")] or [1]
        rgb = (data_bands[0],) * 3 if len(data_bands) < 3 else (data_bands[0], data_bands[1], data_bands[2])
    return BandSelection(rgb, roles, source)
