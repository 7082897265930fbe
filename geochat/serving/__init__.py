"""The faces that serve the engine over the network: the Gradio app and the HTTP API, one process.

    app = create_app(GeoChat.from_pretrained(), ServingSettings())
    uvicorn.run(app, host="127.0.0.1", port=7860)

`create_app` puts the API routes (`/v1/...`, `/health`, `/docs`) on a FastAPI app and mounts the
Gradio page at `/` next to them. With an API token the page asks for it as its password (Gradio's login),
which also closes Gradio's own event endpoints (`gradio_client` can call them to run the model). Only this
package imports Gradio and FastAPI; the engine below knows neither.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from geochat.serving.limits import ServingSettings

if TYPE_CHECKING:  # the heavy imports wait until an app is made
    from fastapi import FastAPI

    from geochat.engine import GeoChat

__all__ = ["ServingSettings", "create_app"]


def create_app(gc: GeoChat, settings: ServingSettings, download_dir: Path | None = None) -> FastAPI:
    """The API routes plus the Gradio UI at `/`, sharing one engine."""
    import gradio as gr
    from fastapi import FastAPI

    from geochat.serving.api import install_api
    from geochat.serving.session import SessionLogic
    from geochat.serving.ui import CSS, EXAMPLES_DIR, build_ui, theme

    app = FastAPI(title="GeoChat API", version="1", description="Chat about remote-sensing imagery; see docs/API.md.")
    install_api(app, gc, settings)
    downloads = download_dir or Path(tempfile.mkdtemp(prefix="geochat-downloads-"))
    demo = build_ui(SessionLogic(gc, settings, downloads))
    allowed = [str(p) for p in (EXAMPLES_DIR, downloads) if p.is_dir()]
    return gr.mount_gradio_app(
        app, demo, path="/", theme=theme(), css=CSS, allowed_paths=allowed,
        max_file_size=settings.max_upload_bytes, footer_links=["gradio", "settings"], ssr_mode=False,
        auth=token_login(settings.api_token), auth_message=LOGIN_MESSAGE if settings.api_token else None,
    )


LOGIN_MESSAGE = "This server needs its API token: type it as the password (any user name)."


def token_login(token: str | None) -> Callable[[str, str], bool] | None:
    """Gradio's login check for a server with an API token (any user name, the token as password); None
    leaves the page open, as the API is without a token."""
    if token is None:
        return None
    expected = token.encode()

    def check(username: str, password: str) -> bool:
        return secrets.compare_digest(password.strip().encode(), expected)

    return check
