"""What the app does for one browser tab, without Gradio: open an image, pick a region, ask, start over.

Each tab owns a `ChatSession` (kept in `gr.State`, so tabs never share images or chats); the
`SessionLogic` methods take a session and return or yield it updated. Gradio's event wiring lives in
`ui.py`; here everything is a plain function of plain values, which the tests call directly.

Errors: anything the user can fix raises `GeoChatError` with a message meant for them; a failure
inside the model is logged with its traceback and re-raised as `AnswerFailedError` with one line.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from geochat.answer import Answer, BoxResult
from geochat.engine import GeoChat
from geochat.errors import GeoChatError
from geochat.imagery import LoadedImage, load_image
from geochat.prompting import NEEDS_IMAGE, Task
from geochat.serving.images import open_image, parse_bands
from geochat.serving.limits import ServingSettings
from geochat.serving.render import annotate, display_zoom, live_split, safe_stem

logger = logging.getLogger(__name__)

SIMILAR_IMAGES_K = 4
THUMBNAIL_PX = 256
CORNER_MARK_PX = 4  # half-size, in shown pixels, of the mark left by the first click of a region

Message = dict[str, Any]  # a Chatbot message: {"role", "content"[, "metadata"]}


class AnswerFailedError(GeoChatError):
    """The model raised something other than a GeoChatError while answering."""


@dataclass
class AskOptions:
    """The task controls next to the chat box."""

    task: str = "chat"
    cot: bool = False
    labels: str = ""                                        # classify: comma-separated options
    region: tuple[float, float, float, float] | None = None  # identify: pixels of the original raster


@dataclass
class ChatSession:
    """One tab's image, conversation and selection."""

    image_name: str | None = None
    loaded: LoadedImage | None = None
    answers: list[Answer] = field(default_factory=list)     # earlier turns, passed back as history
    transcript: list[Message] = field(default_factory=list)
    boxes: list[BoxResult] = field(default_factory=list)    # of the last answer
    sources: list[dict[str, Any]] = field(default_factory=list)
    similar: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (thumbnail RGB, caption)
    corner: tuple[float, float] | None = None               # first click of a region, original pixels
    region: tuple[float, float, float, float] | None = None
    geojson_path: str | None = None
    status: str = ""                                        # a one-line note under the chat
    rendering: tuple[str, str] = ("", "")                   # the sensor preset and band text it was opened with


class SessionLogic:
    """The app's behaviour over one shared engine; holds no per-user state itself."""

    def __init__(self, gc: GeoChat, settings: ServingSettings, download_dir: Path) -> None:
        self.gc = gc
        self.settings = settings
        self.download_dir = download_dir
        download_dir.mkdir(parents=True, exist_ok=True)

    # -- image --------------------------------------------------------------------------------

    def open(self, path: str | Path | None, sensor: str | None = None, bands: str | None = None) -> ChatSession:
        """A fresh session for the file at `path` (an empty one for None)."""
        if path is None:
            return ChatSession()
        path = Path(path)
        try:
            loaded = open_image(path, self.settings, bands=parse_bands(bands), sensor=sensor or None)
        except GeoChatError as exc:  # an upload lies in the server's temp folder: the user knows it by its name
            exc.args = (str(exc).replace(str(path), path.name), *exc.args[1:])
            raise
        session = ChatSession(image_name=path.name, loaded=loaded, rendering=(sensor or "", (bands or "").strip()))
        session.similar = self._similar(loaded)
        return session

    def _similar(self, loaded: LoadedImage) -> list[tuple[np.ndarray, str]]:
        """Thumbnails of archive images like this one, when the retriever has an image archive.

        `Retriever.similar_images(rgb, k)` gives hits with `.path`, `.score` and `.metadata`; each is
        read again as a small RGB view (archive files may be GeoTIFFs, which browsers cannot show).
        The panel is optional: a failure is logged and the panel stays empty.
        """
        if self.gc.retriever is None:
            return []
        try:
            hits = self.gc.retriever.similar_images(loaded.rgb, k=SIMILAR_IMAGES_K)
        except Exception:  # an optional panel must not break opening the image
            logger.exception("similar_images failed")
            return []
        out: list[tuple[np.ndarray, str]] = []
        for hit in hits or ():
            try:
                thumb = load_image(hit.path, max_size=THUMBNAIL_PX).rgb
            except GeoChatError as exc:
                logger.warning("similar image %s unreadable: %s", hit.path, exc)
                continue
            caption = (hit.metadata or {}).get("caption") or Path(hit.path).name
            out.append((thumb, f"{caption} ({hit.score:.2f})"))
        return out

    def view(self, session: ChatSession) -> Image.Image | None:
        """The preview with the last answer's boxes, the selected region and a pending corner."""
        if session.loaded is None:
            return None
        zoom = display_zoom(session.loaded)
        image = annotate(session.loaded, session.boxes, session.region, zoom=zoom)
        if session.corner is not None:
            s, r = session.loaded.scale / zoom, CORNER_MARK_PX
            x, y = session.corner[0] / s, session.corner[1] / s
            draw = ImageDraw.Draw(image)  # black under white: seen on bright ground and on dark
            draw.ellipse([x - r - 2, y - r - 2, x + r + 2, y + r + 2], outline=(0, 0, 0), width=2)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), width=2)
        return image

    # -- region -------------------------------------------------------------------------------

    def pick(self, session: ChatSession, x: float, y: float) -> ChatSession:
        """A click on the shown image at (x, y): the first click sets a corner, the second the region."""
        if session.loaded is None:
            raise GeoChatError("upload an image before choosing a region")
        if not (math.isfinite(x) and math.isfinite(y)):
            raise GeoChatError("click inside the image (wait until it has loaded) to choose a corner")
        w, h = session.loaded.info.width, session.loaded.info.height
        s = session.loaded.scale / display_zoom(session.loaded)  # original pixels per shown pixel
        point = (min(max(x * s, 0.0), float(w)), min(max(y * s, 0.0), float(h)))
        if session.corner is None:
            session.corner, session.region = point, None
            return session
        (x1, y1), (x2, y2) = session.corner, point
        if abs(x2 - x1) < max(s, 1.0) or abs(y2 - y1) < max(s, 1.0):  # a double click, not a box
            session.corner = point
            return session
        session.corner = None
        session.region = (round(min(x1, x2), 1), round(min(y1, y2), 1), round(max(x1, x2), 1), round(max(y1, y2), 1))
        return session

    def set_region(self, session: ChatSession, values: Sequence[float | None]) -> ChatSession:
        """Region typed as x1, y1, x2, y2 (pixels), kept inside the image; any empty field, or a region
        with nothing of the image in it, clears it."""
        if any(v is None or not math.isfinite(v) for v in values):
            session.region = None
            return session
        x1, y1, x2, y2 = (float(v) for v in values if v is not None)
        if session.loaded is not None:
            w, h = float(session.loaded.info.width), float(session.loaded.info.height)
            x1, x2 = (min(max(v, 0.0), w) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), h) for v in (y1, y2))
        session.corner = None
        region = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        session.region = region if region[2] > region[0] and region[3] > region[1] else None
        return session

    # -- chat ---------------------------------------------------------------------------------

    def reset(self, session: ChatSession) -> ChatSession:
        """Start over: same image, empty conversation, no boxes or region."""
        return ChatSession(image_name=session.image_name, loaded=session.loaded, similar=session.similar,
                           rendering=session.rendering)

    def ask(self, session: ChatSession, message: str, options: AskOptions) -> Iterator[ChatSession]:
        """Stream one turn: yields the session as text arrives, then once more with the final answer."""
        task, labels, region = self._check(session, message, options)
        before = session.transcript
        base = [*before, {"role": "user", "content": _shown_question(message, task, labels, region)}]
        session.transcript = [*base, {"role": "assistant", "content": "…"}]
        answered, failed = len(session.answers), False
        try:
            yield session
            yield from self._answer(session, message, options, task, labels, region, base)
        except GeoChatError:  # the turn ends with its error message in the conversation
            failed = True
            raise
        finally:
            if not failed and len(session.answers) == answered:
                # stopped while streaming (another image, Start over): the half-shown turn was never asked
                session.transcript = before

    def _answer(self, session: ChatSession, message: str, options: AskOptions, task: Task, labels: list[str] | None,
                region: tuple[float, float, float, float] | None, base: list[Message]) -> Iterator[ChatSession]:
        """`ask`'s streaming part: the model's text as it arrives, then the finished turn."""
        stream = self.gc.stream(
            session.loaded, message, history=[a.as_turn() for a in session.answers], task=task,
            cot=options.cot, region=region, labels=labels,
        )
        raw = ""
        try:
            for piece in stream:
                raw += piece
                reasoning, text = live_split(raw, options.cot)
                session.transcript = [*base, *_assistant_messages(reasoning, text or "…", done=False)]
                yield session
        except GeoChatError as exc:
            session.transcript = [*base, _error_message(str(exc))]
            raise
        except Exception as exc:  # the face boundary: the user gets one line, the log the traceback
            logger.exception("answering failed")
            message = f"the model failed while answering ({type(exc).__name__}: {exc})"
            session.transcript = [*base, _error_message(message)]
            raise AnswerFailedError(message) from exc
        answer = stream.answer
        assert answer is not None
        session.answers = [*session.answers, answer]
        session.boxes, session.sources = list(answer.boxes), list(answer.sources)
        session.geojson_path = self._write_geojson(session, answer)
        text = answer.answer or "(no answer text)"
        if answer.boxes:
            text += f"\n\n*{len(answer.boxes)} box{'es' if len(answer.boxes) != 1 else ''} drawn on the image.*"
        elif task in (Task.REFER, Task.GROUNDING):
            text += "\n\n*No boxes on the image in this answer.*"
        if answer.cut_short:
            text += "\n\n*The answer reached the length limit and was cut short.*"
        session.transcript = [*base, *_assistant_messages(answer.reasoning, text, done=True)]
        t = answer.timings
        session.status = f"model `{answer.model.name}` · first token {t.ttft_s:.2f} s · total {t.total_s:.2f} s"
        yield session

    def _check(
        self, session: ChatSession, message: str, options: AskOptions
    ) -> tuple[Task, list[str] | None, tuple[float, float, float, float] | None]:
        try:
            task = Task(options.task)
        except ValueError:
            raise GeoChatError(f"unknown task {options.task!r}; choose one of {[t.value for t in Task]}") from None
        if len(message) > self.settings.max_prompt_chars:
            raise GeoChatError(f"the message is {len(message):,} characters; the limit is {self.settings.max_prompt_chars:,}")
        if task in NEEDS_IMAGE and session.loaded is None:
            raise GeoChatError(f"the {task.value} task needs an image: upload one or pick an example first")
        if task is Task.CHAT and not message.strip():
            raise GeoChatError("type a question first")
        if task is Task.REFER and not message.strip():
            raise GeoChatError("type the thing to locate, e.g. 'the airport' or 'ships near the pier'")
        region = options.region if task is Task.IDENTIFY else None
        if task is Task.IDENTIFY and region is None:
            raise GeoChatError("the identify task needs a region: click two opposite corners on the image, "
                               "or type x1, y1, x2, y2 in pixels")
        labels = [s.strip() for s in options.labels.split(",") if s.strip()] if task is Task.CLASSIFY else []
        return task, labels or None, region

    def _write_geojson(self, session: ChatSession, answer: Answer) -> str | None:
        if not answer.geojson or not answer.geojson.get("features"):
            return None
        path = self.download_dir / f"{safe_stem(session.image_name)}-boxes-{uuid.uuid4().hex[:8]}.geojson"
        path.write_text(json.dumps(answer.geojson, indent=1), encoding="utf-8")
        return str(path)


def _shown_question(message: str, task: Task, labels: list[str] | None, region: Sequence[float] | None) -> str:
    text = message.strip()
    if task is Task.CHAT:
        return text
    detail = ""
    if labels:
        detail = f" (options: {', '.join(labels)})"
    if region is not None:
        detail = f" (region {', '.join(f'{v:g}' for v in region[:4])})"
    return f"**{task.value}**{detail}" + (f": {text}" if text else "")


def _assistant_messages(reasoning: str | None, text: str, done: bool) -> list[Message]:
    messages: list[Message] = []
    if reasoning:
        # A Chatbot "thought": folded once the answer is complete, open while it streams.
        messages.append({"role": "assistant", "content": reasoning,
                         "metadata": {"title": "Reasoning", "status": "done" if done else "pending"}})
    messages.append({"role": "assistant", "content": text})
    return messages


def _error_message(text: str) -> Message:
    return {"role": "assistant", "content": f"⚠️ **Could not answer:** {text}"}
