"""Read evaluation annotations: one JSON object a line, images relative to the file.

Formats (see `../shared/data/README.md`):

- classification / captions: ``{"image", "label"?, "captions"?, "split"?}``
- VQA: ``{"image", "question", "answer", "type"?}``
- grounding: ``{"image", "phrase", "boxes": [[x1, y1, x2, y2, theta?], ...]}`` in pixels, theta in
  degrees (counter-clockwise on screen, as GeoChat's grammar)

Each task keeps the rows it can use (captions for caption/retrieve, a label for classify, ...);
a row that is not valid JSON or names no image is an error with its line number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geochat.errors import GeoChatError
from geochat.jsonl import iter_jsonl


@dataclass(frozen=True)
class Row:
    image: Path
    line: int
    split: str | None = None
    label: str | None = None
    captions: tuple[str, ...] = ()
    question: str | None = None
    answer: str | None = None
    type: str | None = None
    phrase: str | None = None
    boxes: tuple[tuple[float, ...], ...] = ()


def _boxes(value: Any, where: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, list):
        raise GeoChatError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2(, theta)]")
    out = []
    for box in value:
        if (not isinstance(box, list) or len(box) not in (4, 5)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise GeoChatError(f"{where}: a box must be [x1, y1, x2, y2] or [x1, y1, x2, y2, theta] of finite "
                               f"numbers (pixels; theta in degrees), got {box!r}")
        if box[0] == box[2] or box[1] == box[3]:
            raise GeoChatError(f"{where}: box {box!r} has no area (x1 = x2 or y1 = y2)")
        out.append(tuple(float(v) for v in box))
    return tuple(out)


def _text(obj: dict, key: str, where: str, numbers: bool = False) -> str | None:
    """`obj[key]` as text (None when absent); a list or an object there is an error, not its repr."""
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise GeoChatError(f"{where}: '{key}' must be text, got {value!r}")


def parse_row(obj: Any, base: Path, where: str) -> Row:
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise GeoChatError(f"{where}: each line must be a JSON object with an 'image' path")
    captions = obj.get("captions") or ()
    if isinstance(captions, str):
        captions = (captions,)
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise GeoChatError(f"{where}: 'captions' must be a list of sentences, got {captions!r}")
    return Row(
        image=(base / obj["image"]),
        line=int(where.rsplit(":", 1)[-1]),
        split=_text(obj, "split", where),
        label=_text(obj, "label", where, numbers=True),
        captions=tuple(c for c in captions if c.strip()),
        question=_text(obj, "question", where),
        answer=_text(obj, "answer", where, numbers=True),
        type=_text(obj, "type", where, numbers=True),
        phrase=_text(obj, "phrase", where),
        boxes=_boxes(obj["boxes"], where) if "boxes" in obj else (),
    )


def read_annotations(path: Path, split: str | None = None) -> list[Row]:
    """All rows of a JSONL file (only those of `split` when given)."""
    if not path.is_file():
        raise GeoChatError(f"annotation file not found: {path}")
    rows = []
    for i, obj in iter_jsonl(path):
        row = parse_row(obj, path.parent, f"{path}:{i}")
        if split is None or row.split == split:
            rows.append(row)
    return rows
