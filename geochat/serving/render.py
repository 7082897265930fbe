"""What the faces show of an image and an answer: info text, sources, boxes, live streamed text.

Shared by the Gradio UI and the HTTP API and free of both, so that each piece is a plain function
that tests call directly.

Streaming and markup: the model writes boxes and phrases as markup (``<p>airport</p>
{<10><20><30><40>|<0>}``) and, with chain-of-thought, a ``Reasoning: … Answer: …`` frame. While
text is still arriving, a box may be half-written (``{<10><2``). `live_split` holds back such an
unfinished tail and strips complete markup, so the text shown grows as a clean prefix of the final
answer; `AppendOnly` turns those growing texts into the append-only deltas that an SSE stream needs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from geochat.answer import Answer, BoxResult
from geochat.drawing import draw_boxes
from geochat.grounding import strip_grounding
from geochat.imagery import LoadedImage
from geochat.prompting import split_reasoning

EMPTY_COLLECTION: dict[str, Any] = {"type": "FeatureCollection", "features": []}
REGION_LABEL = "selected region"
SOURCE_TEXT_CHARS = 600  # how much of a passage the UI quotes
DISPLAY_MIN_PX = 480     # previews with a shorter long side are enlarged by a whole factor


# -- image ----------------------------------------------------------------------------------------

def display_zoom(loaded: LoadedImage) -> int:
    """How many screen pixels a preview pixel gets: small rasters (a 64 px chip) are enlarged."""
    return max(1, DISPLAY_MIN_PX // max(loaded.rgb.shape[:2]))


def annotate(
    loaded: LoadedImage, boxes: Sequence[BoxResult] = (), region: Sequence[float] | None = None, zoom: int = 1
) -> Image.Image:
    """The preview (enlarged `zoom` times, nearest neighbour) with the answer's boxes, labelled with
    their phrases, and the selected region."""
    polygons = [b.pixel_polygon() for b in boxes]
    labels: list[str | None] = [b.phrase for b in boxes]
    if region is not None:
        x1, y1, x2, y2 = region[:4]
        polygons.append([(x1, y1), (x2, y1), (x2, y2), (x1, y2)])
        labels.append(REGION_LABEL)
    rgb = loaded.rgb if zoom == 1 else np.repeat(np.repeat(loaded.rgb, zoom, axis=0), zoom, axis=1)
    return draw_boxes(rgb, polygons, labels, scale=loaded.scale / zoom)


def feature_collection(answer: Answer) -> dict[str, Any]:
    """The answer's boxes as a GeoJSON FeatureCollection (EPSG:4326); empty when there are none.

    A raster without georeferencing has boxes but no map coordinates: the collection is empty and
    the pixel boxes stay in the answer's ``boxes``.
    """
    return answer.geojson if answer.geojson is not None else dict(EMPTY_COLLECTION, features=[])


# -- text -----------------------------------------------------------------------------------------

def _fmt_number(value: float) -> str:
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def info_markdown(loaded: LoadedImage) -> str:
    """A short description of the raster: size, bands, CRS, resolution, bounds."""
    info, facts = loaded.info, loaded.facts
    lines = [f"**{facts.get('file') or 'image'}**: {info.width} × {info.height} px, "
             f"{info.count} band{'s' if info.count != 1 else ''} ({info.dtype})"]
    lines.append(f"- CRS: {facts.get('crs') or 'none (not georeferenced)'}")
    if info.gsd_m is not None:
        lines.append(f"- resolution: {_fmt_number(info.gsd_m)} m per pixel")
    if info.bounds_lonlat is not None:
        west, south, east, north = info.bounds_lonlat
        lines.append(f"- bounds (lon/lat): {west:.4f}, {south:.4f} → {east:.4f}, {north:.4f}")
    lines.append(f"- shown as RGB: bands {', '.join(str(b) for b in loaded.bands.rgb)} ({loaded.bands.source})")
    if facts.get("nodata_fraction"):
        lines.append(f"- no-data: {facts['nodata_fraction']:.0%} of the image")
    if loaded.scale > 1.0:
        lines.append(f"- preview downsampled ×{loaded.scale:.1f}; boxes are reported in full-resolution pixels")
    return "\n".join(lines)


def sources_markdown(sources: Sequence[dict[str, Any]]) -> str:
    """The passages an answer used: id, source file and heading, then a quote."""
    if not sources:
        return ""
    blocks = []
    for s in sources:
        title = f"**[{s.get('id', '?')}]** `{s.get('source', '?')}` — {s.get('heading') or '(no heading)'}"
        text = " ".join(str(s.get("text") or "").split())
        if len(text) > SOURCE_TEXT_CHARS:
            text = text[:SOURCE_TEXT_CHARS].rsplit(" ", 1)[0] + " …"
        blocks.append(f"{title}\n\n> {text}" if text else title)
    return "\n\n".join(blocks)


def timing_markdown(answer: Answer) -> str:
    t = answer.timings
    return f"model `{answer.model.name}` · first token {t.ttft_s:.2f} s · total {t.total_s:.2f} s"


# -- streaming ------------------------------------------------------------------------------------

def _complete_prefix(raw: str) -> str:
    """`raw` without a trailing box or tag that is still being written (an unclosed ``{`` or ``<``)."""
    brace = raw.rfind("{")
    if brace > raw.rfind("}"):
        raw = raw[:brace]
    angle = raw.rfind("<")
    if angle > raw.rfind(">"):
        raw = raw[:angle]
    return raw


def live_split(raw: str, cot: bool) -> tuple[str | None, str]:
    """(reasoning, answer) for text still being generated, markup stripped, unfinished tail held back.

    With chain-of-thought, text that opens with the ``Reasoning:`` label counts as reasoning until the
    ``Answer:`` marker arrives (a plain `split_reasoning` would call it all answer, then take it back); text
    that opens otherwise is the answer, as `split_reasoning` will call it when the model gives no reasoning
    (asked "Is it vegetated?", it may just say "Yes."); what could still become the label waits.
    """
    text = _complete_prefix(raw)
    if not cot:
        return None, strip_grounding(text)
    reasoning, answer = split_reasoning(text)
    if reasoning is None and answer == text.strip():  # no marker yet
        head = re.sub(r"^[\s>#*_-]+", "", text).lower()
        if "reasoning:".startswith(head.rstrip()):  # nothing yet, or the label still arriving
            return None, ""
        if _REASONING_OPENS.match(text):
            # Appending a marker reuses split_reasoning's own rule for dropping the "Reasoning:" label.
            reasoning, answer = split_reasoning(text + "\nAnswer:")[0], ""
    return (strip_grounding(reasoning) if reasoning else None), strip_grounding(answer)


_REASONING_OPENS = re.compile(r"^[\s>#*_-]*reasoning\b", re.IGNORECASE)


class AppendOnly:
    """Deltas of a text that is expected to grow; a text that is not an extension waits."""

    def __init__(self) -> None:
        self.sent = ""

    def advance(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str | None, default: str = "image") -> str:
    """A file-name-safe stem derived from `name` (for downloads)."""
    stem = _SAFE_NAME.sub("_", (name or default).rsplit(".", 1)[0]).strip("._")
    return stem[:60] or default
