"""The app's behaviour without a browser: `SessionLogic` (open, pick, ask, start over), the display
helpers, and the Gradio wiring called directly (tiny model, generated GeoTIFFs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from geochat import Answer, BoxResult, GeoChat
from geochat.answer import ModelInfo, Timings
from geochat.engine import AnswerStream
from geochat.errors import GeoChatError
from geochat.grounding import strip_grounding
from geochat.imagery import load_image, polygons_to_geojson
from geochat.prompting import Passage, split_reasoning
from geochat.retrieval import ImageHit
from geochat.serving import ServingSettings
from geochat.serving.images import ImageTooLargeError, parse_bands
from geochat.serving.render import (
    AppendOnly,
    annotate,
    feature_collection,
    info_markdown,
    live_split,
    sources_markdown,
)
from geochat.serving.session import AnswerFailedError, AskOptions, ChatSession, SessionLogic
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def gc(tiny_llm_dir: Path) -> GeoChat:
    import torch

    torch.manual_seed(0)  # the tiny model's random projector: the same answers whichever tests ran before
    return GeoChat.from_config(tiny_config(tiny_llm_dir), max_new_tokens=8)


@pytest.fixture(scope="module")
def logic(gc: GeoChat, tmp_path_factory: pytest.TempPathFactory) -> SessionLogic:
    settings = ServingSettings(max_image_pixels=50_000_000, max_preview_size=300)
    return SessionLogic(gc, settings, tmp_path_factory.mktemp("downloads"))


def _answer(loaded: Any, boxes: list[BoxResult], geojson: dict[str, Any] | None, sources: list[dict[str, Any]]) -> Answer:
    return Answer(answer="two fields", reasoning=None, task="refer", boxes=boxes, geojson=geojson, facts={},
                  sources=sources, model=ModelInfo("hand-made", "none", "none"), timings=Timings(0, 0, 0))


# -- opening images -----------------------------------------------------------------------------

def test_open_geotiff_gives_preview_and_info(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    session = logic.open(geotiffs["s2_13band_uint16_utm33.tif"], sensor="sentinel2")
    assert session.loaded is not None and session.loaded.bands.rgb == (4, 3, 2)
    text = info_markdown(session.loaded)
    assert "64 × 64 px, 13 bands (uint16)" in text and "EPSG:32633" in text and "m per pixel" in text
    preview = logic.view(session)
    assert isinstance(preview, Image.Image) and preview.size == (448, 448), "a 64 px chip is shown enlarged ×7"
    custom = logic.open(geotiffs["s2_13band_uint16_utm33.tif"], bands="8, 4, 3")
    assert custom.loaded is not None and custom.loaded.bands.rgb == (8, 4, 3)
    assert parse_bands("B4,B3,B2") == "B4,B3,B2" and parse_bands(" ") is None


def test_large_raster_preview_is_downsampled(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    session = logic.open(geotiffs["rect_600x300_utm.tif"])
    assert session.loaded is not None and session.loaded.scale == 2.0
    assert logic.view(session).size == (300, 150)  # type: ignore[union-attr]
    assert "downsampled ×2.0" in info_markdown(session.loaded)


@pytest.mark.parametrize(("name", "words"), [
    ("corrupt.tif", "not a readable raster"),
    ("truncated.tif", "corrupt"),
    ("text_as.tif", "not a readable raster"),
    ("sparse_20000.tif", "max_image_pixels"),
])
def test_bad_files_raise_a_readable_error(logic: SessionLogic, geotiffs: dict[str, Path], name: str, words: str) -> None:
    with pytest.raises(GeoChatError) as info:
        logic.open(geotiffs[name])
    assert words in str(info.value)
    assert str(geotiffs[name].parent) not in str(info.value)  # an upload's temp folder is not the user's business
    if name == "sparse_20000.tif":
        assert isinstance(info.value, ImageTooLargeError)


# -- regions ------------------------------------------------------------------------------------

def test_two_clicks_choose_a_region_in_original_pixels(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    session = logic.open(geotiffs["rect_600x300_utm.tif"])  # preview is half size
    plain = np.asarray(logic.view(session))
    session = logic.pick(session, 110, 70)
    assert session.corner == (220.0, 140.0) and session.region is None
    session = logic.pick(session, 10, 20)
    assert session.region == (20.0, 40.0, 220.0, 140.0) and session.corner is None
    drawn = np.asarray(logic.view(session))
    assert (drawn[20, 10:110] != plain[20, 10:110]).any(), "the region's top edge is drawn on the preview"
    session = logic.set_region(session, [None, 1, 2, 3])
    assert session.region is None
    # typed corners are kept inside the 600 × 300 image; a region wholly outside it is none
    assert logic.set_region(session, [5000, -5, 100, 40]).region == (100.0, 0.0, 600.0, 40.0)
    assert logic.set_region(session, [700, 10, 900, 40]).region is None
    assert logic.set_region(session, [1, 2, float("nan"), 4]).region is None

    with pytest.raises(GeoChatError, match="click inside the image"):
        logic.pick(session, float("nan"), 3)

    chip = logic.open(geotiffs["s2_13band_uint16_utm33.tif"])  # 64 px, shown ×7
    chip = logic.pick(logic.pick(chip, 70, 140), 140, 280)
    assert chip.region == (10.0, 20.0, 20.0, 40.0)


# -- asking -------------------------------------------------------------------------------------

def test_ask_streams_then_keeps_history_and_starts_over(logic: SessionLogic, gc: GeoChat, geotiffs: dict[str, Path]) -> None:
    session = logic.open(geotiffs["landsat8_int16_utm18.tif"])
    shown = [s.transcript[-1]["content"] for s in logic.ask(session, "what is this?", AskOptions())]
    final = session.transcript[-1]["content"]
    assert shown[0] == "…" and shown[-1] == final
    partial = [text for text in shown[1:-1] if text not in ("…", final)]
    assert partial and all(final.startswith(text.rstrip(" .")[:8]) for text in partial), "the answer streams"
    assert session.transcript[0] == {"role": "user", "content": "what is this?"}
    assert session.transcript[-1]["role"] == "assistant" and len(session.answers) == 1
    content = session.transcript[-1]["content"]
    assert content.startswith(session.answers[0].answer or "(no answer text)")
    assert session.answers[0].cut_short and content.endswith("*The answer reached the length limit and was cut short.*")
    assert "first token" in session.status

    list(logic.ask(session, "and the river?", AskOptions()))
    assert len(session.answers) == 2 and len(session.transcript) == 4
    expected = gc.chat(session.loaded, "and the river?", history=[session.answers[0].as_turn()])
    assert session.answers[1].answer == expected.answer, "the second turn was asked with the first as history"

    fresh = logic.reset(session)
    assert fresh.transcript == [] and fresh.answers == [] and fresh.loaded is session.loaded
    # a turn stopped while it streams (another image, Start over) leaves no half turn behind
    before = list(session.transcript)
    turn = logic.ask(session, "and the fields?", AskOptions())
    next(turn), next(turn)
    assert len(session.transcript) == len(before) + 2
    turn.close()
    assert session.transcript == before and len(session.answers) == 2


def test_tasks_need_their_inputs(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    empty = ChatSession()
    with pytest.raises(GeoChatError, match="needs an image"):
        list(logic.ask(empty, "", AskOptions(task="caption")))
    session = logic.open(geotiffs["landsat8_int16_utm18.tif"])
    with pytest.raises(GeoChatError, match="type the thing to locate"):
        list(logic.ask(session, "  ", AskOptions(task="refer")))
    with pytest.raises(GeoChatError, match="needs a region"):
        list(logic.ask(session, "", AskOptions(task="identify")))
    assert session.transcript == [], "a refused question leaves the conversation as it was"

    list(logic.ask(session, "", AskOptions(task="identify", region=(5, 5, 30, 25))))
    assert session.transcript[0]["content"] == "**identify** (region 5, 5, 30, 25)"
    list(logic.ask(session, "", AskOptions(task="classify", labels="farmland, forest ,")))
    assert "(options: farmland, forest)" in session.transcript[-2]["content"]
    text_only = ChatSession()
    list(logic.ask(text_only, "what is NDVI?", AskOptions()))
    assert len(text_only.answers) == 1


def test_sessions_are_isolated(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    a = logic.open(geotiffs["landsat8_int16_utm18.tif"])
    b = logic.open(geotiffs["rgb_uint8_3857.tif"])
    list(logic.ask(a, "what is in A?", AskOptions()))
    list(logic.ask(b, "what is in B?", AskOptions()))
    list(logic.ask(a, "more about A", AskOptions()))
    assert [m["content"] for m in a.transcript if m["role"] == "user"] == ["what is in A?", "more about A"]
    assert [m["content"] for m in b.transcript if m["role"] == "user"] == ["what is in B?"]
    assert len(a.answers) == 2 and len(b.answers) == 1
    assert a.answers[0].facts["size"] == [50, 40] and b.answers[0].facts["size"] == [256, 64]
    assert ChatSession().transcript is not ChatSession().transcript  # no shared mutable defaults


def test_model_failure_becomes_one_line(geotiffs: dict[str, Path], tmp_path: Path, gc: GeoChat) -> None:
    class BrokenEngine:
        """Stands in for a GeoChat whose model crashes mid-answer."""

        retriever = None
        model_info = gc.model_info

        def stream(self, image: Any, message: str, **kwargs: Any) -> AnswerStream:
            def run(on_text: Any) -> Answer:
                on_text("The ")
                raise RuntimeError("out of memory")
            return AnswerStream(run)

    logic = SessionLogic(BrokenEngine(), ServingSettings(), tmp_path)  # type: ignore[arg-type]
    session = logic.open(geotiffs["nongeo.png"])
    with pytest.raises(AnswerFailedError, match="out of memory"):
        list(logic.ask(session, "hi", AskOptions()))
    assert session.transcript[-1]["content"].startswith("⚠️ **Could not answer:**")
    assert session.answers == []


def test_sources_and_similar_images_are_shown_when_retrieval_is_present(
    gc: GeoChat, geotiffs: dict[str, Path], tmp_path: Path
) -> None:
    class Retriever:
        def search(self, query: str) -> list[Passage]:
            return [Passage("S1", "sensors/sentinel-2.md", "Bands", "B4 is red at 665 nm; B8 is NIR.", 0.9)]

        def similar_images(self, rgb: np.ndarray, k: int) -> list[ImageHit]:
            return [ImageHit(str(geotiffs["nongeo.png"]), 0.91, {"caption": "a similar scene"}),
                    ImageHit(str(geotiffs["corrupt.tif"]), 0.5, {})][:k]  # an unreadable hit is skipped

    gc.retriever = Retriever()
    try:
        logic = SessionLogic(gc, ServingSettings(), tmp_path)
        session = logic.open(geotiffs["landsat8_int16_utm18.tif"])
        [(thumbnail, caption)] = session.similar
        assert thumbnail.shape == (32, 48, 3) and caption == "a similar scene (0.91)"
        list(logic.ask(session, "which band is red?", AskOptions()))
    finally:
        gc.retriever = None
    text = sources_markdown(session.sources)
    assert "`sensors/sentinel-2.md`" in text and "Bands" in text and "665 nm" in text


# -- boxes: an answer built by hand --------------------------------------------------------------

def test_boxes_are_drawn_and_downloadable_as_geojson(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    loaded = load_image(geotiffs["rect_600x300_utm.tif"], max_size=300)
    box = BoxResult("the field", (100.0, 50.0, 300.0, 150.0, 0.0), None)
    polygon = box.pixel_polygon()
    assert np.allclose(polygon, [(100, 50), (300, 50), (300, 150), (100, 150)], atol=1e-6)
    geojson = polygons_to_geojson([polygon], loaded.info, [{"phrase": "the field"}])
    answer = _answer(loaded, [box], geojson, [])

    collection = feature_collection(answer)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 1
    ring = collection["features"][0]["geometry"]["coordinates"][0]
    west, south, east, north = loaded.info.bounds_lonlat  # type: ignore[misc]
    assert all(west <= lon <= east and south <= lat <= north for lon, lat in ring)
    assert feature_collection(_answer(loaded, [], None, [])) == {"type": "FeatureCollection", "features": []}

    image = np.asarray(annotate(loaded, [box]))
    assert (image[25, 50:150] != loaded.rgb[25, 50:150]).any(), "the box's top edge (row 50 / 2) is drawn"

    session = ChatSession(image_name="rect 600x300.tif", loaded=loaded)
    path = logic._write_geojson(session, answer)
    assert path is not None and path.endswith(".geojson") and "rect_600x300-boxes-" in path
    assert json.loads(Path(path).read_text())["features"][0]["properties"]["phrase"] == "the field"
    assert logic._write_geojson(session, _answer(loaded, [], None, [])) is None


def test_a_grounded_cot_answer_fills_every_panel(geotiffs: dict[str, Path], tmp_path: Path, gc: GeoChat) -> None:
    """A scripted engine (the answer built by hand) streams reasoning, then an answer with a box."""
    loaded = load_image(geotiffs["rect_600x300_utm.tif"])
    box = BoxResult("the field", (100.0, 50.0, 300.0, 150.0, 0.0), None)
    geojson = polygons_to_geojson([box.pixel_polygon()], loaded.info, [{"phrase": "the field"}])
    pieces = ["Reasoning: the ", "field is bright.", "\nAnswer: <p>the field</p> ", "{<17><33><50><67>|<0>}"]

    class ScriptedEngine:
        retriever = None
        model_info = gc.model_info

        def stream(self, image: Any, message: str, **kwargs: Any) -> AnswerStream:
            assert kwargs["cot"] is True and kwargs["task"].value == "refer"

            def run(on_text: Any) -> Answer:
                for piece in pieces:
                    on_text(piece)
                return Answer("the field", "the field is bright.", "refer", [box], geojson, {}, [],
                              gc.model_info, Timings(0.1, 0.2, 0.3))
            return AnswerStream(run)

    logic = SessionLogic(ScriptedEngine(), ServingSettings(), tmp_path)  # type: ignore[arg-type]
    session = logic.open(geotiffs["rect_600x300_utm.tif"])
    live = [[dict(m) for m in s.transcript] for s in logic.ask(session, "the field", AskOptions(task="refer", cot=True))]
    assert live[2][1]["metadata"]["status"] == "pending", "reasoning streams open"
    assert all("{" not in m["content"] for t in live for m in t), "box markup never shows"
    reasoning, text = session.transcript[1], session.transcript[2]
    assert reasoning["content"] == "the field is bright." and reasoning["metadata"] == {"title": "Reasoning", "status": "done"}
    assert text["content"].startswith("the field") and "1 box drawn" in text["content"]
    assert session.boxes == [box] and session.geojson_path is not None
    assert json.loads(Path(session.geojson_path).read_text())["features"][0]["properties"]["phrase"] == "the field"
    shown = np.asarray(logic.view(session))
    assert (shown[50, 100:300] != loaded.rgb[50, 100:300]).any(), "the box is drawn on the image"


# -- streaming text -----------------------------------------------------------------------------

def test_live_text_hides_unfinished_markup_and_grows() -> None:
    raw = "There is <p>a field</p> {<10><20><30><40>|<5>} near the river."
    seen = AppendOnly()
    shown = []
    for i in range(1, len(raw) + 1):
        _, text = live_split(raw[:i], cot=False)
        assert "{" not in text and "<" not in text
        shown.append(seen.advance(text))
    assert "".join(shown) == "There is a field near the river."

    reasoning, answer = live_split("Reasoning: the water is dark. Answ", cot=True)
    assert (reasoning, answer) == ("the water is dark. Answ", "")
    reasoning, answer = live_split("Reasoning: the water is dark.\nAnswer: a lake", cot=True)
    assert (reasoning, answer) == ("the water is dark.", "a lake")
    # no reasoning given: the answer streams as the answer (what split_reasoning will call it), never as both
    for raw in ("Yes.", "**Residential** area", "Reason enough"):
        reasoning_seen, answer_seen = AppendOnly(), AppendOnly()
        for i in range(1, len(raw) + 1):
            r, a = live_split(raw[:i], cot=True)
            reasoning_seen.advance(r or "")
            answer_seen.advance(a)
        assert reasoning_seen.sent == "" and answer_seen.sent == strip_grounding(split_reasoning(raw)[1])
    assert live_split("Reas", cot=True) == (None, "") and live_split("**Reasoning", cot=True) == (None, "")


# -- the Gradio wiring, called directly -----------------------------------------------------------

def test_gradio_handlers_show_errors_as_text(logic: SessionLogic, geotiffs: dict[str, Path]) -> None:
    from geochat.serving.ui import build_ui

    demo = build_ui(logic)
    fns = {f.name: f.fn for f in demo.fns.values()}
    assert {"on_open", "on_send", "on_pick", "on_reset", "on_task"} <= set(fns)

    import gradio as gr

    with pytest.warns(UserWarning, match="not a readable raster"):  # gr.Warning outside a request
        out = fns["on_open"](ChatSession(), str(geotiffs["corrupt.tif"]), "", "")
    assert "Could not open the image" in out[0].status and "not a readable raster" in out[0].status

    landsat = str(geotiffs["landsat8_int16_utm18.tif"])
    out = fns["on_open"](ChatSession(), landsat, "", "")
    session = out[0]
    assert isinstance(session, ChatSession) and "EPSG:32618" in out[-3]
    with pytest.warns(UserWarning, match="type the thing to locate"):
        updates = list(fns["on_send"](session, "", "refer", False, "", None, None, None, None))
    assert updates[-1][0].transcript == [], "refer without a phrase is refused before anything is asked"
    updates = list(fns["on_send"](session, "the river", "refer", False, "", None, None, None, None))
    assert updates[-1][2][0]["content"] == "**refer**: the river"
    assert "No boxes on the image in this answer" in updates[-1][2][-1]["content"]  # the tiny model locates nothing
    # while the answer streams only the conversation changes; the picture is drawn once, with the answer
    assert len(updates) >= 3 and all(isinstance(u[1], type(gr.skip())) for u in updates[:-1])
    assert isinstance(updates[-1][1], Image.Image)
    # a typo in the bands keeps the image and the conversation (and says why nothing changed)
    with pytest.warns(UserWarning, match="band"):
        kept = fns["on_open"](session, landsat, "", "4,3,99")
    assert kept[0] is session and len(session.transcript) == 2 and session.loaded is not None
    assert "Could not open the image" in session.status
    with pytest.warns(UserWarning, match="expects"):  # a refused preset: the menu shows the one in use again
        refused = fns["on_open"](session, landsat, "sentinel2", "")
    assert refused[-1] == session.rendering[0] == ""
    # valid new bands: a new conversation, and the tab says so (opening the same file the same way does not)
    out = fns["on_open"](session, landsat, "", "3,2,1")
    assert out[0].transcript == [] and "new conversation" in out[0].status
    session.rendering, session.status = ("", ""), ""
    assert "Bands changed" not in fns["on_open"](session, landsat, "", "")[0].status
    # typing a region never writes the four boxes back (a half-typed corner would be wiped)
    typed = fns["on_region_typed"](session, 10.0, 20.0, None, None)
    assert all(isinstance(v, type(gr.skip())) for v in typed[-4:]) and typed[0].region is None
    # whatever replaces the session first stops an answer still streaming into it; Enter and Send are one event
    send = next(d for d in demo.fns.values() if d.name == "on_send")
    assert len(send.targets) == 2 and send.trigger_mode == "once"
    stoppers = [d for d in demo.fns.values() if send._id in (d.cancels or [])]
    events = sorted(event for d in stoppers for _, event in d.targets)
    assert events == ["change", "clear", "click", "click", "input", "submit"]  # upload, bin, reset/apply, preset, bands


def test_the_first_corner_is_marked_on_bright_ground_too(logic: SessionLogic, tmp_path: Path) -> None:
    white = tmp_path / "snow.png"
    Image.fromarray(np.full((80, 80, 3), 255, np.uint8)).save(white)
    session = logic.open(white)
    plain = np.asarray(logic.view(session))
    marked = np.asarray(logic.view(logic.pick(session, 40, 40)))
    assert (marked != plain).any(), "the pending corner is visible on a white image"
