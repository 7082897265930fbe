"""Index Markdown documentation (`knowledge/*.md`) into the store's `geochat_docs` collection.

A document is read, its YAML front matter (title, topics, sources) goes into metadata and not into
the text, then llama-index splits it:

    Document ─► MarkdownNodeParser (one node per heading section) ─► drop heading-only sections
    ─► SentenceSplitter (sections longer than MiniLM's window, counted in MiniLM tokens)
    ─► embed "title: …\\nheading: …\\n\\n<section text>" ─► ChromaVectorStore.add

Embedding the title and heading with each chunk (llama-index's embed metadata mode) is what lets a
question such as "what is the revisit time of Sentinel-2" find a section whose sentences say "five
days" without naming the mission. Each chunk keeps `source` ("knowledge/x.md"), `heading`, `title`
and the file's `content_hash` as metadata.

Re-indexing is incremental: a file whose hash (of its bytes and of `CHUNKING_VERSION`) matches the
stored one is skipped, a changed file's chunks are deleted and re-added, a removed file's chunks are
deleted. The collection mirrors one directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from geochat.errors import GeoChatError
from geochat.retrieval.store import DOCS, IndexStore
from geochat.retrieval.text import TextEmbedder

# Bump when chunking changes: every file's hash changes with it, so the next run re-embeds all.
CHUNKING_VERSION = "md-sections-v2"  # v2: chunks leave room for the encoder's [CLS] and [SEP]
SPECIAL_TOKENS = 2  # [CLS] and [SEP]: in the encoder's window (MiniLM: 256 word pieces), not in count_tokens
CHUNK_OVERLAP = 32
EMPTY_KEY = "geochat_empty_files"  # collection metadata: JSON {source: hash} of files that gave no chunks
BUNDLED_KNOWLEDGE = Path(__file__).resolve().parents[2] / "knowledge"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# Metadata that stays out of the embedded text and out of the prompt; title and heading go in.
_HIDDEN_KEYS = ["source", "topics", "sources", "content_hash", "header_path"]


@dataclass
class IndexReport:
    """What an indexing run did."""

    files: int = 0
    skipped: int = 0
    embedded_files: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    failed_files: list[str] = field(default_factory=list)
    chunks_embedded: int = 0
    total_records: int = 0
    seconds: float = 0.0

    def summary(self, what: str = "files") -> str:
        rate = f", {self.chunks_embedded / self.seconds:.1f}/s" if self.chunks_embedded and self.seconds else ""
        text = (
            f"{self.files} {what}: {len(self.embedded_files)} embedded ({self.chunks_embedded} records{rate}), "
            f"{self.skipped} unchanged, {len(self.removed_files)} removed; {self.total_records} records in the index"
        )
        if self.failed_files:
            text += f"; {len(self.failed_files)} unreadable: {', '.join(self.failed_files[:5])}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files, "skipped": self.skipped, "embedded_files": self.embedded_files,
            "removed_files": self.removed_files, "failed_files": self.failed_files,
            "chunks_embedded": self.chunks_embedded, "total_records": self.total_records,
            "seconds": round(self.seconds, 3),
        }


def split_front_matter(text: str, name: str = "document") -> tuple[dict[str, Any], str]:
    """(front-matter mapping, body) of a Markdown text; an absent front matter gives {}."""
    m = _FRONT_MATTER.match(text)
    if m is None:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as exc:
        raise GeoChatError(f"{name}: the front matter is not valid YAML ({exc})") from exc
    if not isinstance(meta, dict):
        raise GeoChatError(f"{name}: the front matter must be a mapping (title:, topics:, sources:)")
    return meta, text[m.end():]


def _as_text(value: Any, sep: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return sep.join(str(v) for v in value)
    return str(value)


def file_hash(path: Path) -> str:
    h = hashlib.sha256(CHUNKING_VERSION.encode())
    h.update(path.read_bytes())
    return h.hexdigest()


def source_name(root: Path, path: Path) -> str:
    """How a chunk names its file: the docs directory's name, then the path inside it."""
    return f"{root.name}/{path.relative_to(root).as_posix()}"


def load_document(path: Path, source: str, content_hash: str) -> Any:
    """A llama-index `Document` of the body, with front matter as metadata."""
    from llama_index.core import Document

    meta, body = split_front_matter(path.read_text(encoding="utf-8-sig"), source)  # -sig: a BOM is no text
    title = _as_text(meta.get("title"), " ").strip()
    if not title:
        first = next((m for m in map(_HEADING.match, body.splitlines()) if m), None)
        title = first.group(2) if first else path.stem
    return Document(
        id_=source,
        text=body,
        metadata={
            "source": source, "title": title, "topics": _as_text(meta.get("topics"), ", "),
            "sources": _as_text(meta.get("sources"), "; "), "content_hash": content_hash,
        },
        excluded_embed_metadata_keys=list(_HIDDEN_KEYS),
        excluded_llm_metadata_keys=list(_HIDDEN_KEYS),
    )


def chunk_document(document: Any, embedder: TextEmbedder) -> list[Any]:
    """Heading sections of `document`, split to MiniLM's window, with `heading` metadata and stable ids."""
    from llama_index.core.node_parser import MarkdownNodeParser, SentenceSplitter

    sections = MarkdownNodeParser(include_prev_next_rel=False).get_nodes_from_documents([document])
    kept = []
    for node in sections:
        lines = node.get_content().strip().splitlines()
        m = _HEADING.match(lines[0]) if lines else None
        heading = m.group(2) if m else document.metadata["title"]
        body = "\n".join(lines[1:] if m else lines).strip()
        if not body:  # a heading directly followed by a sub-heading: nothing to retrieve
            continue
        node.set_content(body)
        node.metadata["heading"] = heading
        kept.append(node)
    splitter = SentenceSplitter(
        chunk_size=embedder.max_tokens - SPECIAL_TOKENS, chunk_overlap=CHUNK_OVERLAP, tokenizer=embedder.count_tokens,
        include_prev_next_rel=False,
    )
    chunks = splitter(kept)
    source = document.metadata["source"]
    for i, chunk in enumerate(chunks):
        chunk.id_ = f"{source}#{i}"
    return chunks


def _stored_hashes(col: Any) -> dict[str, str]:
    """source → content hash of the files already indexed: those with chunks, and those that gave none (an
    empty or heading-only file, recorded in the collection's metadata so that it is not read on every run)."""
    got = col.get(include=["metadatas"])
    hashes = {m["source"]: m.get("content_hash", "") for m in got["metadatas"] or [] if m and "source" in m}
    return {**_empty_files(col), **hashes}


def _empty_files(col: Any) -> dict[str, str]:
    return dict(json.loads(str((col.metadata or {}).get(EMPTY_KEY, "{}"))))


def find_docs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise GeoChatError(f"documentation directory not found: {root}")
    return sorted(p for p in _visible_files(root) if p.suffix.lower() in MARKDOWN_SUFFIXES)


MARKDOWN_SUFFIXES = (".md", ".markdown")  # any case: NOTES.MD too


def other_files(root: Path) -> dict[str, int]:
    """Files under `root` that `find_docs` leaves out (not Markdown, not hidden), counted by suffix."""
    return dict(Counter(p.suffix.lower() or "(no suffix)" for p in _visible_files(root)
                        if p.suffix.lower() not in MARKDOWN_SUFFIXES))


def _visible_files(root: Path) -> Iterator[Path]:
    """The files under `root`, none in or under a hidden (dot) folder or hidden itself."""
    return (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


@dataclass
class DocsPlan:
    """What an incremental run has to do: files to (re-)embed, sources to delete, files unchanged."""

    todo: list[tuple[Path, str, str]]  # (path, source, content hash)
    removed: list[str]
    changed: list[str]
    skipped: int

    @property
    def up_to_date(self) -> bool:
        return not self.todo and not self.removed


def plan_docs(col: Any, root: Path) -> DocsPlan:
    """Compare the Markdown files under `root` with the collection's stored hashes (reads only)."""
    stored = _stored_hashes(col) if col is not None else {}
    todo, skipped = [], 0
    paths = find_docs(root)
    for path in paths:
        source, digest = source_name(root, path), file_hash(path)
        if stored.get(source) == digest:
            skipped += 1
        else:
            todo.append((path, source, digest))
    removed = sorted(set(stored) - {source_name(root, p) for p in paths})
    return DocsPlan(todo, removed, [s for _, s, _ in todo if s in stored], skipped)


def docs_root_of(col: Any) -> str | None:
    """The directory a docs collection mirrors, as recorded by `index_docs`."""
    return None if col is None else (col.metadata or {}).get("geochat_root")


def index_docs(
    store: IndexStore,
    root: str | Path,
    embedder: TextEmbedder | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Bring the docs collection in line with the Markdown files under `root` (incrementally). One collection
    mirrors one folder: the passages of files outside `root` are removed."""
    start = time.perf_counter()
    root = Path(root).resolve()
    embedder = embedder or TextEmbedder()
    find_docs(root)  # a missing directory fails before the store is touched
    with store.writing():
        return _index_docs(store, root, embedder, rebuild, progress, start)


def _index_docs(store: IndexStore, root: Path, embedder: TextEmbedder, rebuild: bool, progress: bool,
                start: float) -> IndexReport:
    from llama_index.vector_stores.chroma import ChromaVectorStore

    if rebuild:
        store.drop(DOCS)
    col = store.writable_collection(DOCS, embedder.name, embedder.dim)
    plan = plan_docs(col, root)
    # Every file is read and chunked before anything is deleted: a file that cannot be read (bad front
    # matter, not UTF-8) is reported and keeps its old chunks, and the rest of the run goes on.
    chunks, embedded, failed = [], [], []
    empty = {k: v for k, v in _empty_files(col).items() if k not in plan.removed}
    for path, source, digest in plan.todo:
        try:
            new = chunk_document(load_document(path, source, digest), embedder)
        except (GeoChatError, UnicodeDecodeError, OSError) as exc:
            failed.append(f"{source} ({exc})")
            continue
        chunks += new
        embedded.append(source)
        empty.pop(source, None)
        if not new:
            empty[source] = digest
    for source in [*plan.removed, *(s for s in plan.changed if s in embedded)]:
        col.delete(where={"source": source})
    _embed_and_add(ChromaVectorStore(chroma_collection=col), chunks, embedder, progress)
    report = IndexReport(files=plan.skipped + len(plan.todo), skipped=plan.skipped, removed_files=plan.removed,
                         embedded_files=embedded, failed_files=failed, chunks_embedded=len(chunks))
    report.total_records = store.finish(col, geochat_root=str(root), **{EMPTY_KEY: json.dumps(empty, sort_keys=True)})
    report.seconds = time.perf_counter() - start
    return report


def _embed_and_add(vector_store: Any, chunks: Sequence[Any], embedder: TextEmbedder, progress: bool) -> None:
    from llama_index.core.schema import MetadataMode

    bar = tqdm(total=len(chunks), desc="embedding docs", unit="chunk", disable=not progress or not chunks,
               file=sys.stderr)
    for batch in _batches(chunks, 64):
        vectors = embedder.embed_texts([c.get_content(metadata_mode=MetadataMode.EMBED) for c in batch])
        for chunk, vector in zip(batch, vectors, strict=True):
            chunk.embedding = vector.tolist()
        vector_store.add(list(batch))
        bar.update(len(batch))
    bar.close()


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
