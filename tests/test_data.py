"""`geochat data build-instruct | build-vqa | build-ground`: training and evaluation files from generated RSICD/DOTA/SpaceNet-like data."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from geochat.box_geometry import min_area_rectangle, polygon_to_rotated_box, rotated_iou
from geochat.cli import main
from geochat.data.instruct import presence_question
from geochat.grounding import Box, grid_to_pixel, parse_boxes_strict


def _rect(cx: float, cy: float, w: float, h: float, theta: float) -> list[tuple[float, float]]:
    return Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theta).corners()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.RandomState(0)
    # RSICD-like
    (root / "rsicd" / "images").mkdir(parents=True)
    rows = []
    for i, label in enumerate(["airport", "river", "airport", "forest"]):
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(root / "rsicd" / "images" / f"{i}.jpg")
        caps = [f"many planes are parked near the terminal {i} ."] * 5 if label == "airport" else \
               [f"a {label} with green trees {k} ." for k in range(5)]
        rows.append({"image": f"images/{i}.jpg", "split": "train" if i < 3 else "test", "label": label, "captions": caps})
    (root / "rsicd" / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # DOTA-like: a 700x600 image, two oriented ships and a harbor
    (root / "dota" / "images").mkdir(parents=True)
    (root / "dota" / "labels").mkdir()
    Image.fromarray((rng.rand(600, 700, 3) * 255).astype(np.uint8)).save(root / "dota" / "images" / "P1.png")
    objects = [("ship", _rect(100, 120, 60, 20, 30)), ("ship", _rect(200, 300, 50, 16, -60)),
               ("harbor", _rect(620, 500, 80, 40, 0))]
    lines = ["imagesource:GoogleEarth", "gsd:0.5"]
    lines += [" ".join(f"{v:.2f}" for p in c for v in p) + f" {label} 0" for label, c in objects]
    (root / "dota" / "labels" / "P1.txt").write_text("\n".join(lines) + "\n")
    # SpaceNet-like: 600x600 uint16 panchromatic in UTM with one rotated building footprint
    tif = root / "pan.tif"
    transform = from_origin(500000.0, 4000000.0, 0.5, 0.5)
    with rasterio.open(tif, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint16",
                       crs="EPSG:32616", transform=transform, nodata=0) as ds:
        ds.write((rng.rand(1, 600, 600) * 1000 + 1).astype(np.uint16))
    ring = [transform @ p for p in _rect(150, 100, 40, 20, 20)]
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[*map(list, ring), list(ring[0])]]}}]}
    (root / "pan.geojson").write_text(json.dumps(geo))
    return {"rsicd": root / "rsicd", "dota": root / "dota", "tif": tif, "geojson": root / "pan.geojson"}


@pytest.fixture(scope="module")
def built(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("built") / "instruct.json"
    assert main(["data", "build-instruct", "--rsicd", str(sources["rsicd"]), "--dota", str(sources["dota"]),
                 "--spacenet", str(sources["tif"]), str(sources["geojson"]), "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_llava_format(built: tuple[Path, list[dict]]) -> None:
    out, samples = built
    assert len({s["id"] for s in samples}) == len(samples)
    for s in samples:
        assert set(s) == {"id", "image", "conversations"}
        human, gpt = s["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1 and "<<<IMAGE FACTS>>>" in human["value"]
        assert gpt["from"] == "gpt" and gpt["value"].strip()
        assert (out.parent / s["image"]).is_file()
    rsicd = [s for s in samples if s["id"].startswith("rsicd")]
    assert {s["id"].rsplit("-", 1)[1] for s in rsicd} >= {"brief", "detail", "options", "class", "yesno"}
    assert len({s["image"] for s in rsicd}) == 3  # train split only


def test_classification_answers_and_options(built: tuple[Path, list[dict]]) -> None:
    for s in built[1]:
        if s["id"].endswith("-options"):
            human, gpt = s["conversations"]
            assert f"{gpt['value']}" in human["value"].split("one of:")[1]
            assert gpt["value"] in ("airport", "river")


def _grounding_samples(samples: list[dict], prefix: str, kind: str) -> list[dict]:
    return [s for s in samples if s["id"].startswith(prefix) and s["id"].split("-")[-2 if kind == "refer" else -1] == kind]


def test_dota_boxes_map_back_to_the_quadrilaterals(built: tuple[Path, list[dict]], sources: dict[str, Path]) -> None:
    out, samples = built
    refer = [s for s in samples if s["id"].startswith("dota") and "-refer-ship" in s["id"]]
    assert refer and all("[refer]" in s["conversations"][0]["value"] for s in refer)
    ships = [polygon_to_rotated_box(_rect(100, 120, 60, 20, 30)), polygon_to_rotated_box(_rect(200, 300, 50, 16, -60))]
    for s in refer:
        _, col, row = s["image"].rsplit(".", 1)[0].rsplit("-", 2)
        size = Image.open(out.parent / s["image"]).size[0]
        for box in parse_boxes_strict(s["conversations"][1]["value"]):
            (x1, y1), (x2, y2) = grid_to_pixel([(box.x1, box.y1), (box.x2, box.y2)], size, size)
            pixel = Box(x1 + int(col), y1 + int(row), x2 + int(col), y2 + int(row), box.theta)
            assert max(rotated_iou(pixel, Box(*ref)) for ref in ships) > 0.6  # 1 grid unit = 5 px on a 16 px wide ship
    kinds = {s["id"].rsplit("-", 1)[1] for s in samples if s["id"].startswith("dota")}
    assert {"grounding", "identify"} <= kinds


def test_spacenet_footprint_becomes_its_rectangle(built: tuple[Path, list[dict]]) -> None:
    out, samples = built
    refer = [s for s in samples if s["id"].startswith("spacenet") and "-refer-building" in s["id"]]
    assert len(refer) == 1
    (box,) = parse_boxes_strict(refer[0]["conversations"][1]["value"])
    (x1, y1), (x2, y2) = grid_to_pixel([(box.x1, box.y1), (box.x2, box.y2)], 300, 300)
    truth = Box(*polygon_to_rotated_box(_rect(150, 100, 40, 20, 20)))
    assert rotated_iou(Box(x1, y1, x2, y2, box.theta), truth) > 0.85
    assert abs(((box.theta - 20) + 90) % 180 - 90) <= 1


def test_canonical_box_keeps_the_rectangle() -> None:
    from geochat.data.instruct import canonical_box

    box = Box(-6, 7, 12, 13, 90)  # a vertical thin box near the left edge, unrotated corners off the grid
    canon = canonical_box(box)
    assert canon is not None and abs(canon.theta) <= 45 and canon.x1 >= 0
    assert rotated_iou(canon, box) == pytest.approx(1.0, abs=1e-6)
    assert canonical_box(Box(-10, 0, 5, 5, 0)) is None


def test_min_area_rectangle_recovers_a_rotated_rectangle() -> None:
    corners = _rect(50, 40, 30, 10, 35)
    extra = [(50.0, 40.0), (55.0, 41.0)]  # interior points do not change it
    rect = min_area_rectangle(corners + extra)
    assert rotated_iou(Box(*polygon_to_rotated_box(rect)), Box(*polygon_to_rotated_box(corners))) == pytest.approx(1.0, abs=1e-6)
    area = abs(sum(rect[i][0] * rect[(i + 1) % 4][1] - rect[(i + 1) % 4][0] * rect[i][1] for i in range(4))) / 2
    assert area == pytest.approx(300.0) and not math.isnan(area)


def test_presence_questions_follow_the_captions() -> None:
    rng = random.Random(0)
    caps = ["a river runs past green trees ."] * 5
    for _ in range(50):
        q, a = presence_question(caps, rng)  # type: ignore[misc]
        mentioned = "river" in q or "tree" in q
        assert (a == "Yes.") == mentioned


def test_kinds_filter(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "captions.json"
    assert main(["data", "build-instruct", "--rsicd", str(sources["rsicd"]), "--dota", str(sources["dota"]),
                 "--out", str(out), "--kinds", "brief,refer", "--no-facts"]) == 0
    samples = json.loads(out.read_text())
    kinds = {s["id"].rsplit("-", 1)[1] if s["id"].startswith("rsicd") else "refer" for s in samples}
    assert kinds == {"brief", "refer"} and sum(s["id"].startswith("rsicd") for s in samples) == 3  # 3 train images
    assert all("<<<IMAGE FACTS>>>" not in s["conversations"][0]["value"] for s in samples)
    assert main(["data", "build-instruct", "--rsicd", str(sources["rsicd"]), "--out", str(out), "--kinds", "poems"]) == 2


def test_facts_block_is_what_the_engine_prompts(built: tuple[Path, list[dict]], sources: dict[str, Path]) -> None:
    from geochat.imagery import load_image
    from geochat.prompting import prompt_facts, render_facts

    sample = next(s for s in built[1] if s["id"].endswith("-brief"))
    facts = load_image(built[0].parent / sample["image"]).facts
    human = sample["conversations"][0]["value"]
    assert render_facts(prompt_facts(facts)) in human
    assert render_facts(facts) not in human  # bookkeeping facts (file name, …) stay out of the prompt


def test_denser_tiles_give_more_grounding_samples(sources: dict[str, Path], tmp_path: Path) -> None:
    def grounding(*extra: str) -> list[dict]:
        out = tmp_path / f"g{len(extra)}.json"
        assert main(["data", "build-instruct", "--dota", str(sources["dota"]), "--spacenet", str(sources["tif"]),
                     str(sources["geojson"]), "--out", str(out), "--no-facts", *extra]) == 0
        return json.loads(out.read_text())

    default, dense = grounding(), grounding("--tile-stride", "0.25")
    assert len({s["image"] for s in dense}) > 2 * len({s["image"] for s in default})
    assert {s["id"].split("-")[0] for s in dense} == {"dota", "spacenet"}
    assert main(["data", "build-instruct", "--dota", str(sources["dota"]), "--out", str(tmp_path / "x.json"),
                 "--tile-stride", "3"]) == 2


def test_build_vqa_writes_presence_questions_that_eval_vqa_reads(sources: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from geochat.data.instruct import PRESENCE
    from geochat.eval.annotations import read_annotations

    out = tmp_path / "sub" / "vqa.jsonl"
    assert main(["data", "build-vqa", "--rsicd", str(sources["rsicd"]), "--split", "train", "--out", str(out)]) == 0
    assert "3 questions written" in capsys.readouterr().err
    captions = {json.loads(line)["image"]: json.loads(line)["captions"]
                for line in (sources["rsicd"] / "annotations.jsonl").read_text().splitlines()}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3  # one an image of the split
    for row in rows:
        image = (out.parent / row["image"]).resolve()
        assert image.is_file()
        obj = next(o for o in PRESENCE if f" {o} in this image?" in row["question"])
        mentioned = any(re.search(PRESENCE[obj], c.lower()) for c in captions[f"images/{image.name}"])
        assert row["answer"] == ("yes" if mentioned else "no") and row["type"] == f"presence ({row['answer']})"
    parsed = read_annotations(out)
    assert [r.answer for r in parsed] == [r["answer"] for r in rows] and all(r.image.is_file() for r in parsed)
    assert main(["data", "build-vqa", "--rsicd", str(sources["rsicd"]), "--split", "val", "--out", str(out)]) == 2
    assert "no images in the split 'val'" in capsys.readouterr().err


def test_build_ground_writes_tile_boxes_that_eval_ground_reads(sources: dict[str, Path], tmp_path: Path) -> None:
    from geochat.eval.annotations import read_annotations

    out = tmp_path / "ground.jsonl"
    assert main(["data", "build-ground", "--dota", str(sources["dota"]), "--spacenet", str(sources["tif"]),
                 str(sources["geojson"]), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first = next(r for r in rows if r["image"] == "tiles/dota-P1-0-0.png" and r["phrase"] == "ships")
    assert len(first["boxes"]) == 2  # both ships lie inside the first 512-px tile
    expected = [Box(70, 110, 130, 130, 30), Box(175, 292, 225, 308, -60)]  # as _rect drew them, in tile pixels
    for want in expected:
        assert max(rotated_iou(Box(min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]), b[4]), want)
                   for b in first["boxes"]) > 0.99
    shifted = next(r for r in rows if r["image"] == "tiles/dota-P1-188-88.png" and r["phrase"] == "harbors")
    assert rotated_iou(Box(*shifted["boxes"][0][:4], shifted["boxes"][0][4]), Box(392, 392, 472, 432)) > 0.99
    assert any(r["image"].startswith("tiles/spacenet-") and r["phrase"] == "buildings" for r in rows)
    parsed = read_annotations(out)
    assert len(parsed) == len(rows) and all(r.image.is_file() and r.boxes for r in parsed)
    assert main(["data", "build-ground", "--out", str(out)]) == 2
    crowded = out.parent / "crowded"  # every tile of a harbour full of ships: nothing a refer answer can name
    (crowded / "images").mkdir(parents=True)
    (crowded / "labels").mkdir()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(crowded / "images" / "P9.png")
    ships = [" ".join(f"{v:.1f}" for p in _rect(20 + 18 * i, 150, 12, 6, 0) for v in p) + " ship 0" for i in range(14)]
    (crowded / "labels" / "P9.txt").write_text("\n".join(ships) + "\n")
    assert main(["data", "build-ground", "--dota", str(crowded), "--out", str(tmp_path / "none.jsonl")]) == 2
    assert not (tmp_path / "none.jsonl").exists() and not list((tmp_path / "tiles").glob("dota-P9-*"))


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "build-instruct", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["data", "build-instruct", "--rsicd", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_real_dota_and_spacenet(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "real.json"
    assert main(["data", "build-instruct", "--dota", str(shared_data / "dota"), "--spacenet",
                 str(shared_data / "georef" / "buildings_uint16_utm16.tif"),
                 str(shared_data / "georef" / "buildings_uint16_utm16.geojson"), "--out", str(out), "--no-facts"]) == 0
    samples = json.loads(out.read_text())
    assert any("[refer]" in s["conversations"][0]["value"] for s in samples)
    for s in samples:
        parse_boxes_strict(s["conversations"][1]["value"])  # every answer's boxes are well-formed


def test_rsicd_rows_are_read_as_the_evaluation_reads_them(tmp_path: Path) -> None:
    from geochat.data.rsicd import load_rsicd
    from geochat.errors import GeoChatError

    (tmp_path / "images").mkdir()
    rows = {"image": "images/a.jpg", "split": "test", "label": "port", "captions": "boats and a bridge"}
    (tmp_path / "annotations.jsonl").write_text(json.dumps(rows) + "\n")
    (item,) = load_rsicd(tmp_path)
    assert item.captions == ("boats and a bridge",)  # one caption, not one a character
    for line, words in (("not json", "annotations.jsonl:2"), ('{"image": 5}', "'image' path"),
                        ('{"image": "images/b.jpg", "captions": ["a river"]}', "needs its scene class as 'label'")):
        (tmp_path / "annotations.jsonl").write_text(json.dumps(rows) + "\n" + line + "\n")
        with pytest.raises(GeoChatError, match=re.escape(words)):
            load_rsicd(tmp_path)
    assert presence_question((), random.Random(0)) is None  # no caption supports a "no"
    (tmp_path / "annotations.jsonl").write_text(json.dumps(rows) + "\n")  # images/a.jpg does not exist
    assert main(["data", "build-vqa", "--rsicd", str(tmp_path), "--out", str(tmp_path / "v.jsonl")]) == 2
    assert not (tmp_path / "v.jsonl").exists()


def test_a_dota_image_that_is_not_an_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dota = tmp_path / "dota"
    (dota / "images").mkdir(parents=True)
    (dota / "labels").mkdir()
    (dota / "labels" / "P1.txt").write_text("10 10 60 10 60 40 10 40 ship 0\n")
    (dota / "images" / "P1.png").write_text("garbage")
    assert main(["data", "build-ground", "--dota", str(dota), "--out", str(tmp_path / "g" / "g.jsonl")]) == 2
    assert "P1.png is not a readable image" in capsys.readouterr().err
