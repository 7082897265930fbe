"""The GeoChat app: the Gradio page and the HTTP API from one process (`make demo`).

    python app.py [--host 127.0.0.1] [--port 7860] [--model NAME_OR_DIR] [--max-new-tokens N]
                  [--api-token TOKEN] [--allowed-image-dir DIR ...] [--no-retrieval] [--k 4]
                  [--index-dir DIR | --chroma-host H --chroma-port P]

The page is at http://HOST:PORT/, the API at /v1/chat/completions, /v1/ground and /health (see
docs/API.md). The API token may also come from $GEOCHAT_API_TOKEN. Answers cite the shipped
documentation (knowledge/), indexed on first start, unless --no-retrieval.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from an offline server
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    from geochat.engine import GeoChat


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from geochat.commands.index import add_store_arguments
    from geochat.serving.limits import REPO_EXAMPLES, ServingSettings

    p = argparse.ArgumentParser(description="GeoChat: chat about remote-sensing imagery (web app + HTTP API)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=None, help="assistant directory or hub id (default: the offline default model)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer in tokens (default: the engine's)")
    p.add_argument("--api-token", default=ServingSettings.token_from_env(),
                   help="bearer token required by /v1/* (default: $GEOCHAT_API_TOKEN; none = open)")
    p.add_argument("--allowed-image-dir", action="append", type=Path, default=None,
                   help=f"directory whose files the API may read by path (repeatable; default: {REPO_EXAMPLES})")
    p.add_argument("--no-retrieval", action="store_true", help="answer without documentation passages")
    p.add_argument("--k", type=int, default=4, help="documentation passages per question (default 4)")
    add_store_arguments(p)
    return p.parse_args(argv)


def attach_retriever(gc: GeoChat, args: argparse.Namespace) -> None:
    """Documentation passages (and similar archive images) for the answers, as `geochat ask` has them."""
    from geochat.retrieval import StoreLocation, ensure_retriever

    location = StoreLocation.resolve(args.index_dir, args.chroma_host, args.chroma_port)
    retriever, built = ensure_retriever(location, k=args.k)
    if built is not None:
        print(f"indexed the documentation: {built.summary('documents')} ({location})", flush=True)
    if retriever is None:
        print(f"no documentation index at {location}; answering without retrieval", flush=True)
    gc.retriever = retriever


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns on every start on a CPU that its optional fast 4-bit kernels (the `kernels` package)
    # are missing; 4/8-bit loading works without them, so the log would only carry noise
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft probes transformers' renamed `is_gradient_checkpointing` when it wraps the model: a FutureWarning at
    # every start that no user can act on (peft's to change)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    import uvicorn

    from geochat.engine import GeoChat
    from geochat.errors import GeoChatError
    from geochat.serving import ServingSettings, create_app

    try:
        settings = ServingSettings(api_token=args.api_token)
        if args.allowed_image_dir:
            settings = replace(settings, allowed_image_dirs=tuple(args.allowed_image_dir))
        if args.k < 1:
            raise ValueError(f"--k must be at least 1, got {args.k}")
        gc = GeoChat.from_pretrained(args.model)
        if args.max_new_tokens is not None:
            gc.max_new_tokens = args.max_new_tokens
        if not args.no_retrieval:
            attach_retriever(gc, args)
    except (GeoChatError, ValueError) as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(gc, settings)
    print(f"GeoChat ({gc.model_info.name}) on http://{args.host}:{args.port}/  — API: /v1/chat/completions", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
