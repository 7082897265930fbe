"""The HTTP API: OpenAI-style chat completions, grounding to GeoJSON, health. See docs/API.md.

`POST /v1/chat/completions` speaks OpenAI's chat-completions shape, so any OpenAI client library
works: images come as `image_url` parts (a base64 data URL, or a path under `allowed_image_dirs`),
earlier user/assistant messages are the history, `stream: true` sends `chat.completion.chunk` SSE
events ending with `data: [DONE]`. The answer's boxes, GeoJSON, sources and reasoning come back in an
extra top-level field `geochat` (in the last chunk when streaming). Extra request fields `task`,
`cot`, `region`, `bands`, `sensor`, `labels` choose what the engine does.

Every failure answers `{"error": {"message": ..., "type": ...}}` with a 4xx code that says whose
fault it was (400 malformed, 401 token, 403 path not allowed, 413 too large, 422 unreadable image,
503 queue full); only a failure inside the model is a 500. The request shapes and the error bodies are in
`geochat.serving.schemas`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from geochat.answer import Answer, Turn
from geochat.engine import GeoChat
from geochat.errors import GeoChatError
from geochat.imagery import LoadedImage
from geochat.prompting import NEEDS_IMAGE, Task, build_user_message, prompt_facts
from geochat.serving.images import image_source, open_image
from geochat.serving.limits import RequestQueue, ServingSettings
from geochat.serving.render import AppendOnly, feature_collection, live_split
from geochat.serving.schemas import (
    ApiError,
    ChatMessage,
    ChatRequest,
    GroundRequest,
    error_body,
    install_error_handlers,
    validation_message,
)

logger = logging.getLogger(__name__)

BODY_READ_TIMEOUT_S = 120  # for the whole body: 32 MiB of base64 at about 3.5 Mbit/s
MAX_LABELS = 200  # `labels` of one request: each goes into the prompt and into every decoding step's constraint


# -- the router ----------------------------------------------------------------------------------

class _Prepared:
    """A chat request turned into engine arguments."""

    def __init__(self, loaded: LoadedImage | None, question: str, turns: list[Turn], kwargs: dict[str, Any]) -> None:
        self.loaded, self.question, self.turns, self.kwargs = loaded, question, turns, kwargs


def build_router(gc: GeoChat, settings: ServingSettings) -> APIRouter:
    queue = RequestQueue(settings.max_concurrent_requests, settings.max_queued_requests, settings.queue_timeout_s)

    def check_token(request: Request) -> None:
        if settings.api_token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_token.encode()):
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>'", "authentication_error")

    router = APIRouter()
    protected = APIRouter(dependencies=[Depends(check_token)])

    # Bodies are read a few at a time: each may be max_body_bytes, and they arrive before a queue slot is
    # taken, so many uploads at once would otherwise all sit in memory together.
    reading = asyncio.Semaphore(settings.max_concurrent_requests + 2)

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"request body is {int(declared):,} bytes, more than {settings.max_body_bytes:,} "
                                f"(max_upload_bytes={settings.max_upload_bytes:,} plus text)")
        async with reading:
            body = bytearray()
            try:
                async with asyncio.timeout(BODY_READ_TIMEOUT_S):  # a slow client must not hold a reading slot
                    async for chunk in request.stream():
                        body += chunk
                        if len(body) > settings.max_body_bytes:
                            raise ApiError(413, f"request body is larger than {settings.max_body_bytes:,} bytes")
            except TimeoutError as exc:
                raise ApiError(408, f"the request body took longer than {BODY_READ_TIMEOUT_S} s to arrive") from exc
            except ClientDisconnect as exc:  # nobody to answer; not a server error
                raise ApiError(400, "the client closed the connection before its request body arrived") from exc
            try:
                return json.loads(body)
            except ValueError as exc:  # not JSON, not UTF-8, or a number of more than 4,300 digits
                raise ApiError(400, f"request body is not valid JSON ({exc})") from exc
            except RecursionError as exc:
                raise ApiError(400, "request body nests JSON too deeply") from exc

    def parse(model: type[BaseModel], data: Any) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ApiError(400, validation_message(exc)) from exc

    def load(reference: str, bands: Any, sensor: str | None) -> LoadedImage:
        return open_image(image_source(reference, settings), settings, bands=bands, sensor=sensor)

    def prepare(req: ChatRequest) -> _Prepared:
        """Split messages into history and the question, find the image, check limits (blocking I/O)."""
        messages = [m for m in req.messages if m.role in ("user", "assistant")]
        if not messages or messages[-1].role != "user":
            raise ApiError(400, "messages must end with a user message")
        texts: list[tuple[str, str]] = []
        images: list[str] = []
        for m in messages:
            text, refs = _split_content(m)
            texts.append((m.role, text))
            images.extend(refs)
        if req.labels is not None and len(req.labels) > MAX_LABELS:
            raise ApiError(413, f"{len(req.labels):,} labels, more than {MAX_LABELS}; classify against fewer")
        total = sum(len(t) for _, t in texts) + sum(len(label) for label in req.labels or ())
        if total > settings.max_prompt_chars:
            raise ApiError(413, f"messages hold {total:,} characters, more than max_prompt_chars={settings.max_prompt_chars:,}")
        sources: dict[Any, Any] = {}  # the same file or upload sent again (under any name) is one image
        for reference in dict.fromkeys(images):
            source = image_source(reference, settings)
            sources.setdefault(source if isinstance(source, bytes) else source.resolve(), source)
        if len(sources) > 1:
            raise ApiError(400, "a conversation may hold one image; start a new conversation for another image")
        loaded = (open_image(next(iter(sources.values())), settings, bands=req.bands, sensor=req.sensor)
                  if sources else None)
        turns: list[Turn] = []
        pending: str | None = None
        for role, text in texts[:-1]:
            if role == "user":
                if pending is not None:
                    raise ApiError(400, "two user messages in a row: put an assistant message between them")
                pending = text
            else:
                if pending is None:
                    raise ApiError(400, "an assistant message must follow a user message")
                # Rebuilt as the engine built it: the prompt's facts (`prompt_facts`) in the first turn only.
                facts = prompt_facts(loaded.facts) if loaded is not None and not turns else None
                turns.append(Turn(_rebuild(pending, facts), text))
                pending = None
        if pending is not None:
            raise ApiError(400, "two user messages in a row: put an assistant message between them")
        task = Task(req.task) if req.task else Task.CHAT
        if loaded is None and task in NEEDS_IMAGE:
            raise ApiError(400, f"the {task.value} task needs an image: add an image_url part to a user message")
        if task is Task.IDENTIFY and req.region is None:
            raise ApiError(400, 'the identify task needs "region": [x1, y1, x2, y2] in pixels of the image')
        max_new = req.max_completion_tokens or req.max_tokens
        if max_new is not None and max_new > settings.max_new_tokens_cap:
            raise ApiError(400, f"max_tokens={max_new} is more than this server allows ({settings.max_new_tokens_cap})")
        kwargs = {"task": req.task, "cot": req.cot, "region": req.region, "labels": req.labels,
                  "max_new_tokens": max_new}
        return _Prepared(loaded, texts[-1][1], turns, kwargs)

    @router.get("/health")
    async def health() -> dict[str, Any]:
        info = gc.model_info
        return {"status": "ok", "model": info.name, "vision": info.vision, "llm": info.llm,
                "retrieval": gc.retriever is not None}

    @protected.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": gc.model_info.name, "object": "model", "created": 0,
                                            "owned_by": "geochat"}]}

    @protected.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": gc.model_info.name}
        ticket = await queue.acquire()  # decoding the image counts as work too
        handed_to_stream = False
        try:
            prepared = await run_in_threadpool(prepare, req)
            if not req.stream:
                answer = await run_in_threadpool(
                    gc.chat, prepared.loaded, prepared.question, history=prepared.turns, **prepared.kwargs)
                return JSONResponse(_completion(meta, answer))
            stream = gc.stream(prepared.loaded, prepared.question, history=prepared.turns, **prepared.kwargs)
            pieces = iter(stream)
            # The first piece is awaited here so that early failures (a bad task argument) get a real
            # 4xx status instead of an error event inside a 200 stream.
            first = await run_in_threadpool(next, pieces, None)
            handed_to_stream = True
            return StreamingResponse(
                _sse(meta, stream, pieces, first, prepared.kwargs["cot"], ticket.release),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(ticket.release),  # in case the body is never iterated
            )
        finally:
            if not handed_to_stream:
                ticket.release()

    @protected.post("/v1/ground")
    async def ground(request: Request) -> JSONResponse:
        req: GroundRequest = parse(GroundRequest, await read_json(request))
        if len(req.phrase) > settings.max_prompt_chars:
            raise ApiError(413, f"phrase is longer than max_prompt_chars={settings.max_prompt_chars:,}")
        ticket = await queue.acquire()
        try:
            loaded = await run_in_threadpool(load, req.image, req.bands, req.sensor)
            answer = await run_in_threadpool(gc.chat, loaded, req.phrase, task=Task.REFER)
        finally:
            ticket.release()
        collection = feature_collection(answer)
        collection["geochat"] = {
            "answer": answer.answer, "georeferenced": loaded.info.georeferenced, "model": answer.model.name,
            "boxes": answer.to_json()["boxes"],
        }
        return JSONResponse(collection)

    router.include_router(protected)

    def wrong_method(allowed: str) -> Any:
        async def refuse(request: Request) -> JSONResponse:
            return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}; use {allowed}"),
                                status_code=405, headers={"Allow": allowed})
        return refuse

    for path, allowed in (("/v1/chat/completions", "POST"), ("/v1/ground", "POST"), ("/v1/models", "GET")):
        router.add_api_route(path, wrong_method(allowed), include_in_schema=False,
                             methods=[m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if m != allowed])
    return router


def install_api(app: FastAPI, gc: GeoChat, settings: ServingSettings) -> None:
    install_error_handlers(app)
    app.include_router(build_router(gc, settings))


# -- helpers -------------------------------------------------------------------------------------

def _split_content(message: ChatMessage) -> tuple[str, list[str]]:
    """The text of a message and its image references (only user messages may carry images)."""
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts, images = [], []
    for part in message.content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.image_url is None:
            raise ApiError(400, "an image_url part needs {\"image_url\": {\"url\": ...}}")
        elif message.role != "user":
            raise ApiError(400, "only user messages may hold images")
        else:
            images.append(part.image_url.url)
    return "\n".join(t for t in texts if t), images


def _rebuild(question: str, facts: dict[str, Any] | None) -> str:
    try:
        return build_user_message(question, facts=facts)
    except ValueError as exc:
        raise ApiError(400, f"an earlier user message: {exc}") from exc


def _completion(meta: dict[str, Any], answer: Answer) -> dict[str, Any]:
    return {
        **meta, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                     "finish_reason": _finish(answer), "logprobs": None}],
        "geochat": answer.to_json(),
    }


def _finish(answer: Answer) -> str:
    """OpenAI's finish_reason: "length" when max_tokens cut the answer (clients may ask to continue)."""
    return "length" if answer.cut_short else "stop"


def _chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    body = {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def _sse(meta: dict[str, Any], stream: Any, pieces: Iterator[str], first: str | None, cot: bool,
               release: Any) -> AsyncIterator[bytes]:
    """SSE events: a role chunk, content (and reasoning_content) deltas, a final chunk, [DONE]."""
    answer_text, reasoning_text = AppendOnly(), AppendOnly()
    raw = ""

    def deltas() -> dict[str, str]:
        reasoning, answer = live_split(raw, cot)
        out = {}
        if r := reasoning_text.advance(reasoning or ""):
            out["reasoning_content"] = r
        if a := answer_text.advance(answer):
            out["content"] = a
        return out

    try:
        yield _chunk(meta, {"role": "assistant", "content": ""})
        piece = first
        while piece is not None:
            raw += piece
            if d := deltas():
                yield _chunk(meta, d)
            piece = await run_in_threadpool(next, pieces, None)
        answer: Answer = stream.answer
        rest = {}
        if r := reasoning_text.advance(answer.reasoning or ""):
            rest["reasoning_content"] = r
        if a := answer_text.advance(answer.answer):
            rest["content"] = a
        yield _chunk(meta, rest, finish=_finish(answer), geochat=answer.to_json())
    except GeoChatError as exc:
        yield f"data: {json.dumps(error_body(str(exc)))}\n\n".encode()
    except Exception as exc:  # the stream has started (status 200): report in-band, log the traceback
        logger.exception("streaming failed")
        yield f"data: {json.dumps(error_body(f'internal error ({type(exc).__name__}: {exc})', 'server_error'))}\n\n".encode()
    finally:
        if stream.answer is None:  # the client left (or the stream failed): stop generating for nobody
            stream.cancel()
        release()
    yield b"data: [DONE]\n\n"
