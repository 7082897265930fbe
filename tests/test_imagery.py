"""Tests of geochat.imagery: reading, band selection, stretch, masks, indices, errors, large rasters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.env import get_gdal_config

from geochat.errors import BandSelectionError, ImageryError
from geochat.imagery import (
    SENSOR_PRESETS,
    load_image,
    normalized_difference,
    pad_to_square,
    read_info,
    read_window,
    select_bands,
)
from tests.data import make_fixtures as mf

REPO = Path(__file__).resolve().parents[1]
SHARED_GEOREF = Path(__file__).resolve().parents[2] / "shared" / "data" / "georef"

S2 = "s2_13band_uint16_utm33.tif"
L8 = "landsat8_int16_utm18.tif"
RGB = "rgb_uint8_3857.tif"
GRAY = "gray_float32_nan_4326.tif"
LCC = "float64_lcc.tif"
PNG = "nongeo.png"
RECT = "rect_600x300_utm.tif"
SPARSE = "sparse_20000.tif"
GOOD = (S2, L8, RGB, GRAY, LCC, PNG, RECT, SPARSE)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return mf.make_all(tmp_path_factory.mktemp("imagery"))


def _raw(path: Path, band: int) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(band)


# --- every fixture loads, metadata reported right ---------------------------------------------------


@pytest.mark.parametrize("name", GOOD)
def test_every_fixture_loads(fixtures: dict[str, Path], name: str) -> None:
    im = load_image(fixtures[name], max_size=512)
    assert im.rgb.dtype == np.uint8 and im.rgb.ndim == 3 and im.rgb.shape[2] == 3
    assert max(im.rgb.shape[:2]) <= 512
    assert im.valid.shape == im.rgb.shape[:2] and im.valid.dtype == bool
    assert im.scale >= 1.0
    assert not im.rgb[~im.valid].any()
    json.dumps(im.facts, allow_nan=False)  # strict JSON: no NaN, no numpy scalars


@pytest.mark.parametrize(("name", "dtype", "crs", "count"), [
    (S2, "uint16", "EPSG:32633", 13),
    (L8, "int16", "EPSG:32618", 7),
    (RGB, "uint8", "EPSG:3857", 3),
    (GRAY, "float32", "EPSG:4326", 1),
    (PNG, "uint8", None, 3),
    (RECT, "uint8", "EPSG:32618", 3),
])
def test_metadata_reported(fixtures: dict[str, Path], name: str, dtype: str, crs: str | None, count: int) -> None:
    im = load_image(fixtures[name])
    assert (im.info.dtype, im.info.crs, im.info.count) == (dtype, crs, count)
    assert (im.facts["dtype"], im.facts["crs"], im.facts["band_count"]) == (dtype, crs, count)
    assert im.info.georeferenced is (crs is not None)


def test_custom_crs_is_wkt_and_not_epsg(fixtures: dict[str, Path]) -> None:
    info = read_info(fixtures[LCC])
    assert info.crs is not None and info.crs.startswith(("PROJCS", "PROJCRS"))
    assert "Lambert_Conformal_Conic" in info.crs or "Lambert Conic Conformal" in info.crs
    assert info.gsd_m == pytest.approx(1000.0)
    assert load_image(fixtures[LCC]).facts["crs"] == "custom (lcc)"


def test_png_not_georeferenced(fixtures: dict[str, Path]) -> None:
    info = read_info(fixtures[PNG])
    assert info.transform is None and info.crs is None and info.gsd_m is None and info.bounds_lonlat is None


# --- masks and stretch ------------------------------------------------------------------------------


def test_nodata_corner_is_zero_and_invalid(fixtures: dict[str, Path]) -> None:
    im = load_image(fixtures[S2])
    c = mf.S2_NODATA_CORNER
    assert not im.valid[:c, :c].any() and im.valid.sum() == mf.S2_SIZE**2 - c * c
    assert (im.rgb[:c, :c] == 0).all()
    assert im.rgb[c:, c:].max() > 0
    assert im.facts["nodata_fraction"] == round(c * c / mf.S2_SIZE**2, 3)


def test_negative_nodata_row_invalid(fixtures: dict[str, Path]) -> None:
    im = load_image(fixtures[L8])
    assert not im.valid[-1].any() and im.valid[:-1].all()


def test_nan_pixels_invalid(fixtures: dict[str, Path]) -> None:
    im = load_image(fixtures[GRAY])
    assert not im.valid[:, 0].any() and im.valid[:, 1:].all()
    assert (im.rgb[:, 0] == 0).all()
    assert im.facts["nodata"] == "NaN"


def test_nodata_survives_decimation(fixtures: dict[str, Path]) -> None:
    im = load_image(fixtures[S2], max_size=16)   # 4 original pixels per preview pixel
    assert im.rgb.shape == (16, 16, 3) and im.scale == 4.0
    assert not im.valid[:2, :2].any() and im.valid[2:, :].all() and im.valid[:, 2:].all()


def test_percentile_stretch_on_known_gradient() -> None:
    ramp = np.tile(np.arange(1001, dtype=np.uint16), (4, 1))   # 0..1000: p2 = 20, p98 = 980
    im = load_image(ramp)
    grey = im.rgb[0, :, 0]
    assert (im.rgb[..., 0] == im.rgb[..., 1]).all() and (im.rgb[..., 1] == im.rgb[..., 2]).all()
    assert grey[20] == 0 and grey[:20].max() == 0
    assert grey[980] == 255 and grey[980:].min() == 255
    expected = np.rint(np.clip((np.arange(1001) - 20) * 255 / 960, 0, 255)).astype(np.uint8)
    assert (grey == expected).all()
    assert im.stretch is not None and im.stretch.limits[0] == pytest.approx((20.0, 980.0))


def test_percentile_mode_on_uint8_and_auto_passthrough(fixtures: dict[str, Path]) -> None:
    raw = _raw(fixtures[RGB], 1)                      # each row 0..255
    auto = load_image(fixtures[RGB])
    assert (auto.rgb[..., 0] == raw).all()            # 8-bit data keeps its values under "auto"
    assert (auto.rgb[..., 2] == 77).all()
    pct = load_image(fixtures[RGB], stretch="percentile")
    lo, hi = np.percentile(raw, [2, 98])
    expected = np.rint(np.clip((raw.astype(float) - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)
    assert (pct.rgb[..., 0] == expected).all()
    assert (pct.rgb[..., 2] == 128).all()             # constant band: mid-grey, no division by zero


def test_an_8bit_mask_or_class_map_is_spread_not_shown_black() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 1                                 # a 0/1 land mask, as world_wgs84.tif holds
    im = load_image(mask)
    assert set(np.unique(im.rgb).tolist()) == {0, 255}
    classes = (np.arange(600).reshape(20, 30) % 6).astype(np.uint8)  # codes 0..5
    assert sorted(np.unique(load_image(classes).rgb[..., 0]).tolist()) == [0, 51, 102, 153, 204, 255]
    one_to_five = (classes % 5 + 1).astype(np.uint8)      # codes 1..5: code 1 is not drawn black like nodata
    assert load_image(one_to_five).rgb.min() == 51
    red_only = np.zeros((20, 30, 3), np.uint8)
    red_only[:10, :, 0] = 1                               # a mask in one channel: the others stay black
    shown = load_image(red_only).rgb
    assert (shown[:10, :, 0] == 255).all() and not shown[..., 1:].any() and not shown[10:].any()
    photo = np.full((20, 30, 3), 16, np.uint8)            # past the codes: a (dark) picture keeps its values
    photo[0, 0] = 40
    assert (load_image(photo).rgb == photo).all()


def test_constant_and_all_invalid_bands_do_not_crash() -> None:
    const = load_image(np.full((8, 8), 7, dtype=np.uint16))
    assert (const.rgb == 128).all()
    nan = load_image(np.full((8, 8), np.nan, dtype=np.float32))
    assert not nan.valid.any() and not nan.rgb.any() and nan.facts["nodata_fraction"] == 1.0


def test_rgba_alpha_masks() -> None:
    a = np.full((10, 10, 4), 100, np.uint8)
    a[:4, :, 3] = 0
    im = load_image(Image.fromarray(a, "RGBA"))
    assert im.bands.roles["alpha"] == 4 and im.bands.rgb == (1, 2, 3)
    assert not im.valid[:4].any() and im.valid[4:].all() and (im.rgb[:4] == 0).all()


# --- sources -----------------------------------------------------------------------------------------


def test_bytes_pil_and_numpy_match_the_file(fixtures: dict[str, Path]) -> None:
    ref = load_image(fixtures[PNG]).rgb
    assert (load_image(fixtures[PNG].read_bytes()).rgb == ref).all()
    pil = Image.open(fixtures[PNG])
    assert (load_image(pil).rgb == ref).all()
    assert (load_image(np.asarray(pil)).rgb == ref).all()
    assert (load_image(pil.convert("P")).rgb.shape == ref.shape)


def test_jpeg_loads(tmp_path: Path) -> None:
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 30:] = (200, 60, 20)
    Image.fromarray(arr).save(tmp_path / "photo.jpg", quality=95)
    im = load_image(tmp_path / "photo.jpg")
    assert im.info.crs is None and im.bands.rgb == (1, 2, 3) and im.rgb.shape == (40, 60, 3)
    assert np.abs(im.rgb[20, 50].astype(int) - (200, 60, 20)).max() < 8   # lossy, but the colour holds


def test_palette_png_expands_to_colours(tmp_path: Path, fixtures: dict[str, Path]) -> None:
    pil = Image.open(fixtures[PNG]).convert("P")
    pil.save(tmp_path / "pal.png")
    im = load_image(tmp_path / "pal.png")
    assert (im.rgb == np.asarray(pil.convert("RGB"))).all()
    dark = Image.fromarray(np.arange(4, dtype=np.uint8).repeat(8).reshape(4, 8), "P")  # a palette of dark colours
    dark.putpalette([0, 0, 0, 3, 1, 2, 5, 5, 5, 9, 0, 4] + [0] * 756)
    dark.save(tmp_path / "dark.png")
    assert (load_image(tmp_path / "dark.png").rgb == np.asarray(dark.convert("RGB"))).all()  # colours, not codes


# --- band selection ----------------------------------------------------------------------------------


def test_s2_bands_from_descriptions(fixtures: dict[str, Path]) -> None:
    im = load_image(fixtures[S2])
    assert im.bands.rgb == (4, 3, 2) and im.bands.source == "descriptions"
    assert {k: im.bands.roles[k] for k in ("nir", "swir1", "swir2", "red_edge1", "nir_narrow")} == {
        "nir": 8, "swir1": 12, "swir2": 13, "red_edge1": 5, "nir_narrow": 9}
    assert im.facts["band_order"] == "known" and im.facts["rgb_bands"] == [4, 3, 2]


def test_s2_l2a_twelve_band_names() -> None:
    names = [b for b in mf.S2_BANDS if b != "B10"]
    sel = select_bands(12, ["SR_" + n if i % 2 else n for i, n in enumerate(names)], ["gray"] * 12)
    assert sel.rgb == (4, 3, 2)
    assert (sel.roles["nir"], sel.roles["swir1"], sel.roles["swir2"]) == (8, 11, 12)


def test_ambiguous_band_names_give_no_roles() -> None:
    # B8 is NIR on Sentinel-2 but panchromatic on Landsat 8, and B4 is NIR on Landsat 7.
    sel = select_bands(4, ["B2", "B3", "B4", "B8"], ["gray"] + ["undefined"] * 3)
    assert sel.roles == {} and sel.source == "default" and sel.rgb == (1, 2, 3) and not sel.order_known


def test_role_words_in_descriptions() -> None:
    sel = select_bands(4, ["Red", "Green", "Blue", "Near Infrared"], ["undefined"] * 4)
    assert sel.rgb == (1, 2, 3) and sel.roles == {"red": 1, "green": 2, "blue": 3, "nir": 4}


def test_unknown_four_band_raster_never_guesses_nir(fixtures: dict[str, Path]) -> None:
    sel = select_bands(4, [None] * 4, ["gray", "undefined", "undefined", "undefined"])
    assert sel.roles == {} and sel.rgb == (1, 2, 3)
    im = load_image(np.zeros((6, 6, 4), np.uint16) + np.arange(4, dtype=np.uint16))
    assert im.facts["band_order"] == "unknown" and im.facts["spectral_indices"] == {}
    assert "sensor preset" in im.facts["band_order_hint"]


@pytest.mark.parametrize(("bands", "rgb"), [([4, 3, 2], (4, 3, 2)), ("4,3,2", (4, 3, 2)), ("8", (8, 8, 8)),
                                              ([8], (8, 8, 8)), ("B8, B4, B3", (8, 4, 3)), ("nir,red,green", (8, 4, 3))])
def test_user_bands(fixtures: dict[str, Path], bands: list[int] | str, rgb: tuple[int, int, int]) -> None:
    im = load_image(fixtures[S2], bands=bands)
    assert im.bands.rgb == rgb and im.bands.source == "user"
    assert im.bands.roles["nir"] == 8   # roles stay known


def test_user_band_order_swaps_channels(fixtures: dict[str, Path]) -> None:
    a = load_image(fixtures[S2], bands=[4, 3, 2]).rgb
    b = load_image(fixtures[S2], bands=[2, 3, 4]).rgb
    assert (a[..., 0] == b[..., 2]).all() and (a[..., 2] == b[..., 0]).all()
    assert not (a[..., 0] == a[..., 2]).all()


def test_sensor_preset_landsat8(fixtures: dict[str, Path]) -> None:
    assert load_image(fixtures[L8]).facts["band_order"] == "unknown"   # no metadata: nothing assumed
    im = load_image(fixtures[L8], sensor="landsat8")
    assert im.bands.rgb == (4, 3, 2) and im.bands.source == "preset:landsat8"
    assert (im.bands.roles["nir"], im.bands.roles["swir1"], im.bands.roles["swir2"]) == (5, 6, 7)
    assert im.facts["sensor"] == "landsat8"
    assert set(im.facts["spectral_indices"]) == {"ndvi", "ndwi", "mndwi", "ndbi", "nbr"}


@pytest.mark.parametrize(("sensor", "count", "rgb", "nir"), [
    ("sentinel2", 13, (4, 3, 2), 8), ("sentinel2", 12, (4, 3, 2), 8), ("landsat7", 6, (3, 2, 1), 4),
    ("landsat9", 11, (4, 3, 2), 5), ("naip", 4, (1, 2, 3), 4), ("planetscope", 4, (3, 2, 1), 4),
    ("planetscope", 8, (6, 4, 2), 8), ("worldview3", 8, (5, 3, 2), 7), ("rgbn", 4, (1, 2, 3), 4),
])
def test_presets(sensor: str, count: int, rgb: tuple[int, int, int], nir: int) -> None:
    sel = select_bands(count, [None] * count, ["undefined"] * count, sensor=sensor)
    assert sel.rgb == rgb and sel.roles["nir"] == nir and sel.source == f"preset:{sensor}"


def test_presets_record_wavelengths_and_resolution() -> None:
    s2 = {b.name: b for b in SENSOR_PRESETS["sentinel2"].layouts[0]}
    assert s2["B4"].center_nm == pytest.approx(664.6) and s2["B4"].resolution_m == 10
    assert s2["B11"].role == "swir1" and s2["B11"].resolution_m == 20
    assert SENSOR_PRESETS["sentinel2"].band_counts == (13, 12)


def test_band_out_of_range_message(fixtures: dict[str, Path]) -> None:
    with pytest.raises(BandSelectionError) as exc:
        select_bands(4, [None] * 4, ["undefined"] * 4, bands=[5, 3, 2])
    assert str(exc.value) == "band 5 does not exist: the raster has 4 bands (1-4); choose three of them, e.g. 3,2,1"
    with pytest.raises(BandSelectionError, match=r"band 14 does not exist: the raster has 13 bands \(1-13\)"):
        load_image(fixtures[S2], bands="4,3,14")
    with pytest.raises(BandSelectionError, match=r"the raster has 1 band \(1\); choose band 1"):
        load_image(fixtures[GRAY], bands=[2])


def test_wrong_number_of_bands_message() -> None:
    with pytest.raises(BandSelectionError, match=r"needs one band \(grey\) or three \(red,green,blue\); got 2: 4,3"):
        select_bands(13, [None] * 13, ["undefined"] * 13, bands="4,3")
    with pytest.raises(BandSelectionError, match="band numbers start at 1"):
        select_bands(3, [None] * 3, ["undefined"] * 3, bands=[0, 1, 2])
    with pytest.raises(BandSelectionError, match="neither a band number .* nor a band name"):
        select_bands(3, [None] * 3, ["undefined"] * 3, bands="nir,1,2")


def test_preset_errors() -> None:
    with pytest.raises(BandSelectionError, match="unknown sensor preset 'modis'; choose one of: sentinel2, landsat8"):
        select_bands(7, [None] * 7, ["undefined"] * 7, sensor="modis")
    with pytest.raises(BandSelectionError, match="'sentinel2' expects 13 or 12 bands but the raster has 4"):
        select_bands(4, [None] * 4, ["undefined"] * 4, sensor="sentinel2")


# --- spectral indices --------------------------------------------------------------------------------


def _hand_index(path: Path, a: int, b: int) -> np.ndarray:
    with rasterio.open(path) as ds:
        x, y = ds.read(a).astype(float), ds.read(b).astype(float)
        ok = (x != ds.nodata) & (y != ds.nodata)
    return (x[ok] - y[ok]) / (x[ok] + y[ok])


@pytest.mark.parametrize(("index", "a", "b", "fraction", "threshold"), [
    ("ndvi", 8, 4, "vegetation_fraction", 0.3), ("ndwi", 3, 8, "water_fraction", 0.0),
    ("ndbi", 12, 8, "built_up_fraction", 0.0), ("nbr", 8, 13, None, None),
])
def test_index_facts_match_hand_computation(fixtures: dict[str, Path], index: str, a: int, b: int,
                                            fraction: str | None, threshold: float | None) -> None:
    facts = load_image(fixtures[S2]).facts["spectral_indices"][index]
    vals = _hand_index(fixtures[S2], a, b)
    assert facts["pixels"] == vals.size == mf.S2_SIZE**2 - mf.S2_NODATA_CORNER**2
    assert facts["mean"] == round(float(vals.mean()), 3)
    assert facts["median"] == round(float(np.median(vals)), 3)
    assert facts["p10"] == round(float(np.percentile(vals, 10)), 3)
    assert facts["p90"] == round(float(np.percentile(vals, 90)), 3)
    if fraction:
        assert facts[fraction] == round(float((vals > threshold).mean()), 3)


def test_vegetation_and_water_halves(fixtures: dict[str, Path]) -> None:
    idx = load_image(fixtures[S2]).facts["spectral_indices"]
    half, corner = mf.S2_SIZE * mf.S2_SIZE // 2, mf.S2_NODATA_CORNER**2
    n_valid = 2 * half - corner
    assert idx["ndvi"]["vegetation_fraction"] == round((half - corner) / n_valid, 3)   # left half
    assert idx["ndwi"]["water_fraction"] == round(half / n_valid, 3)                    # right half
    veg = mf.S2_VEGETATION
    assert idx["ndvi"]["p90"] == pytest.approx((veg["B8"] - veg["B4"]) / (veg["B8"] + veg["B4"]), abs=0.01)


def test_normalized_difference_safe_divide() -> None:
    a = np.array([[1.0, 0.0, 3.0, np.nan]])
    b = np.array([[1.0, 0.0, 1.0, 1.0]])
    valid = np.array([[True, True, False, True]])
    out = normalized_difference(a, b, valid)
    assert out[0, 0] == 0.0 and np.isnan(out[0, 1]) and np.isnan(out[0, 2]) and np.isnan(out[0, 3])


# --- errors ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageryError, match="file not found: .*nope.tif; check the path"):
        load_image(tmp_path / "nope.tif")
    with pytest.raises(ImageryError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("name", ["corrupt.tif", "text_as.tif"])
def test_not_a_raster(fixtures: dict[str, Path], name: str) -> None:
    with pytest.raises(ImageryError, match="is not a readable raster .*download or export it again"):
        load_image(fixtures[name])
    with pytest.raises(ImageryError, match="the uploaded image is not a readable raster"):
        load_image(fixtures[name].read_bytes())


def test_truncated_pixels(fixtures: dict[str, Path]) -> None:
    with pytest.raises(ImageryError, match="truncated.tif is truncated or corrupt: reading its pixels failed"):
        load_image(fixtures["truncated.tif"])


def test_other_bad_inputs(fixtures: dict[str, Path]) -> None:
    with pytest.raises(ImageryError, match="bytes are empty"):
        load_image(b"")
    with pytest.raises(ImageryError, match="cannot read an image from a int"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ImageryError, match=r"np.moveaxis\(array, 0, -1\)"):
        load_image(np.zeros((3, 100, 100), np.uint8))
    with pytest.raises(ImageryError, match="more than the limit of 1,000,000 for one view; ask about it tile by tile"):
        load_image(fixtures[SPARSE], max_pixels=1_000_000)


# --- large rasters and windows -----------------------------------------------------------------------


def test_sparse_20000_decimated_with_small_memory(fixtures: dict[str, Path]) -> None:
    # Measured in a fresh process, by the peak RSS of its own address space (Linux VmHWM): getrusage's
    # ru_maxrss survives fork+exec on Linux, so it would start at pytest's own (torch-sized) peak.
    if not Path("/proc/self/status").exists():
        pytest.skip("peak-memory check reads /proc/self/status (Linux)")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from geochat.imagery import load_image

        def peak_kb():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

        before = peak_kb()
        im = load_image({str(fixtures[SPARSE])!r}, max_size=1024)
        print(peak_kb() - before, im.rgb.shape[0], im.rgb.shape[1], int(im.rgb.max()), im.valid.mean(), im.scale)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    grow, h, w, vmax, valid_frac, scale = out.stdout.split()
    assert int(grow) / 1024 < 300, f"peak RSS grew by {int(grow) / 1024:.0f} MB reading a 20000x20000 raster"
    assert (int(h), int(w)) == (1024, 1024) and float(scale) == pytest.approx(20000 / 1024)
    assert int(vmax) == mf.SPARSE_VALUE
    blocks = len(mf.SPARSE_BLOCKS) * mf.SPARSE_BLOCK**2 / mf.SPARSE_SIZE**2
    assert float(valid_frac) == pytest.approx(blocks, rel=0.1)


def test_read_window_on_sparse(fixtures: dict[str, Path]) -> None:
    col, row = mf.SPARSE_BLOCKS[1]
    tile = read_window(fixtures[SPARSE], (col - 256, row - 256, 1024, 1024), out_size=256)
    assert tile.shape == (256, 256, 3)
    assert (tile[64:192, 64:192] == mf.SPARSE_VALUE).all()   # the data block, at a quarter scale
    assert (tile[:64] == 0).all()                            # nodata around it
    with pytest.raises(ImageryError, match="is not inside .* 20000x20000 pixels"):
        read_window(fixtures[SPARSE], (19_900, 0, 200, 200))


def test_read_window_matches_overview_stretch(fixtures: dict[str, Path]) -> None:
    full = load_image(fixtures[S2])
    tile = read_window(fixtures[S2], (32, 8, 32, 40), stretch=full.stretch)
    assert (tile == full.rgb[8:48, 32:64]).all()
    assert read_window(fixtures[S2], (0, 0, 64, 32), out_size=(16, 8)).shape == (8, 16, 3)


def test_gdal_cache_setting_restored_inside_outer_env(fixtures: dict[str, Path]) -> None:
    with rasterio.Env(GDAL_CACHEMAX=200_000_000):
        load_image(fixtures[S2])
        assert get_gdal_config("GDAL_CACHEMAX") == 200_000_000


# --- pad_to_square -----------------------------------------------------------------------------------


def test_pad_to_square_wide_and_tall() -> None:
    wide = np.full((2, 5, 3), 9, np.uint8)
    sq, (left, top) = pad_to_square(wide, fill=(1, 2, 3))
    assert sq.shape == (5, 5, 3) and (left, top) == (0, 1)
    assert (sq[1:3] == 9).all() and (sq[0] == (1, 2, 3)).all() and (sq[3:] == (1, 2, 3)).all()
    tall = np.full((7, 4, 3), 9, np.uint8)
    sq, (left, top) = pad_to_square(tall)
    assert sq.shape == (7, 7, 3) and (left, top) == (1, 0) and (sq[:, 1:5] == 9).all() and not sq[:, 0].any()
    same, off = pad_to_square(np.ones((3, 3, 3), np.uint8))
    assert off == (0, 0) and same.shape == (3, 3, 3)


# --- the real rasters in ../shared/data/georef -------------------------------------------------------

real = pytest.mark.skipif(not SHARED_GEOREF.is_dir(), reason=f"real data not present at {SHARED_GEOREF}")


@real
@pytest.mark.parametrize("name", sorted(p.name for p in SHARED_GEOREF.glob("*.tif")) if SHARED_GEOREF.is_dir() else [])
def test_real_raster_loads(name: str) -> None:
    im = load_image(SHARED_GEOREF / name)
    assert im.rgb.dtype == np.uint8 and im.rgb.shape[2] == 3 and im.valid.any()
    assert not im.rgb[~im.valid].any()
    json.dumps(im.facts, allow_nan=False)


@real
def test_real_landsat_utm18() -> None:
    im = load_image(SHARED_GEOREF / "landsat_rgb_utm18.tif")
    assert im.info.crs == "EPSG:32618" and im.info.gsd_m == pytest.approx(300.0, abs=1.0)
    assert im.bands.rgb == (1, 2, 3) and 0.1 < im.facts["nodata_fraction"] < 0.9


@real
def test_real_complex_sar_is_amplitude_in_db() -> None:
    path = SHARED_GEOREF / "sar_hh.tif"
    im = load_image(path)
    assert im.info.dtype == "complex64" and "dB" in im.facts["display"]
    db = 20 * np.log10(np.maximum(np.abs(_raw(path, 1)).astype(np.float64), 1e-10))
    lo, hi = np.percentile(db, [2, 98])
    expected = np.rint(np.clip((db - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)
    assert (im.rgb[..., 0] == expected).all()


@real
def test_real_world_wgs84_bounds() -> None:
    info = read_info(SHARED_GEOREF / "world_wgs84.tif")
    west, south, east, north = info.bounds_lonlat or (0, 0, 0, 0)
    assert (west, east) == pytest.approx((-180, 180)) and south < -60 and north > 60
    assert info.gsd_m == pytest.approx(0.125 * 111_000, rel=0.01)


@real
def test_real_float_nan_not_georeferenced() -> None:
    im = load_image(SHARED_GEOREF / "float_nan.tif")
    assert not im.info.georeferenced and im.info.crs is None and im.info.bounds_lonlat is None
    assert not im.valid.all() and (im.rgb[~im.valid] == 0).all()


@real
def test_real_rgba_alpha_and_unknown_multispectral() -> None:
    rgba = load_image(SHARED_GEOREF / "rgba_uint16.tif")
    assert rgba.bands.rgb == (3, 2, 1) and rgba.bands.roles["alpha"] == 4   # colorinterp: B, G, R, A
    alpha = _raw(SHARED_GEOREF / "rgba_uint16.tif", 4)
    assert rgba.valid.mean() == pytest.approx((alpha > 0).mean())
    assert (rgba.rgb[rgba.valid] == 128).all()   # the RGB bands are constant 10000 under the alpha
    ms = load_image(SHARED_GEOREF / "multispectral_4band_float64.tif")
    assert ms.facts["band_order"] == "unknown" and "nir" not in ms.bands.roles


# -- rasters found by review: CInt16 SAR, CRSs without lon/lat, SAR fill, undeclared NaN -----------

def _write(path: Path, arr: np.ndarray, **profile: object) -> Path:
    import rasterio

    arr = arr if arr.ndim == 3 else arr[None]
    dtype = profile.pop("dtype", arr.dtype.name)
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=dtype, **profile) as ds:
        ds.write(arr)
    return path


def test_complex_int16_sar_reads_as_amplitude(tmp_path: Path) -> None:
    """Sentinel-1 SLC stores CInt16, a dtype numpy has no name for."""
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    for size in (16, 1500):  # read whole, and decimated to the preview
        z = (rng.integers(-300, 300, (size, size)) + 1j * rng.integers(-300, 300, (size, size))).astype(np.complex64)
        path = _write(tmp_path / f"slc{size}.tif", z, dtype="complex_int16", crs="EPSG:32631",
                      transform=from_origin(500000, 5700000, 10, 10))
        loaded = load_image(path)
        assert loaded.rgb.shape[:2] == (min(size, 1024),) * 2 and loaded.rgb.std() > 10
        assert "SAR amplitude" in loaded.facts["display"]


def test_a_decimated_sar_view_is_multilooked_against_speckle(tmp_path: Path) -> None:
    """Fully developed speckle (circular Gaussian z) over a field 20 dB brighter than its neighbour: one sample
    a pixel spreads each field over ~5.6 dB; the mean intensity of 2 × 2 samples (a 2048 px scene shown at
    1024) about halves that, so the two fields separate far more clearly in the view."""
    rng = np.random.default_rng(0)
    size = 2048
    z = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))).astype(np.complex64)
    z[:, size // 2:] *= 10.0  # +20 dB
    z[:, :8] = 0  # a fill border, no nodata declared
    loaded = load_image(_write(tmp_path / "slc.tif", z))
    assert loaded.rgb.shape[:2] == (1024, 1024)
    grey = loaded.rgb[..., 0].astype(float)
    dark, bright = grey[:, 16:480], grey[:, 560:1000]
    separation = (bright.mean() - dark.mean()) / np.sqrt((dark.var() + bright.var()) / 2)
    assert separation > 5.5, separation  # one sample a pixel: 3.7
    assert (loaded.rgb[:, :4] == 0).all() and loaded.valid[:, :4].all()  # the fill stays black (zero amplitude)


def test_a_crs_without_lonlat_still_opens_with_pixel_boxes_only(tmp_path: Path) -> None:
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    local = CRS.from_wkt('LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]')
    path = _write(tmp_path / "site.tif", np.arange(100, dtype=np.uint16).reshape(10, 10), crs=local,
                  transform=from_origin(0, 10, 1, 1))
    loaded = load_image(path)
    assert loaded.facts["bounds_lonlat"] is None and loaded.facts["gsd_m"] == 1.0
    from geochat.imagery.geo import pixel_to_lonlat

    assert pixel_to_lonlat(loaded.info, [(1, 1)]) is None  # boxes stay in pixels; no GeoJSON


def test_sar_fill_of_zeros_does_not_wash_out_the_stretch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    z = ((rng.normal(size=(200, 200)) + 1j * rng.normal(size=(200, 200))) * 100).astype(np.complex64)
    z[:, :40] = 0  # the scene's border, no nodata declared
    loaded = load_image(_write(tmp_path / "sar.tif", z))
    scene = loaded.rgb[:, 40:].astype(float)
    assert (loaded.rgb[:, :40] == 0).all()  # the fill shows black
    assert 120 < scene.mean() < 175 and scene.std() > 40  # the scene keeps its contrast (was ~197, flat)


def test_undeclared_nan_is_not_averaged_into_a_decimated_view(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 2000)).astype(np.float32)
    f[::3, ::3] = np.nan  # 11 % NaN, and the file does not say NaN is nodata
    loaded = load_image(_write(tmp_path / "nan.tif", f))
    assert loaded.rgb.shape[:2] == (1024, 1024)
    assert 0.05 < loaded.facts["nodata_fraction"] < 0.2  # averaging made it 0.96, a black preview


def test_a_decimated_float_view_averages_its_finite_values(tmp_path: Path) -> None:
    """A float raster without a nodata value, shown at half size: a one-pixel checkerboard of 0 and 1 must come
    out as the grey between its 0 and 1 neighbours (one nearest sample a pixel shows all 0 or all 1), and
    a strip of NaN as nodata, not as the average of its neighbours."""
    f = np.zeros((2048, 2048), np.float32)
    f[:, 512:1536] = np.indices((2048, 1024)).sum(axis=0) % 2  # the checkerboard between a 0 and a 1 field
    f[:, 1536:] = 1.0
    f[:, :16] = np.nan
    f[::3, 700:800] = np.nan  # a third of the rows: every output pixel keeps most of its samples
    loaded = load_image(_write(tmp_path / "reflectance.tif", f))
    assert loaded.rgb.shape[:2] == (1024, 1024)
    grey = loaded.rgb[..., 0].astype(float)
    low, high, middle = grey[:, 100:200].mean(), grey[:, 900:1000].mean(), grey[:, 300:700].mean()
    assert high - low > 200 and abs(middle - (low + high) / 2) < 0.1 * (high - low), (low, middle, high)
    assert not loaded.valid[:, :8].any() and loaded.valid[:, 8:].all()
    assert abs(grey[:, 350:400].mean() - middle) < 0.1 * (high - low)  # the sparse NaN rows left no mark


def test_spectral_indices_use_the_files_scale_and_offset(tmp_path: Path) -> None:
    """Landsat Collection 2 L2 stores reflectance as DN · 2.75e-5 − 0.2 (tags in the file)."""
    import rasterio

    reflectance = [0.03, 0.04, 0.06, 0.05, 0.30, 0.20, 0.10]  # bands 1-7; red 0.05, NIR 0.30
    dn = np.stack([np.full((20, 20), round((r + 0.2) / 2.75e-5), np.uint16) for r in reflectance])
    path = tmp_path / "lc2.tif"
    with rasterio.open(path, "w", driver="GTiff", width=20, height=20, count=7, dtype="uint16") as ds:
        ds.write(dn)
        ds.scales, ds.offsets = [2.75e-5] * 7, [-0.2] * 7
    ndvi = load_image(path, sensor="landsat8").facts["spectral_indices"]["ndvi"]["mean"]
    assert ndvi == pytest.approx((0.30 - 0.05) / (0.30 + 0.05), abs=1e-3)  # 0.714; the DNs alone give 0.333


def test_a_crs_without_a_geotransform_is_not_georeferenced(tmp_path: Path) -> None:
    """GDAL's identity default would put pixel (0, 0) at lon 0, lat 0 and rows at latitudes 1, 2, ... 200."""
    path = _write(tmp_path / "crs_only.tif", np.ones((300, 300), np.uint8), crs="EPSG:4326")
    info = read_info(path)
    assert info.crs == "EPSG:4326" and info.transform is None and info.bounds_lonlat is None


def test_a_cut_png_is_refused_not_read_as_garbage(tmp_path: Path) -> None:
    """GDAL's PNG driver returns whatever its buffer held for pixels past a cut, with no error."""
    whole = tmp_path / "whole.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).save(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    for source in (cut, data[: len(data) // 2]):
        with pytest.raises(ImageryError, match="truncated"):
            load_image(source)
    trailing = tmp_path / "trailing.png"
    trailing.write_bytes(data + b"junk after IEND")
    for source in (whole, data, trailing):
        assert load_image(source).rgb.shape == (64, 64, 3)
