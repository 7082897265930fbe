"""The engine: multi-turn cache reuse, streaming, grounding, errors (tiny model, generated GeoTIFFs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from geochat import GeoChat, GeoChatError, Turn
from geochat.georeference import georeference
from geochat.grounding import Box, format_grounded, parse_boxes
from geochat.imagery import load_image
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def gc(tiny_llm_dir: Path) -> GeoChat:
    return GeoChat.from_config(tiny_config(tiny_llm_dir), max_new_tokens=10)


def _image() -> np.ndarray:
    return (np.random.RandomState(0).rand(40, 60, 3) * 255).astype(np.uint8)


def _uncached_ids(gc: GeoChat, image: np.ndarray, message: str, history: list[Turn], n: int) -> list[int]:
    """Reference: the plain LLaVA way, everything re-encoded, no cache reuse."""
    from geochat.model.processor import to_pixel_values
    from geochat.prompting import build_user_message, prompt_facts

    a = gc.assistant
    loaded = load_image(image)
    user = build_user_message(message, facts=prompt_facts(loaded.facts) if not history else None)
    ids = gc._prompt_ids(history, user, with_image=True)
    pixels = to_pixel_values(loaded.rgb, a.image_size, a.config.image_mean, a.config.image_std)
    out = a.model.generate(
        input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=n, do_sample=False,
        suppress_tokens=[a.image_token_id], pad_token_id=a.tokenizer.pad_token_id,
    )
    return out[0, len(ids):].tolist()


def test_cached_multi_turn_equals_uncached(gc: GeoChat) -> None:
    image = _image()
    first = gc.chat(image, "what is in this image?")
    assert first.timings.encode_s > 0
    second = gc.chat(image, "and the river?", history=[first.as_turn()])
    assert second.timings.encode_s == 0.0, "the image must be encoded once per session"
    third = gc.chat(image, "anything else?", history=[first.as_turn(), second.as_turn()])
    tok = gc.assistant.tokenizer
    for message, history, answer in [
        ("what is in this image?", [], first),
        ("and the river?", [first.as_turn()], second),
        ("anything else?", [first.as_turn(), second.as_turn()], third),
    ]:
        expected = tok.decode(_uncached_ids(gc, image, message, history, 10), skip_special_tokens=True).strip()
        assert answer.raw == expected


def test_second_turn_reuses_prefix(gc: GeoChat) -> None:
    image = np.full((32, 32, 3), 90, np.uint8)
    first = gc.chat(image, "describe")
    session = next(reversed(gc._sessions.values()))
    assert session.last_reused == 0
    first_prompt_len = len(gc._prompt_ids([], first.prompt, with_image=True))
    gc.chat(image, "more", history=[first.as_turn()])
    # the system prompt, the image tokens and the whole first question come from the cache
    assert session.last_reused >= first_prompt_len - 3


def test_stream_yields_pieces_then_answer(gc: GeoChat) -> None:
    stream = gc.stream(_image(), "caption this", task="caption")
    pieces = list(stream)
    assert stream.answer is not None
    assert "".join(pieces).strip() == stream.answer.raw
    assert stream.answer.task == "caption"


def test_text_only_question(gc: GeoChat) -> None:
    answer = gc.chat(None, "what is NDVI?")
    assert answer.boxes == [] and answer.geojson is None and answer.facts == {}


def test_boxes_are_georeferenced(gc: GeoChat, geotiffs: dict[str, Path]) -> None:
    loaded = load_image(geotiffs["rect_600x300_utm.tif"])
    raw = format_grounded([("the field", [Box(0, 25, 100, 75)])])  # the whole real image on the padded grid
    boxes, geojson = georeference(parse_boxes(raw), loaded)
    assert boxes[0].phrase == "the field"
    np.testing.assert_allclose(boxes[0].pixel[:4], (0, 0, 600, 300), atol=1e-6)
    assert geojson is not None and geojson["type"] == "FeatureCollection"
    ring = geojson["features"][0]["geometry"]["coordinates"][0]
    west, south, east, north = loaded.info.bounds_lonlat  # type: ignore[misc]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    assert min(lons) == pytest.approx(west, abs=1e-6) and max(lons) == pytest.approx(east, abs=1e-6)
    assert min(lats) == pytest.approx(south, abs=1e-6) and max(lats) == pytest.approx(north, abs=1e-6)
    assert boxes[0].polygon_lonlat is not None and boxes[0].polygon_lonlat[0] == boxes[0].polygon_lonlat[-1]


def test_boxes_off_the_image_are_dropped_and_boxes_across_its_edge_are_cut(gc: GeoChat,
                                                                          geotiffs: dict[str, Path]) -> None:
    from geochat.grounding import parse_boxes

    loaded = load_image(geotiffs["rect_600x300_utm.tif"])  # on the grid the image spans y 25..75
    raw = format_grounded([("in the padding", [Box(10, 2, 40, 20)]),  # wholly above the image
                           ("across the top edge", [Box(10, 15, 40, 45)]),
                           ("inside", [Box(50, 40, 60, 60)]), ("inside", [Box(50, 40, 60, 60)])])  # said twice
    boxes, geojson = georeference(parse_boxes(raw), loaded)
    assert [b.phrase for b in boxes] == ["across the top edge", "inside"]
    edge = boxes[0].pixel
    assert edge[1] == 0 and edge[3] == pytest.approx((45 - 25) / 50 * 300) and edge[4] == 0
    assert geojson is not None and len(geojson["features"]) == 2
    west, south, east, north = loaded.info.bounds_lonlat  # type: ignore[misc]
    for feature in geojson["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert all(west - 1e-6 <= x <= east + 1e-6 and south - 1e-6 <= y <= north + 1e-6 for x, y in ring)
    # a rotated box across the edge is cut there too (its ring has more corners than four, all inside)
    turned, _ = georeference(parse_boxes(format_grounded([("turned", [Box(10, 15, 40, 45, 30.0)])])), loaded)
    assert turned and turned[0].polygon_lonlat is not None
    assert all(south - 1e-6 <= y <= north + 1e-6 for _, y in turned[0].polygon_lonlat)
    only_off, empty = georeference(parse_boxes(format_grounded([("off", [Box(0, 0, 100, 10)])])), loaded)
    assert only_off == [] and empty == {"type": "FeatureCollection", "features": []}  # georeferenced, no box
    assert georeference([], loaded) == ([], empty)
    sliver, _ = georeference(parse_boxes(format_grounded([("sliver", [Box(10, 0, 40, 25.5)])])), loaded)
    assert sliver == []  # all but 2 % of it in the padding
    # one box per object: a box walked a step at a time is kept once (the largest), apart objects all stay,
    # and the same ground under another phrase is another answer
    walked = [Box(20, 30, 50, 60), Box(21, 31, 51, 61), Box(22, 31, 51, 62), Box(60, 30, 80, 50)]
    kept, _ = georeference(parse_boxes(format_grounded([("tank", walked), ("pier", [Box(20, 30, 50, 60)])])), loaded)
    assert [(b.phrase, b.pixel[0]) for b in kept] == [("tank", 120.0), ("tank", 360.0), ("pier", 120.0)]


def test_a_looping_generation_is_stopped() -> None:
    import torch

    from geochat.generation import StopOnLoop, boxes_circle, looped

    assert looped([9, 1, 2, 3, 4] + [5, 6, 7, 8] * 3, 4, 3) and not looped([5, 6, 7, 8] * 2 + [5, 6, 7, 9], 4, 3)
    drifting = [Box(2, 13, 3, 26), Box(2, 12, 38, 44), Box(2, 10, 33, 42), Box(16, 13, 23, 31),  # as the shipped
                Box(2, 12, 34, 44), Box(2, 11, 32, 43), Box(2, 11, 33, 45)]                   # model walks one box
    assert not boxes_circle(drifting[:6], 3) and boxes_circle(drifting, 3)
    tanks = [Box(10 * i, 10 * j, 10 * i + 8, 10 * j + 8) for i in range(3) for j in range(3)]  # nine distinct objects
    assert not boxes_circle(tanks, 3)
    text = {i: "".join(f"{{<{b.x1:g}><{b.y1:g}><{b.x2:g}><{b.y2:g}>}}" for b in drifting[:i]) for i in range(8)}
    stop = StopOnLoop(2, lambda new: text[len(new)])  # token k of the answer closes box k
    answers = [stop(torch.tensor([[0, 0, *range(i)]]), torch.empty(0)).item() for i in range(1, 8)]
    assert answers == [False] * 6 + [True]
    plain = StopOnLoop(1, lambda new: "")
    assert plain(torch.tensor([[0, *(list(range(10, 18)) * 3)]]), torch.empty(0)).item()  # 8 tokens, 3 times
    assert plain(torch.tensor([[0, 1, 2]]), torch.empty(0)).item()  # one instance follows one answer: stopped stays
    table = StopOnLoop(1, lambda new: "")
    assert not table(torch.tensor([[0, *([5, 6, 7, 8] * 6)]]), torch.empty(0)).item()  # a table rule "|---|---…"


def test_an_answer_stopped_for_repeating_itself_keeps_one_copy(gc: GeoChat, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = gc.assistant.tokenizer
    sentence = tok(" A large ship is moored in the busy port near the shore.", add_special_tokens=False)["input_ids"]
    assert len(sentence) >= 8
    script = tok("The scene:", add_special_tokens=False)["input_ids"] + sentence * 6

    def generate(input_ids: torch.Tensor, stopping_criteria: Any, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        out = input_ids  # as `generate` does: one token at a time until a criterion says stop
        for t in script[:max_new_tokens]:
            out = torch.cat([out, torch.tensor([[t]])], dim=1)
            if stopping_criteria(out, torch.empty(0)).all():
                break
        return out

    monkeypatch.setattr(gc.assistant.model, "generate", generate)
    answer = gc.chat(_image(), "describe the port", max_new_tokens=len(script))
    assert answer.answer == "The scene: A large ship is moored in the busy port near the shore."
    assert not answer.cut_short


def test_a_batched_answer_that_loops_stops_alone_and_keeps_one_copy(gc: GeoChat, monkeypatch: pytest.MonkeyPatch) -> None:
    """In `chat_batch`, a looping row stops (as `generate` does: later tokens padded) while the others go on."""
    tok = gc.assistant.tokenizer
    sentence = tok(" A large ship is moored in the busy port near the shore.", add_special_tokens=False)["input_ids"]
    looping = tok("The scene:", add_special_tokens=False)["input_ids"] + sentence * 6
    plain = tok(" Fields, a road and a river, then a small village with a church and trees around it all.",
                add_special_tokens=False)["input_ids"]
    pad = gc.assistant.pad_token_id
    scripts = [looping, plain + [pad] * (len(looping) - len(plain))]
    steps: list[int] = []

    def generate(input_ids: torch.Tensor, stopping_criteria: Any, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        out, done = input_ids, torch.zeros(len(input_ids), dtype=torch.bool)
        for k in range(max_new_tokens):
            step = torch.tensor([[pad if done[i] else scripts[i][k]] for i in range(len(out))])
            out = torch.cat([out, step], dim=1)
            done |= stopping_criteria(out, torch.empty(0))
            steps.append(k)
            if done.all():
                break
        return out

    monkeypatch.setattr(gc.assistant.model, "generate", generate)
    answers = gc.chat_batch([_image(), _image()[::-1]], "describe it", max_new_tokens=len(looping))
    assert answers[0] == "The scene: A large ship is moored in the busy port near the shore."
    assert answers[1] == tok.decode(plain).strip()
    assert len(steps) == len(looping)  # the other row was not stopped with it


def test_identify_requires_region_inside_image(gc: GeoChat) -> None:
    with pytest.raises(GeoChatError, match="needs a region"):
        gc.chat(_image(), "what is here?", task="identify")
    with pytest.raises(GeoChatError, match="outside the image"):
        gc.chat(_image(), "what is here?", task="identify", region=[0, 0, 500, 10])
    for bad in ([0, 0, float("nan"), 10], [0, 0, 10, 10, float("inf")]):  # NaN slips past min/max checks
        with pytest.raises(GeoChatError, match="not a finite number"):
            gc.chat(_image(), "what is here?", task="identify", region=bad)
    answer = gc.chat(_image(), "what is here?", task="identify", region=[5, 5, 30, 20])
    assert "[identify]" in answer.prompt and "{<" in answer.prompt


def test_cot_splits_reasoning(gc: GeoChat) -> None:
    answer = gc.chat(_image(), "is there water?", cot=True)
    assert "Answer:" in answer.prompt or "answer" in answer.prompt.lower()
    assert isinstance(answer.answer, str)


def test_save_and_reload_gives_identical_answers(gc: GeoChat, tmp_path: Path) -> None:
    image = _image()
    gc.save_pretrained(tmp_path / "a")
    reloaded = GeoChat.from_pretrained(tmp_path / "a", max_new_tokens=10)
    assert reloaded.chat(image, "describe it").raw == gc.chat(image, "describe it").raw


def test_loading_prints_no_library_bars_and_keeps_the_callers_setting(gc: GeoChat, tmp_path: Path,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    gc.save_pretrained(tmp_path / "a")
    capfd.readouterr()
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        try:
            GeoChat.from_pretrained(tmp_path / "a")
            assert hf_logging.is_progress_bar_enabled() is enabled  # the caller's setting is back
        finally:
            hf_logging.enable_progress_bar()
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "FutureWarning" not in err, err


def test_save_as_float16_halves_the_files_and_reloads(gc: GeoChat, tmp_path: Path) -> None:
    from safetensors import safe_open

    def size(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))

    gc.save_pretrained(tmp_path / "f32")
    gc.save_pretrained(tmp_path / "f16", dtype="float16")
    assert size(tmp_path / "f16") < 0.55 * size(tmp_path / "f32")
    for path in (tmp_path / "f16").rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert all(f.get_tensor(k).dtype != torch.float32 for k in f.keys())  # noqa: SIM118
    reloaded = GeoChat.from_pretrained(tmp_path / "f16", max_new_tokens=4)
    assert isinstance(reloaded.chat(_image(), "describe it").answer, str)
    with pytest.raises(GeoChatError, match="dtype must be 'float32' or 'float16'"):
        gc.save_pretrained(tmp_path / "x", dtype="bfloat16")


def test_answer_json_contract(gc: GeoChat, geotiffs: dict[str, Path]) -> None:
    data = gc.chat(geotiffs["rect_600x300_utm.tif"], "what is this?").to_json()
    assert set(data) == {"answer", "reasoning", "task", "boxes", "geojson", "facts", "sources", "model", "timings"}
    assert set(data["model"]) == {"name", "vision", "llm"}
    assert "untrained" in data["model"]["name"]
    assert set(data["timings"]) == {"encode_s", "ttft_s", "total_s"}
    assert data["facts"]["crs"].startswith("EPSG:")


def test_concurrent_users_get_their_own_answers(gc: GeoChat) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = [np.full((24 + 8 * i, 40, 3), 30 * i, np.uint8) for i in range(4)]
    questions = [f"question {i}" for i in range(4)]
    sequential = [gc.chat(img, q).raw for img, q in zip(images, questions, strict=True)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda iq: gc.chat(*iq).raw, zip(images, questions, strict=True)))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the inputs differ, so must the answers


def test_only_chat_turns_retrieve(gc: GeoChat) -> None:
    from geochat.prompting import Passage

    class Counting:
        calls = 0

        def search(self, query: str) -> list[Passage]:
            Counting.calls += 1
            return [Passage("S1", "knowledge/x.md", "H", "text", 0.6), Passage("S2", "knowledge/y.md", "H", "text", 0.2)]

    gc.retriever = Counting()
    try:
        assert gc.chat(_image(), "the river", task="refer").sources == []
        for task in ("caption", "classify"):  # pixel tasks are asked as the model was trained: no passages
            answer = gc.chat(_image(), "", task=task)
            assert answer.sources == [] and "REFERENCE PASSAGES" not in answer.prompt
        sources = gc.chat(_image(), "what is NDVI?").sources
        assert [s["source"] for s in sources] == ["knowledge/x.md"]  # the passage far from the question is left out
        assert Counting.calls == 1
    finally:
        gc.retriever = None


def test_chat_batch_equals_one_chat_per_image(gc: GeoChat, tmp_path: Path) -> None:
    """Batched greedy answers (left-padded prompts of different lengths) equal the one-by-one answers."""
    from PIL import Image

    rng = np.random.RandomState(3)
    paths = []
    for i, size in enumerate([(40, 40), (64, 48), (30, 90)]):  # facts differ in length → padding
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    labels = ["forest", "harbor", "desert"]
    for task, kwargs in (("caption", {}), ("classify", {"labels": labels})):
        batch = gc.chat_batch(paths, "", task=task, max_new_tokens=6, **kwargs)
        one = [gc.chat(p, "", task=task, max_new_tokens=6, **kwargs).answer for p in paths]
        assert batch == one and len(batch) == 3
    questions = ["is there a river?", "how many roads are there in this scene?", "what is it?"]
    assert gc.chat_batch(paths, questions, max_new_tokens=5) == [gc.chat(p, q, max_new_tokens=5).answer
                                                                 for p, q in zip(paths, questions, strict=True)]
    with pytest.raises(GeoChatError, match="messages for"):
        gc.chat_batch(paths, ["one"], max_new_tokens=2)
    with pytest.raises(GeoChatError, match="refer"):
        gc.chat_batch(paths, "a ship", task="refer")
    assert gc.chat_batch([], "x") == []


def test_classify_with_labels_answers_exactly_one_label(gc: GeoChat) -> None:
    """The tiny random model answers anything; with a label list it can only name one of them."""
    from geochat.generation import one_of

    labels = ["forest", "harbor", "desert", "bare_land"]
    free = gc.chat(_image(), "", task="classify", max_new_tokens=10).answer
    assert free not in labels  # unconstrained, the random model writes something else
    answer = gc.chat(_image(), "", task="classify", labels=labels, max_new_tokens=10).answer
    assert answer in labels
    assert all(a in labels for a in gc.chat_batch([_image(), _image()[::-1]], "", task="classify", labels=labels))

    tok = gc.assistant.tokenizer
    park, parking = tok.encode("park", add_special_tokens=False), tok.encode("parking", add_special_tokens=False)
    allowed = one_of(gc.assistant, ["park", "parking"], prompt_length=2)
    eos = gc.assistant.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    assert set(allowed(0, torch.tensor([7, 8]))) == {park[0], parking[0]}  # the prompt (2 ids) is not the answer
    after_park = set(allowed(0, torch.tensor([7, 8, *park])))
    assert eos <= after_park  # "park" is complete: it may end there ...
    if len(parking) > len(park) and parking[: len(park)] == park:
        assert parking[len(park)] in after_park  # ... or go on to "parking"
    assert set(allowed(0, torch.tensor([7, 8, *parking]))) == eos


def test_a_failed_generation_leaves_no_cache_that_disagrees_with_its_ids(gc: GeoChat,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    image = _image()
    gc._sessions.clear()
    first = gc.chat(image, "what is this?")
    (session,) = gc._sessions.values()
    assert session.cache is not None
    real = gc.assistant.model.generate

    def interrupted(*args: object, **kwargs: object) -> object:
        real(*args, **{**kwargs, "max_new_tokens": 2})  # grows the cache in place, then fails
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gc.assistant.model, "generate", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        gc.chat(image, "and the roads?", history=[first.as_turn()])
    monkeypatch.undo()
    assert session.cache is None and session.cached_ids is None
    again = gc.chat(image, "and the roads?", history=[first.as_turn()])
    gc._sessions.clear()
    assert again.answer == gc.chat(image, "and the roads?", history=[first.as_turn()]).answer


def test_an_abandoned_stream_stops_generating_and_frees_the_model(gc: GeoChat) -> None:
    image = _image()
    gc._sessions.clear()
    stream = gc.stream(image, "Describe this image.", max_new_tokens=400)
    pieces = iter(stream)
    assert isinstance(next(pieces), str)
    pieces.close()  # the client went away after the first piece
    assert gc._lock.acquire(timeout=30)  # the worker stops at its next piece and lets go of the model
    gc._lock.release()
    (session,) = gc._sessions.values()
    assert stream.answer is None and session.cache is None  # generation was cut short, not run to the end
    assert gc.chat(image, "Describe this image.", max_new_tokens=4).answer is not None


def test_max_new_tokens_below_one_is_refused(gc: GeoChat) -> None:
    with pytest.raises(GeoChatError, match="max_new_tokens must be at least 1"):
        gc.chat(_image(), "what is this?", max_new_tokens=-1)
    with pytest.raises(GeoChatError, match="max_new_tokens must be at least 1"):
        GeoChat(gc.assistant, max_new_tokens=0)


def test_an_answer_knows_whether_max_new_tokens_cut_it(gc: GeoChat) -> None:
    assert gc.chat(_image(), "Describe this image.", max_new_tokens=2).cut_short
    # decoding restricted to the labels ends with the label and end-of-text: not cut
    labelled = gc.chat(_image(), "which?", task="classify", labels=["forest", "river"], max_new_tokens=20)
    assert labelled.answer in ("forest", "river") and not labelled.cut_short
    assert "cut_short" not in labelled.to_json()


@pytest.mark.parametrize(("call", "words"), [
    (lambda gc: gc.chat(_image(), "x", task="dance"), "unknown task 'dance'; the tasks are chat, caption"),
    (lambda gc: gc.chat(_image(), "x", history=["just a question"]), "a (question, answer) pair of strings"),
    (lambda gc: gc.chat(_image(), None), "the message must be text, got NoneType"),
    (lambda gc: gc.chat(None, "the airport", task="refer"), "the refer task is about an image's pixels"),
    (lambda gc: gc.chat(_image(), "which?", task="classify", labels=["  ", "forest"]), "label 1 is empty"),
    (lambda gc: gc.chat(_image(), "hi \ud800"), "not valid Unicode"),
    (lambda gc: gc.chat_batch([_image()], "x", task="dance"), "unknown task"),
])
def test_python_callers_get_errors_that_say_what_to_do(gc: GeoChat, call: Any, words: str) -> None:
    with pytest.raises(GeoChatError, match=words.replace("(", r"\(").replace(")", r"\)")):
        call(gc)


def test_a_prompt_past_the_context_window_is_refused_before_generating(gc: GeoChat) -> None:
    from geochat.errors import PromptTooLongError

    window = gc.assistant.model.config.text_config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"context window of {window:,} tokens"):
        gc.chat(_image(), "\U0001f6f0" * window)
    assert gc.chat(_image(), "hello").answer is not None  # and the engine still answers


def test_classify_with_reasoning_still_answers_one_of_the_labels(gc: GeoChat) -> None:
    labels = ["airport", "forest", "dense residential"]
    for seed in range(3):
        answer = gc.chat((np.random.RandomState(seed).rand(48, 48, 3) * 255).astype(np.uint8), "which scene?",
                         task="classify", labels=labels, cot=True)
        assert answer.answer in labels, answer.raw
        assert answer.raw.endswith(f"Answer: {answer.answer}") or answer.raw.strip() == answer.answer


def test_classify_with_reasoning_streams_only_the_answer_it_gives(gc: GeoChat) -> None:
    labels = ["airport", "forest", "dense residential"]
    for seed in range(3):
        stream = gc.stream((np.random.RandomState(seed).rand(48, 48, 3) * 255).astype(np.uint8), "which scene?",
                           task="classify", labels=labels, cot=True)
        streamed = "".join(stream)
        assert stream.answer is not None and stream.answer.answer in labels
        assert streamed == stream.answer.raw  # no label streamed and then taken back


def test_held_answer_sends_reasoning_by_lines_and_the_answer_once_final() -> None:
    from geochat.generation import HeldAnswer

    got: list[str] = []
    held = HeldAnswer(got.append)
    for piece in ("Reasoning: green", " fields.\nno ro", "ofs.\nAns", "wer: farm", "land"):
        held(piece)
    assert "".join(got) == "Reasoning: green fields.\nno roofs.\n"  # the answer after the marker waits
    held.finish("Reasoning: green fields.\nno roofs.\nAnswer: forest")  # decoded again, bounded to the labels
    assert "".join(got) == "Reasoning: green fields.\nno roofs.\nAnswer: forest"
    got.clear()
    held = HeldAnswer(got.append)
    for piece in ("It is green, so the answer: far", "mland"):  # a marker inside a line
        held(piece)
    assert "".join(got) == "It is green, so the"
    got.clear()
    held = HeldAnswer(got.append)
    held("Trees.\nTrees.\nTrees.\n")  # a loop the final text has its repeats trimmed from
    held.finish("Trees.\nAnswer: forest")
    assert "".join(got) == "Trees.\nTrees.\nTrees.\nAnswer: forest"  # the answer still arrives


def test_an_image_without_a_valid_pixel_is_refused_not_described(gc: GeoChat, tmp_path: Path) -> None:
    import rasterio

    from geochat.errors import ImageryError

    path = tmp_path / "empty.tif"
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint8", nodata=0) as ds:
        ds.write(np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(ImageryError, match="empty.tif holds no valid pixel"):
        gc.chat(path, "what is here?")
    assert gc.chat(np.zeros((16, 16, 3), np.uint8), "what is here?").answer is not None  # black, not nodata
