"""Run one evaluation task over annotation rows: embed or ask, then score.

`classify` (mode `dual`) and `retrieve` use the dual encoder (the tower's pooled head ↔ MiniLM):
no language model is loaded. `classify` (mode `vlm`), `caption`, `vqa` and `ground` ask the
assistant through the engine, exactly as a user would, one image at a time.

Every result is a JSON-ready dict `{"task", "n", <metrics>, ("per_class" | "per_type")}`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from geochat.data.instruct import MAX_BOXES
from geochat.errors import GeoChatError
from geochat.eval.annotations import Row
from geochat.eval.metrics import (
    accuracy,
    accuracy_by,
    caption_scores,
    confusion_matrix,
    grounding_accuracy,
    normalize_answer,
    question_type,
    retrieval_recalls,
    vqa_match,
)
from geochat.grounding import Box, format_grounded

log = logging.getLogger(__name__)

TASKS = ("classify", "retrieve", "caption", "vqa", "ground")
CAPTION_MAX_NEW_TOKENS = 48
ANSWER_MAX_NEW_TOKENS = 32
GROUND_MAX_NEW_TOKENS = 1024  # room for ~40 boxes: a row with hundreds of objects is not given minutes of decoding
EVAL_BATCH = 16  # images per batched generation


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)  # per row, for the report
    confusion: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)


def rows_for(task: str, rows: Sequence[Row], limit: int | None) -> list[Row]:
    """The rows a task can use (captions for caption/retrieve, a label for classify, ...)."""
    need: dict[str, Callable[[Row], bool]] = {
        "classify": lambda r: bool(r.label),
        "retrieve": lambda r: bool(r.captions),
        "caption": lambda r: bool(r.captions),
        "vqa": lambda r: r.question is not None and r.answer is not None,
        "ground": lambda r: bool(r.phrase) and bool(r.boxes),
    }
    kept = [r for r in rows if need[task](r)]
    kept = kept[:limit] if limit is not None else kept
    if not kept:
        raise GeoChatError(f"no rows in the file can be used for '{task}' (see `geochat eval {task} --help`)")
    return kept


def _image(row: Row) -> Path:
    if not row.image.is_file():
        raise GeoChatError(f"line {row.line}: image not found: {row.image}")
    return row.image


def _rgb(row: Row) -> np.ndarray:
    return _rgb_of(_image(row))


def _rgb_of(path: Path) -> np.ndarray:
    from geochat.imagery import load_image

    return load_image(path).rgb


def _answers(chat: Any, rows: Sequence[Row], message: str | Sequence[str], desc: str, progress: bool,
             max_new_tokens: int, **kwargs: Any) -> list[str]:
    """The assistant's answers for `rows`, EVAL_BATCH images per batched generation (`GeoChat.chat_batch`).

    Images go in as files, so the facts block is the one the assistant saw in training and sees in use.
    """
    messages = [message] * len(rows) if isinstance(message, str) else list(message)
    out: list[str] = []
    with tqdm(total=len(rows), desc=desc, disable=not progress) as bar:
        for start in range(0, len(rows), EVAL_BATCH):
            batch = rows[start : start + EVAL_BATCH]
            out += chat.chat_batch([_image(r) for r in batch], messages[start : start + EVAL_BATCH],
                                   max_new_tokens=max_new_tokens, **kwargs)
            bar.update(len(batch))
    return out


def match_label(answer: str, labels: Sequence[str]) -> str:
    """The label a free-text answer names: exact, then contained, then closest spelling."""
    norm = {label: normalize_answer(label.replace("_", " ")) for label in labels}
    a = normalize_answer(answer)
    for label, n in norm.items():
        if a == n or a.replace(" ", "") == n.replace(" ", ""):
            return label
    contained = [label for label, n in norm.items() if n and (n in a or n.replace(" ", "") in a.replace(" ", ""))]
    if contained:
        return max(contained, key=lambda label: len(norm[label]))
    close = difflib.get_close_matches(a, list(norm.values()), n=1, cutoff=0.0)
    return next(label for label, n in norm.items() if close and n == close[0]) if close else labels[0]


def classify_dual(rows: Sequence[Row], labels: Sequence[str], dual: Any, progress: bool = True) -> EvalResult:
    label_emb = dual.embed_labels(labels)  # (L, D)
    image_emb = dual.embed_images([_rgb(r) for r in tqdm(rows, desc="images", disable=not progress)])
    predicted = [labels[i] for i in (image_emb @ label_emb.T).argmax(1)]
    return _classification_result(rows, labels, predicted)


def classify_vlm(rows: Sequence[Row], labels: Sequence[str], chat: Any, progress: bool = True) -> EvalResult:
    raw = _answers(chat, rows, "", "classify", progress, ANSWER_MAX_NEW_TOKENS, task="classify", labels=list(labels))
    return _classification_result(rows, labels, [match_label(a, labels) for a in raw], raw)


def _classification_result(rows: Sequence[Row], labels: Sequence[str], predicted: list[str],
                            raw: list[str] | None = None) -> EvalResult:
    gold = [str(r.label) for r in rows]
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise GeoChatError(f"labels {unknown[:5]} occur in the file but not in --labels")
    metrics = {"task": "classify", "n": len(rows), "accuracy": accuracy(predicted, gold),
               "per_class": accuracy_by(predicted, gold, gold)}
    preds = [{"image": str(r.image), "label": g, "predicted": p, **({"answer": raw[i]} if raw else {})}
             for i, (r, g, p) in enumerate(zip(rows, gold, predicted, strict=False))]
    return EvalResult(metrics, preds, confusion_matrix(predicted, gold, labels), list(labels))


def retrieve(rows: Sequence[Row], dual: Any, progress: bool = True) -> EvalResult:
    """Recall@K both ways. Rows that name the same image file are one gallery image with all their captions
    (a file with a row per caption would otherwise hold copies of an image that compete with each other)."""
    images: dict[Path, list[str]] = {}
    for r in rows:
        images.setdefault(_image(r).resolve(), []).extend(r.captions)
    paths = list(images)
    image_emb = dual.embed_images([_rgb_of(p) for p in tqdm(paths, desc="images", disable=not progress)])
    captions = [c for p in paths for c in images[p]]
    caption_image = [i for i, p in enumerate(paths) for _ in images[p]]
    caption_emb = dual.embed_queries(captions)  # the search path: expanded where the tower has a query bank,
    offsets = dual.image_offsets(image_emb)  # and its images ranked with the bank's hubness correction
    recalls = retrieval_recalls(image_emb, caption_emb, caption_image, offsets)
    return EvalResult({"task": "retrieve", "n": len(paths), **recalls})


def caption(rows: Sequence[Row], chat: Any, progress: bool = True) -> EvalResult:
    candidates = _answers(chat, rows, "", "caption", progress, CAPTION_MAX_NEW_TOKENS, task="caption")
    scores = caption_scores(candidates, [list(r.captions) for r in rows])
    preds = [{"image": str(r.image), "caption": c, "reference": r.captions[0]} for r, c in zip(rows, candidates, strict=False)]
    return EvalResult({"task": "caption", "n": len(rows), **scores}, preds)


def vqa(rows: Sequence[Row], chat: Any, progress: bool = True) -> EvalResult:
    hits, types, preds = [], [], []
    answers = _answers(chat, rows, [str(r.question) for r in rows], "vqa", progress, ANSWER_MAX_NEW_TOKENS)
    for r, answer in zip(rows, answers, strict=True):
        assert r.question is not None and r.answer is not None
        hits.append(vqa_match(answer, r.answer))
        types.append(r.type or question_type(r.question, r.answer))
        preds.append({"image": str(r.image), "question": r.question, "answer": r.answer, "predicted": answer})
    ok = ["1" if h else "0" for h in hits]
    per_type = accuracy_by(ok, ["1"] * len(ok), types)
    return EvalResult({"task": "vqa", "n": len(rows), "accuracy": accuracy(ok, ["1"] * len(ok)),
                       "per_type": per_type}, preds)


def _pixel_box(values: Sequence[float]) -> Box:
    x1, y1, x2, y2 = values[:4]
    theta = values[4] if len(values) == 5 else 0.0
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), theta)


def ground_budget(tokenizer: Any, phrase: str, boxes: int) -> int:
    """New tokens for an answer naming `phrase` with `boxes` boxes of the widest form, in the model's own
    tokenizer (a box takes 20-25 of SmolLM2's tokens: a fixed budget would cut answers short), at most
    GROUND_MAX_NEW_TOKENS. Every row gets room for build-ground's MAX_BOXES at least."""
    widest = Box(-100, -100, -100, -100, -90)
    need = len(tokenizer(format_grounded([(phrase, [widest] * boxes)])).input_ids) + 8  # + end of turn, spaces
    return min(need, GROUND_MAX_NEW_TOKENS)


def ground(rows: Sequence[Row], chat: Any, progress: bool = True) -> EvalResult:
    predicted, reference, preds = [], [], []
    for r in tqdm(rows, desc="ground", disable=not progress):
        # the file, not a decoded view: the engine maps boxes back to the raster's own pixels, in which the
        # references are given (a view of a large image is reduced to at most 1024 px)
        budget = ground_budget(chat.assistant.tokenizer, str(r.phrase), max(MAX_BOXES, len(r.boxes)))
        answer = chat.chat(_image(r), str(r.phrase), task="refer", max_new_tokens=budget)
        boxes = [_pixel_box(b.pixel) for b in answer.boxes]
        predicted.append(boxes)
        reference.append([_pixel_box(b) for b in r.boxes])
        preds.append({"image": str(r.image), "phrase": r.phrase, "raw": answer.raw,
                      "predicted": [list(b.pixel) for b in answer.boxes], "reference": [list(b) for b in r.boxes]})
    return EvalResult({"task": "ground", "n": len(rows), "acc@0.5": grounding_accuracy(predicted, reference)}, preds)


def labels_of(rows: Sequence[Row], given: str | None) -> list[str]:
    """`--labels "a,b"` as written, else the sorted set of labels in the file."""
    if given:
        labels = list(dict.fromkeys(s.strip() for s in given.split(",") if s.strip()))  # repeats once
        if len(labels) < 2:
            raise GeoChatError("--labels needs at least two comma-separated labels")
        return labels
    found = sorted({str(r.label) for r in rows})
    if len(found) < 2:
        raise GeoChatError(f"the file's labelled rows name {len(found)} label(s) ({', '.join(found)}); zero-shot "
                           "classification needs at least two to choose from: pass --labels \"a,b,...\"")
    return found


def load_dual(model: str | None) -> Any:
    """The dual encoder of an assistant/align directory (its search tower if it has one), or of the shipped default."""
    from geochat.engine import names_the_default
    from geochat.model.config import CONFIG_FILE, AssistantConfig
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.model.weights import TRAINED_DEFAULT_DIR
    from geochat.train.dual_encoder import (
        DualEncoder,
        TextEncoder,
        load_query_bank,
        load_text_head,
        load_tower,
        search_tower_dir,
        tower_weights,
    )

    if names_the_default(model):
        model = None
    directory = Path(model) if model else TRAINED_DEFAULT_DIR
    search = search_tower_dir(directory)
    if tower_weights(search).is_file():
        tower = load_tower(search)
    elif model:
        raise GeoChatError(f"'{model}' holds no trained vision tower (vision/model.safetensors)")
    else:
        log.warning("no trained default model ships yet: the dual encoder's head is untrained")
        tower = GeoHybridVisionModel(GeoHybridVisionConfig())
        tower.load_stem_weights()
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if (directory / CONFIG_FILE).is_file():
        cfg = AssistantConfig.load(directory)
        mean, std = cfg.image_mean, cfg.image_std
    return DualEncoder(tower, TextEncoder(), mean, std, bank=load_query_bank(search), text_head=load_text_head(search))
