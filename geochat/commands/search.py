"""`geochat search "text" [--image PATH] [--k 5] [--json]`: passages and archive images from the store.

JSON: `{"passages": [{"source", "heading", "text", "score"}], "images": [{"path", "score", "metadata"}]}`.
Text finds passages and (through the image embedder's text side or the captions) images; `--image`
finds archive images that look alike. The docs index is built from the shipped `knowledge/` on first
use when the store does not exist yet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from geochat.commands.index import add_store_arguments
from geochat.errors import GeoChatError


def register(sub: Any) -> None:
    p = sub.add_parser("search", help="search the documentation and image archive")
    p.add_argument("text", nargs="?", default=None, help="what to look for")
    p.add_argument("--image", type=Path, default=None, help="find archive images similar to this one")
    p.add_argument("--k", type=int, default=5, help="results per kind (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_store_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.text is not None and not args.text.strip():
        args.text = None  # blank text is no text: refused below like an empty one, not searched for nothing
    if not args.text and args.image is None:
        raise GeoChatError('pass text to search for, --image PATH, or both: geochat search "NDVI formula"')
    if args.k < 1:
        raise GeoChatError(f"--k must be at least 1, got {args.k}")
    if args.image is not None and not args.image.is_file():
        raise GeoChatError(f"image not found: {args.image}")
    from geochat.retrieval import BUNDLED_KNOWLEDGE, StoreLocation, ensure_retriever

    location = StoreLocation.resolve(args.index_dir, args.chroma_host, args.chroma_port)
    retriever, _ = ensure_retriever(location, docs_root=BUNDLED_KNOWLEDGE if args.text else None, k=args.k)
    if retriever is None:
        raise GeoChatError(f"no index at {location}: run `geochat index docs` first")
    passages = retriever.search(args.text) if args.text else []
    if args.image is not None:
        images = retriever.similar_images(args.image)
    else:
        images = retriever.search_images(args.text) if args.text else []
    if args.json:
        out = {
            "passages": [{"source": p.source, "heading": p.heading, "text": p.text, "score": p.score} for p in passages],
            "images": [h.to_json() for h in images],
        }
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for p in passages:
        first = " ".join(p.text.split())[:160]
        print(f"{p.score:.3f}  {p.source} § {p.heading}\n       {first}")
    for h in images:
        caption = h.metadata.get("caption", "")
        print(f"{h.score:.3f}  {h.path}" + (f"  — {caption}" if caption else ""))
    if not passages and not images:
        print("(nothing found)")
    return 0
