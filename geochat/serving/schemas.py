"""The HTTP API's request shapes (OpenAI's chat completions, plus geochat's extra fields) and its errors:
`{"error": {"message": ..., "type": ...}}` with a 4xx code that says whose fault it was (`status_of`), a 500
only for a failure inside the model. `geochat.serving.api` holds the routes.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geochat.errors import GeoChatError, ImageryError, PromptTooLongError
from geochat.serving.images import BadImageReferenceError, ImageAccessError, ImageTooLargeError
from geochat.serving.limits import QueueFullError

logger = logging.getLogger(__name__)


# -- request shapes (OpenAI's, plus geochat's extra fields) --------------------------------------

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """Unknown OpenAI fields (temperature, top_p, ...) are accepted and ignored: decoding is greedy."""

    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    task: Literal["chat", "caption", "classify", "refer", "grounding", "identify"] | None = None
    cot: bool = False
    region: list[float] | None = Field(default=None, min_length=4, max_length=5)
    bands: list[int] | str | None = None
    sensor: str | None = None
    labels: list[str] | None = None


class GroundRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field(min_length=1)
    phrase: str = Field(min_length=1)
    bands: list[int] | str | None = None
    sensor: str | None = None


# -- errors --------------------------------------------------------------------------------------

class ApiError(Exception):
    """An HTTP error with a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def status_of(exc: GeoChatError) -> int:
    if isinstance(exc, (ImageTooLargeError, PromptTooLongError)):
        return 413
    if isinstance(exc, ImageAccessError):
        return 403
    if isinstance(exc, QueueFullError):
        return 503
    if isinstance(exc, BadImageReferenceError):
        return 400
    if isinstance(exc, ImageryError):
        return 422
    return 400


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors in OpenAI's shape for the API routes (the mounted Gradio app keeps its own)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind), status_code=exc.status)

    @app.exception_handler(GeoChatError)
    async def _geochat_error(request: Request, exc: GeoChatError) -> JSONResponse:
        status = status_of(exc)
        kind = "server_busy" if status == 503 else "invalid_request_error"
        return JSONResponse(error_body(str(exc), kind), status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed: %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}: {exc})", "server_error"),
                            status_code=500)


def validation_message(exc: ValidationError) -> str:
    # the deepest problem says what to fix: in {"content": "…" or [parts]}, a bad part's error rather
    # than "content.str: Input should be a valid string"
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
