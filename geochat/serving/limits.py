"""Named limits of the app and the HTTP API, and the queue that keeps concurrent requests in line.

A public server meets inputs that a library call never sees: a 2 GB upload, a 50 000² raster, a
novel pasted into the prompt, a hundred requests at once. Each of those has a named setting here,
so that an operator can read and change them in one place, and every refusal names the setting it
hit. Requests beyond `max_concurrent_requests` wait in a queue (they are not refused) unless the
queue itself is full or a request has waited longer than `queue_timeout_s`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from geochat.errors import GeoChatError

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN_ENV = "GEOCHAT_API_TOKEN"
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServingSettings:
    """What the app and the API accept. All sizes are checked before the model sees anything."""

    max_upload_bytes: int = 32 * MiB          # one image file (decoded data URL or upload)
    max_image_pixels: int = 100_000_000       # width × height of the raster (a 10 000² scene)
    max_preview_size: int = 1024              # long side of the RGB view given to the model and UI
    max_prompt_chars: int = 8_000             # all text of one request's messages together
    max_new_tokens_cap: int = 1024            # the most a request's max_tokens may ask for
    max_concurrent_requests: int = 4          # API requests in flight; the rest queue
    max_queued_requests: int = 64             # beyond this many waiting, answer 503
    queue_timeout_s: float = 600.0            # a request waiting longer gets 503
    api_token: str | None = None              # bearer token for /v1/*; None = open
    allowed_image_dirs: tuple[Path, ...] = (REPO_EXAMPLES,)   # where image paths may point

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_image_pixels", "max_preview_size", "max_prompt_chars",
                     "max_new_tokens_cap", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not self.queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be positive, got {self.queue_timeout_s}")
        if self.api_token is not None and not self.api_token.strip():
            raise ValueError("api_token must not be blank; pass None to leave the API open")
        # Resolved once, so that the containment check compares real paths (symlinks followed).
        object.__setattr__(self, "allowed_image_dirs", tuple(Path(d).resolve() for d in self.allowed_image_dirs))

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: one base64 image (4/3 of its bytes) plus room for the text."""
        return self.max_upload_bytes * 4 // 3 + 4 * self.max_prompt_chars + MiB

    @staticmethod
    def token_from_env() -> str | None:
        return os.environ.get(TOKEN_ENV) or None


class QueueFullError(GeoChatError):
    """Too many requests are waiting, or one waited longer than the queue timeout."""


class RequestQueue:
    """At most `limit` holders at once; others wait first come, first served.

    An asyncio semaphore, created lazily inside the running event loop (uvicorn's), plus a count of
    waiters so that an overloaded server says so (`QueueFullError` → 503) instead of piling up
    requests without end. `release` is idempotent per ticket, so a stream can release from both its
    generator and its closing hook.
    """

    def __init__(self, limit: int, max_waiting: int, timeout_s: float) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._semaphore: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0

    async def acquire(self) -> Ticket:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            raise QueueFullError(
                f"the server is busy: {self.running} requests running and {self.waiting} waiting "
                f"(max_queued_requests={self.max_waiting}); try again later"
            )
        self.waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise QueueFullError(
                f"the server is busy: the request waited {self.timeout_s:.0f} s in the queue "
                f"(queue_timeout_s); try again later"
            ) from None
        finally:
            self.waiting -= 1
        self.running += 1
        return Ticket(self)

    def _release(self) -> None:
        assert self._semaphore is not None
        self.running -= 1
        self._semaphore.release()


class Ticket:
    """One place in the running set; `release()` gives it back (once, however often it is called)."""

    def __init__(self, queue: RequestQueue) -> None:
        self._queue: RequestQueue | None = queue

    def release(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            queue._release()
