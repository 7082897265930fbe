"""`geochat ask`: the JSON contract, readable output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geochat import GeoChat
from geochat.cli import main
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("assistant")
    GeoChat.from_config(tiny_config(tiny_llm_dir)).save_pretrained(directory)
    return directory


def _ask(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["ask", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_contract_on_geotiff(capsys: pytest.CaptureFixture[str], model_dir: Path, geotiffs: dict[str, Path]) -> None:
    code, out, _ = _ask(capsys, str(geotiffs["s2_13band_uint16_utm33.tif"]), "what is here?", "--model", str(model_dir),
                        "--json", "--max-new-tokens", "8", "--no-retrieval")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"answer", "reasoning", "task", "boxes", "geojson", "facts", "sources", "model", "timings"}
    assert data["task"] == "chat" and data["reasoning"] is None
    assert data["facts"]["band_count"] == 13 and data["facts"]["crs"] == "EPSG:32633"
    assert data["facts"]["rgb_bands"] == [4, 3, 2]
    assert "ndvi" in json.dumps(data["facts"]).lower()
    assert data["timings"]["total_s"] > 0


def test_json_with_task_region_bands_cot(capsys: pytest.CaptureFixture[str], model_dir: Path, geotiffs: dict[str, Path]) -> None:
    code, out, _ = _ask(capsys, str(geotiffs["s2_13band_uint16_utm33.tif"]), "describe the region", "--model", str(model_dir),
                        "--json", "--max-new-tokens", "8", "--task", "identify", "--region", "1,1,10,10", "--bands", "8,4,3",
                        "--cot", "--no-retrieval")
    assert code == 0
    data = json.loads(out)
    assert data["task"] == "identify" and data["facts"]["rgb_bands"] == [8, 4, 3]


def test_readable_output(capsys: pytest.CaptureFixture[str], model_dir: Path, geotiffs: dict[str, Path]) -> None:
    code, out, err = _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "hello", "--model", str(model_dir),
                          "--max-new-tokens", "4", "--no-retrieval")
    assert code == 0 and out.strip() and "{" not in out.splitlines()[0][:1]
    assert "projector untrained" in err


def test_caption_needs_no_question(capsys: pytest.CaptureFixture[str], model_dir: Path, geotiffs: dict[str, Path]) -> None:
    code, out, _ = _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "--task", "caption", "--model", str(model_dir),
                        "--max-new-tokens", "4", "--no-retrieval", "--json")
    assert code == 0 and json.loads(out)["task"] == "caption"
    code, _, err = _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "--model", str(model_dir))
    assert code == 2 and "pass an image and a question" in err  # a chat turn still needs one


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/file.tif", "q"], "image not found"),
        (["{corrupt}", "q"], "corrupt.tif"),
        (["{s2}", "q", "--bands", "4,3,99"], "band 99 does not exist: the raster has 13 bands (1-13); choose three of them, e.g. 3,2,1 (pass the bands with --bands)"),
        (["{s2}", "q", "--sensor", "sentinel-9"], "unknown sensor preset 'sentinel-9'; choose one of: sentinel2"),
        (["{s2}", "q", "--sensor", "sentinel-9"], "rgb, rgbn (pass the sensor with --sensor)"),
        (["{s2}", "q", "--sensor", "landsat8"], "expects 11 or 7 bands but the raster has 13; choose the bands by "
                                                 "number instead, e.g. 3,2,1 (pass the bands with --bands)"),
        (["{s2}", "q", "--model", "/no/such/model"], "not a geochat assistant directory"),
        (["{s2}", "q", "--task", "identify"], "needs a region"),
        (["only-one-arg"], "pass an image and a question"),
        (["{s2}", "q", "--task", "classify", "--labels", " , "], "names no label"),
        # the drawing's path is checked before the model runs, and never overwrites the input
        (["{s2}", "q", "--out", "{s2}"], "is the input image, which the drawing would overwrite"),
        (["{s2}", "q", "--out", "{dir}"], "is a folder; name a picture file in it"),
        (["{s2}", "q", "--out", "{dir}/boxes.tif"], "name a .png or .jpg file"),
        (["{s2}", "q", "--out", "/no/such/folder/boxes.png"], "the folder /no/such/folder does not exist"),
        (["{s2}", "q", "--overlap", "10"], "--overlap applies to tiles: pass --tile as well"),
        (["{s2}", "q", "--tile", "0"], "--tile (0) must be a positive number of pixels"),
        (["{s2}", "q", "--tile", "100"], "--tile (100) must be larger than --overlap (128, the default when not"),
        (["{s2}", "q", "--tile", "512", "--overlap", "-1"], "--overlap (-1) must be 0 or more pixels"),
        (["--no-image", "q", "--bands", "1,2,3"], "--bands need an image"),
        (["--no-image", "where?", "--task", "refer"], "the refer task is about an image's pixels"),
        (["{s2}", "q", "--task", "classify", "--labels", "forest,\ud800"], "not valid Unicode"),
    ],
)
def test_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], model_dir: Path, geotiffs: dict[str, Path], args: list[str], message: str
) -> None:
    args = [a.format(corrupt=geotiffs["corrupt.tif"], s2=geotiffs["s2_13band_uint16_utm33.tif"],
                     dir=geotiffs["corrupt.tif"].parent).replace("\\ud800", "\ud800") for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    code, out, err = _ask(capsys, *args, "--no-retrieval")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geochat: error:") and message in lines[0]
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_scene_over_the_one_view_limit_is_asked_tile_by_tile(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                                              tmp_path: Path) -> None:
    """50,000 x 50,000 px (2.5 billion, over the 2 billion one view may hold), sparse: 77 kB on disk."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    size, block = 50_000, 512
    path = tmp_path / "huge.tif"
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=from_origin(200_000.0, 4_600_000.0, 1.0, 1.0), nodata=0, tiled=True, blockxsize=block,
                       blockysize=block, compress="deflate", sparse_ok=True) as ds:
        ds.write(np.full((1, block, block), 200, np.uint8), window=Window(20_480, 20_480, block, block))
    code, out, err = _ask(capsys, str(path), "fields", "--model", str(model_dir), "--no-retrieval")
    assert code == 2 and "for one view; ask about it tile by tile" in err and "--tile" in err
    code, out, err = _ask(capsys, str(path), "fields", "--model", str(model_dir), "--no-retrieval", "--tile", "16384",
                          "--overlap", "1024", "--task", "refer", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["facts"]["size"] == [size, size] and answer["task"] == "refer"


def test_a_file_name_that_is_not_utf8_is_one_line(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                                  geotiffs: dict[str, Path], tmp_path: Path) -> None:
    bad = os.fsencode(tmp_path) + b"/scene\xff.tif"
    shutil.copy(geotiffs["rgb_uint8_3857.tif"], bad)
    code, _, err = _ask(capsys, os.fsdecode(bad), "q", "--model", str(model_dir), "--no-retrieval")
    assert code == 2 and "the file name is not valid UTF-8" in err and "Traceback" not in err


def test_console_script_never_shows_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-raster.tif"
    bad.write_text("this is text, not a GeoTIFF")
    proc = subprocess.run(
        [sys.executable, "-m", "geochat.cli", "ask", str(bad), "what?", "--no-retrieval"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_options_may_stand_between_the_image_and_the_question(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                                             geotiffs: dict[str, Path]) -> None:
    code, out, _ = _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "--task", "refer", "--json", "buildings",
                        "--model", str(model_dir), "--max-new-tokens", "2", "--no-retrieval")
    assert code == 0 and json.loads(out)["task"] == "refer"
    with pytest.raises(SystemExit):
        _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "q", "--no-such-option")
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_tiled_json(capsys: pytest.CaptureFixture[str], model_dir: Path, geotiffs: dict[str, Path]) -> None:
    code, out, err = _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "buildings", "--model", str(model_dir),
                          "--json", "--max-new-tokens", "4", "--tile", "256", "--overlap", "32", "--task", "refer",
                          "--no-retrieval")
    assert code == 0
    assert "6 tiles" in err and "6/6" in err  # a long tiled run says how far it is (on stderr, beside the JSON)
    data = json.loads(out)
    assert data["task"] == "refer" and data["facts"]["size"] == [600, 300]
    code, _, err = _ask(capsys, str(geotiffs["rect_600x300_utm.tif"]), "x", "--model", str(model_dir), "--tile", "64",
                        "--overlap", "64", "--no-retrieval")
    assert code == 2 and "overlap" in err
