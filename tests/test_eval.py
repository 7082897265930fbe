"""Evaluation: metrics on hand-made cases with known values, and the `geochat eval` CLI end to end
(tiny tower / tiny assistant, generated images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geochat.cli import main
from geochat.eval.annotations import read_annotations
from geochat.eval.metrics import (
    accuracy,
    accuracy_by,
    caption_scores,
    caption_scores_with_items,
    confusion_matrix,
    grounding_accuracy,
    normalize_answer,
    recall_at_k,
    retrieval_recalls,
    vqa_match,
)
from geochat.eval.tasks import match_label
from geochat.grounding import Box
from tests.tiny import TINY_VISION, tiny_config

REFS = [
    ["many planes are parked near the terminal of a large airport .", "an airport with many planes ."],
    ["green farmland with a river crossing it from north to south .", "a river runs through farmland ."],
    ["dense residential houses stand along several straight roads .", "many houses along roads ."],
]
PERFECT = [r[0] for r in REFS]
SHUFFLED = [" ".join(reversed(r[0].rstrip(" .").split())) + " ." for r in REFS]
CAPTION_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


@pytest.fixture(scope="module")
def caption_items() -> tuple[dict[str, float], list[dict[str, float]]]:
    """One pycocoevalcap run (Java starts are slow): items 0-2 perfect, 3-5 the same words reversed."""
    return caption_scores_with_items(PERFECT + SHUFFLED, REFS + REFS)


def test_caption_metrics_perfect_is_one(caption_items: tuple[dict[str, float], list[dict[str, float]]]) -> None:
    corpus, items = caption_items
    assert list(corpus) == CAPTION_KEYS
    for item in items[:3]:
        for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
            assert item[key] == pytest.approx(1.0, abs=1e-6), key


def test_caption_metrics_drop_on_shuffled_words(caption_items: tuple[dict[str, float], list[dict[str, float]]]) -> None:
    corpus, items = caption_items
    for perfect, shuffled in zip(items[:3], items[3:], strict=False):
        assert shuffled["BLEU-1"] == pytest.approx(perfect["BLEU-1"], abs=1e-6)  # same words...
        assert shuffled["BLEU-4"] < 0.2 < perfect["BLEU-4"]                         # ...in the wrong order
        for key in ("METEOR", "ROUGE-L", "CIDEr"):
            assert shuffled[key] < perfect[key], key
    assert 0.2 < corpus["BLEU-4"] < 1.0  # half right


def test_caption_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        caption_scores(PERFECT[:2], REFS)
    with pytest.raises(ValueError):
        caption_scores(["a caption"], [[]])


def test_caption_metrics_keep_javas_stderr_unless_they_fail(capfd: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    capfd.readouterr()
    caption_scores(PERFECT[:1], REFS[:1])
    assert "PTBTokenizer" not in capfd.readouterr().err  # Java's "tokenized N tokens at …" rate line

    def failing(self: object, captions: object) -> None:  # a child process complains, then the step fails
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('java: no such jar\\n')"], check=True)
        raise RuntimeError("tokenizer failed")

    monkeypatch.setattr(PTBTokenizer, "tokenize", failing)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        caption_scores(PERFECT[:1], REFS[:1])
    assert "java: no such jar" in capfd.readouterr().err


def test_accuracy_confusion_and_per_class() -> None:
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "a"]
    assert accuracy(pred, gold) == 0.5
    assert accuracy_by(pred, gold, gold) == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert confusion_matrix(pred, gold, ["a", "b", "c"]).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    with pytest.raises(ValueError):
        accuracy(pred[:3], gold)


def test_recall_at_k_known_values() -> None:
    sim = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.3, 0.2, 0.1]])  # query 1's answer is 3rd, query 2's 2nd
    r = recall_at_k(sim, [{0}, {1}, {1}], ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_retrieval_recalls_both_directions() -> None:
    images = np.eye(3, dtype=np.float32)
    captions = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0.1, 0, 0.9]], dtype=np.float32)
    perfect = retrieval_recalls(images, captions, [0, 0, 1, 2])
    assert sorted(perfect) == ["i2t_R@1", "i2t_R@10", "i2t_R@5", "t2i_R@1", "t2i_R@10", "t2i_R@5"]
    assert perfect["t2i_R@1"] == 1.0 and perfect["i2t_R@1"] == 1.0
    wrong = retrieval_recalls(images, captions, [2, 2, 0, 1])  # captions assigned to the wrong images
    assert wrong["t2i_R@1"] == 0.0 and wrong["i2t_R@1"] == 0.0
    assert wrong["t2i_R@10"] == 1.0  # fewer than 10 images: everything is retrieved


def test_image_offsets_reorder_images_for_a_caption_never_captions_for_an_image() -> None:
    images = np.eye(3, dtype=np.float32)
    captions = np.array([[0.6, 0.5, 0], [0.7, 0, 0.6], [0, 0, 1]], dtype=np.float32)  # 0 and 1 prefer image 0, a hub
    plain = retrieval_recalls(images, captions, [1, 2, 2])
    hub = retrieval_recalls(images, captions, [1, 2, 2], image_offsets=np.array([0.3, 0.0, 0.0]))
    assert plain["t2i_R@1"] == pytest.approx(1 / 3) and hub["t2i_R@1"] == 1.0
    assert hub["i2t_R@1"] == plain["i2t_R@1"]  # one offset per image: its ranking of captions is the same
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        retrieval_recalls(images, captions, [1, 2, 2], image_offsets=np.array([0.3]))  # would broadcast silently


def test_grounding_accuracy_rotated_and_one_to_one() -> None:
    ref = Box(10, 10, 50, 20, 90)
    assert grounding_accuracy([[ref]], [[ref]]) == 1.0
    assert grounding_accuracy([[Box(10, 10, 50, 20, -90)]], [[ref]]) == 1.0  # the same rectangle
    assert grounding_accuracy([[Box(10, 10, 50, 20, 0)]], [[ref]]) == 0.0  # same box, wrong angle: IoU 1/7
    assert grounding_accuracy([[Box(20, 10, 60, 20, 90)]], [[ref]]) == 0.0  # shifted across its width
    assert grounding_accuracy([[Box(10, 15, 50, 25, 90)]], [[ref]]) == 1.0  # along its length: IoU 0.6
    # two predictions of the same box can match only one of two reference boxes
    other = Box(60, 60, 90, 90)
    assert grounding_accuracy([[ref, ref]], [[ref, other]]) == 0.5
    assert grounding_accuracy([[other, ref]], [[ref, other]]) == 1.0
    assert grounding_accuracy([[]], [[ref]]) == 0.0
    # only as many predicted boxes as there are references count, first first: listing boxes scores nothing
    assert grounding_accuracy([[other, ref]], [[ref]]) == 0.0
    assert grounding_accuracy([[ref, other]], [[ref]]) == 1.0


def test_vqa_normalisation_and_label_matching() -> None:
    assert normalize_answer("Two planes.") == "2 planes"
    assert vqa_match("1,000", "1000") and vqa_match("about 12,500 cars", "about 12500 cars")
    assert normalize_answer("3,4") == "3 4"  # a list of numbers is not a thousands separator
    assert vqa_match("Yes, there is a river.", "yes") and not vqa_match("No.", "yes")
    assert vqa_match("the airport", "airport") and not vqa_match("port", "airport")
    labels = ["airport", "bareland", "denseresidential", "mediumresidential"]
    assert match_label("Dense residential.", labels) == "denseresidential"
    assert match_label("It is an airport", labels) == "airport"
    assert match_label("bare lande", labels) == "bareland"


# -- CLI end to end on generated data ---------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 32-px images in two classes with captions, a VQA file and a grounding file."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    rng = np.random.RandomState(0)
    rows = []
    for i in range(6):
        label = "farmland" if i % 2 else "airport"
        colour = np.array([40, 160, 40] if i % 2 else [150, 150, 150], dtype=np.float64)
        img = np.clip(colour + rng.randn(32, 32, 3) * 20, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        row = {"image": f"images/{i}.png", "split": "test" if i < 5 else "train", "label": label,
               "captions": [f"an aerial view of {label} number {i} .", f"this is {label} ."]}
        if i == 4:
            del row["captions"]  # skipped by caption/retrieve
        rows.append(row)
    rows.append({"image": "images/0.png", "split": "test", "captions": ["no label here ."]})  # skipped by classify
    (root / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    vqa = [{"image": "images/0.png", "question": "Is there a runway?", "answer": "yes"},
           {"image": "images/1.png", "question": "How many rivers are there?", "answer": "1", "type": "count"}]
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in vqa) + "\n")
    ground = [{"image": "images/0.png", "phrase": "the runway", "boxes": [[2, 4, 20, 12, 15], [1, 1, 5, 5]]}]
    (root / "ground.jsonl").write_text("\n".join(json.dumps(r) for r in ground) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_tower_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.train.dual_encoder import save_tower

    torch.manual_seed(0)
    config = GeoHybridVisionConfig(**{**{k: v for k, v in TINY_VISION.items() if k != "model_type"}, "projection_dim": 384})
    return save_tower(GeoHybridVisionModel(config), tmp_path_factory.mktemp("tower")).parent


@pytest.fixture(scope="module")
def tiny_assistant_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geochat.model.assistant import build_assistant, save_assistant

    directory = tmp_path_factory.mktemp("assistant")
    return save_assistant(build_assistant(tiny_config(tiny_llm_dir)), directory)


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_repeated_labels_count_once() -> None:
    from geochat.eval.tasks import labels_of

    assert labels_of([], "forest, river,forest,,") == ["forest", "river"]


def test_annotations_split_filter(scenes: Path) -> None:
    assert len(read_annotations(scenes / "ann.jsonl")) == 7
    assert len(read_annotations(scenes / "ann.jsonl", "test")) == 6


def test_cli_classify_dual_json_and_report(scenes: Path, tiny_tower_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_json(capsys, "eval", "classify", "--annotations", str(scenes / "ann.jsonl"), "--split", "test",
                    "--model", str(tiny_tower_dir), "--json", "--report", str(tmp_path / "rep"))
    assert set(out) == {"task", "n", "accuracy", "per_class"}
    assert out["task"] == "classify" and out["n"] == 5  # the label-less row is skipped
    assert set(out["per_class"]) == {"airport", "farmland"}
    assert 0.0 <= out["accuracy"] <= 1.0
    assert (tmp_path / "rep" / "confusion.png").stat().st_size > 1000
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "confusion.png" in report
    assert "- rows: split `test`\n" in report  # a score means little without the rows it was measured on


def test_cli_retrieve_json_keys(scenes: Path, tiny_tower_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_json(capsys, "eval", "retrieve", "--annotations", str(scenes / "ann.jsonl"),
                    "--model", str(tiny_tower_dir), "--json", "--limit", "3")
    assert set(out) == {"task", "n", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"}
    assert out["n"] == 3 and out["t2i_R@10"] == 1.0  # 3 images: all are in the top 10


def test_cli_vlm_tasks_json_keys(scenes: Path, tiny_assistant_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(tiny_assistant_dir), "--json"]
    out = _run_json(capsys, "eval", "vqa", "--annotations", str(scenes / "vqa.jsonl"), *model)
    assert set(out) == {"task", "n", "accuracy", "per_type"} and set(out["per_type"]) == {"yes/no", "count"}
    out = _run_json(capsys, "eval", "ground", "--annotations", str(scenes / "ground.jsonl"), *model)
    assert set(out) == {"task", "n", "acc@0.5"} and out["n"] == 1
    out = _run_json(capsys, "eval", "classify", "--mode", "vlm", "--annotations", str(scenes / "ann.jsonl"),
                    "--limit", "2", "--labels", "airport,farmland,forest", *model)
    assert set(out) == {"task", "n", "accuracy", "per_class"} and out["n"] == 2
    out = _run_json(capsys, "eval", "caption", "--annotations", str(scenes / "ann.jsonl"), "--limit", "2", *model)
    assert set(out) == {"task", "n", *CAPTION_KEYS} and out["n"] == 2


def test_cli_errors_are_one_line(scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "vqa", "--annotations", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "ground", "--annotations", str(scenes / "ann.jsonl")]) == 2  # no usable rows
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\nnot json\n')
    assert main(["eval", "classify", "--annotations", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_real_rsicd_test_split_reads(shared_data: Path) -> None:
    rows = read_annotations(shared_data / "rsicd" / "annotations.jsonl", "test")
    assert len(rows) == 1094 and len({r.label for r in rows}) == 31
    assert all(len(r.captions) == 5 and r.image.is_file() for r in rows[:20])


def test_cli_sample_is_seeded_and_keeps_every_label(scenes: Path, tiny_tower_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from geochat.eval import tasks

    seen: list[tuple[list[str], list[str]]] = []
    real = tasks.classify_dual

    def recording(rows, labels, dual, progress=True):  # type: ignore[no-untyped-def]
        seen.append(([str(r.image) for r in rows], list(labels)))
        return real(rows, labels, dual, progress)

    monkeypatch.setattr(tasks, "classify_dual", recording)
    args = ["eval", "classify", "--annotations", str(scenes / "ann.jsonl"), "--model", str(tiny_tower_dir), "--json"]
    for seed in ("1", "1", "2"):
        assert _run_json(capsys, *args, "--sample", "2", "--seed", seed)["n"] == 2
    assert seen[0] == seen[1] and len(set(seen[0][0])) == 2
    assert _run_json(capsys, *args, "--limit", "1")["n"] == 1
    every = sorted({r["label"] for r in map(json.loads, (scenes / "ann.jsonl").read_text().splitlines()) if r.get("label")})
    assert all(labels == every for _, labels in seen)  # a subset of rows still chooses among all the file's labels
    assert main([*args, "--sample", "0"]) == 2


def test_ground_scores_boxes_in_the_raster_pixels_of_a_large_image(tmp_path: Path, tiny_assistant_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1500×1200 image is read at most 1024 px wide for the model; its boxes must still come back in the
    file's own pixels, where the references are."""
    from geochat import GeoChat
    from geochat.eval.tasks import ground

    Image.new("RGB", (1500, 1200), (90, 120, 60)).save(tmp_path / "big.png")
    # grid box 10..50 of the 1500-px padded square (150 px of padding above and below): pixels 150..750, 0..600
    (tmp_path / "ground.jsonl").write_text(json.dumps(
        {"image": "big.png", "phrase": "the field", "boxes": [[150, 0, 750, 600]]}) + "\n")
    chat = GeoChat.from_pretrained(str(tiny_assistant_dir))
    monkeypatch.setattr(chat, "_generate", lambda *a, **k: "<p>the field</p> {<10><10><50><50>|<0>}")
    result = ground(read_annotations(tmp_path / "ground.jsonl"), chat, progress=False)
    assert result.metrics["acc@0.5"] == 1.0
    assert np.allclose(result.predictions[0]["predicted"][0][:4], [150, 0, 750, 600], atol=1)


def test_ground_gives_the_answer_room_for_every_box(tmp_path: Path, tiny_assistant_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A scene with 12 objects: the answer must not be cut before its twelfth box (a box is 20-25 tokens)."""
    from geochat import GeoChat
    from geochat.eval.tasks import GROUND_MAX_NEW_TOKENS, ground, ground_budget
    from geochat.grounding import Box, format_grounded

    Image.new("RGB", (100, 100), (90, 120, 60)).save(tmp_path / "scene.png")
    grid = [Box(7 * i, 7 * i, 7 * i + 5, 7 * i + 5, -90 + i) for i in range(14)]  # pixels = grid on a 100-px square
    rows = [{"image": "scene.png", "phrase": "the tanks", "boxes": [[b.x1, b.y1, b.x2, b.y2, b.theta] for b in grid[:n]]}
            for n in (12, 14)]  # build-ground's cap, and a hand-made row with more
    (tmp_path / "ground.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = GeoChat.from_pretrained(str(tiny_assistant_dir))
    tok = chat.assistant.tokenizer
    full = format_grounded([("the tanks", grid)])  # a model that names all 14 unless the budget cuts it

    budgets: list[int] = []

    def generate(session: object, ids: list[int], max_new_tokens: int, *rest: object) -> str:
        budgets.append(max_new_tokens)
        return str(tok.decode(tok(full).input_ids[:max_new_tokens]))  # what a model cut at the budget writes

    monkeypatch.setattr(chat, "_generate", generate)
    result = ground(read_annotations(tmp_path / "ground.jsonl"), chat, progress=False)
    assert [len(p["predicted"]) >= n for p, n in zip(result.predictions, (12, 14), strict=True)] == [True, True]
    assert result.metrics["acc@0.5"] == 1.0
    assert budgets == [ground_budget(tok, "the tanks", 12), ground_budget(tok, "the tanks", 14)]
    assert budgets[0] < budgets[1] < ground_budget(tok, "the tanks", 1000) == GROUND_MAX_NEW_TOKENS  # capped


def test_retrieve_merges_rows_of_one_image_and_classify_needs_two_labels(scenes: Path, tiny_tower_dir: Path,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rows = [json.loads(line) for line in (scenes / "ann.jsonl").read_text().splitlines()][:3]
    split = [{**r, "image": str(scenes / r["image"]), "captions": [c]} for r in rows for c in r["captions"]]
    (tmp_path / "per_caption.jsonl").write_text("\n".join(json.dumps(r) for r in split) + "\n")
    out = _run_json(capsys, "eval", "retrieve", "--annotations", str(tmp_path / "per_caption.jsonl"),
                    "--model", str(tiny_tower_dir), "--json")
    assert out["n"] == 3  # one gallery image per file, not one per row
    one = [{**r, "image": str(scenes / r["image"]), "label": "airport"} for r in rows]
    (tmp_path / "one_label.jsonl").write_text("\n".join(json.dumps(r) for r in one) + "\n")
    assert main(["eval", "classify", "--annotations", str(tmp_path / "one_label.jsonl"),
                 "--model", str(tiny_tower_dir)]) == 2
    assert "pass --labels" in capsys.readouterr().err


@pytest.mark.parametrize(("row", "words"), [
    ({"image": "a.png", "captions": 5}, "list of sentences"),
    ({"image": "a.png", "label": ["a"]}, "'label' must be text"),
    ({"image": "a.png", "phrase": {"x": 1}}, "'phrase' must be text"),
    ({"image": "a.png", "phrase": "p", "boxes": [[1, 2, float("inf"), 4]]}, "finite"),
    ({"image": "a.png", "phrase": "p", "boxes": [[1, 2, 1, 4]]}, "no area"),
])
def test_rows_of_the_wrong_types_are_one_clear_error(tmp_path: Path, row: dict, words: str) -> None:
    from geochat.errors import GeoChatError

    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(GeoChatError, match=words):
        read_annotations(tmp_path / "a.jsonl")
    mixed = [{"image": "a.png", "question": "q", "answer": 3, "type": 3}, {"image": "a.png", "type": "count"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in mixed) + "\n")
    assert [r.type for r in read_annotations(tmp_path / "b.jsonl")] == ["3", "count"]  # sortable together


def test_a_report_path_that_is_a_file_is_refused_before_the_model_runs(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.jsonl").write_text('{"image": "x.png", "label": "port"}\n')
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["eval", "classify", "--annotations", str(tmp_path / "a.jsonl"), "--report",
                 str(tmp_path / "notes.txt"), "--model", str(tmp_path / "no-model")]) == 2
    assert "is a file; name a folder for the report" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
