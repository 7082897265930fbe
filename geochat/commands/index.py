"""`geochat index docs [DIR]` and `geochat index images DIR`: fill the retrieval store, incrementally."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """Where the store is: shared by `index`, `search` and `ask`."""
    p.add_argument("--index-dir", type=Path, default=None,
                   help="store directory (default: $GEOCHAT_INDEX, else <cache>/index)")
    p.add_argument("--chroma-host", default=None, help="use a chroma server (`chroma run`) instead of a directory")
    p.add_argument("--chroma-port", type=int, default=None, help="the chroma server's port (default 8000)")


def register(sub: Any) -> None:
    p = sub.add_parser("index", help="index documentation or an image archive for retrieval")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="WHAT")

    docs = kinds.add_parser("docs", help="index Markdown documentation (default: the shipped knowledge/)")
    docs.add_argument("directory", nargs="?", type=Path, default=None, help="directory of Markdown files (.md, .markdown, any case; other files are counted and left out)")
    docs.set_defaults(func=run_docs)

    images = kinds.add_parser("images", help="index the PNG/JPEG/GeoTIFF files under a directory")
    images.add_argument("directory", type=Path)
    images.add_argument("--embedder", default="auto",
                        help="auto (an existing archive's own embedder, else the shipped search tower, else "
                             "stem), stem, or tower:DIR")
    images.add_argument("--max-size", type=int, default=256, help="long side of the overview read per image")
    images.set_defaults(func=run_images)

    for q in (docs, images):
        add_store_arguments(q)
        q.add_argument("--rebuild", action="store_true",
                       help="drop the collection (or a broken store) and index from scratch")
        q.add_argument("--json", action="store_true", help="print the report as one JSON object")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")


def _open_for_writing(args: argparse.Namespace) -> Any:
    from geochat.retrieval import CorruptIndexError, IndexStore, StoreLocation, wipe_store

    location = StoreLocation.resolve(args.index_dir, args.chroma_host, args.chroma_port)
    try:
        return IndexStore.open(location, create=True)
    except CorruptIndexError:
        if not args.rebuild:
            raise
        print(f"geochat: the store at {location} is broken; deleting it and rebuilding", file=sys.stderr)
        wipe_store(location)
        return IndexStore.open(location, create=True)


def _print(report: Any, args: argparse.Namespace, store: Any, what: str) -> int:
    if args.json:
        print(json.dumps({**report.to_json(), "index": str(store.location)}))
    else:
        print(f"{report.summary(what)} ({store.location})")
    return 0


def run_docs(args: argparse.Namespace) -> int:
    from geochat.retrieval import BUNDLED_KNOWLEDGE, index_docs
    from geochat.retrieval.docs import docs_root_of, find_docs, other_files
    from geochat.retrieval.store import DOCS, CorruptIndexError

    root = (args.directory or BUNDLED_KNOWLEDGE).resolve()
    find_docs(root)  # a missing folder fails before a store is created for it
    store = _open_for_writing(args)
    store.wait_for_writer()  # another run indexing here finishes first (its collection is unfinished until then)
    try:
        before = None if args.rebuild else store.collection(DOCS)
    except CorruptIndexError:  # half-written: index_docs says so
        before = None
    held, count = docs_root_of(before), before.count() if before is not None else 0
    if held not in (None, str(root)) and count:
        # one index mirrors one folder: say so before a user's folder takes the place of knowledge/
        print(f"geochat: {store.location} held the {count} passages of {held}; they are "
              f"replaced by those of {root} (index it with --index-dir DIR to keep both, and pass the same "
              "--index-dir to ask and search)", file=sys.stderr)
    report = index_docs(store, root, rebuild=args.rebuild, progress=not args.no_progress)
    if skipped := other_files(root):  # only Markdown is read: say what was not, rather than nothing
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        n = sum(skipped.values())
        print(f"geochat: left out {n} file{'s' if n != 1 else ''} that {'are' if n != 1 else 'is'} not Markdown (.md): "
              f"{kinds}", file=sys.stderr)
    return _print(report, args, store, "documents")


def run_images(args: argparse.Namespace) -> int:
    from geochat.errors import GeoChatError
    from geochat.retrieval import image_embedder_from_name, index_images
    from geochat.retrieval.embedders import auto_embedder_name
    from geochat.retrieval.store import IMAGES

    if args.max_size < 32:
        raise GeoChatError(f"--max-size must be at least 32, got {args.max_size}")
    store = _open_for_writing(args)
    name = args.embedder
    recorded = None if args.rebuild else store.embedder_of(IMAGES)
    if name == "auto" and recorded is not None:
        name = recorded  # an archive grows with the embedder it was built with; --rebuild takes today's default
        if recorded != auto_embedder_name():
            print(f"geochat: adding to an archive embedded with {recorded}; the default embedder has changed "
                  "since, and `--rebuild` re-embeds the whole archive with it", file=sys.stderr)
    report = index_images(store, args.directory, embedder=image_embedder_from_name(name),
                          rebuild=args.rebuild, max_size=args.max_size, progress=not args.no_progress)
    return _print(report, args, store, "images")
