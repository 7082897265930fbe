"""The engine's view of retrieval: passages for a question, archive images for a text or an image.

`GeoChat.retriever` is a `Retriever`; `chat()` calls `search(question)` and puts the passages in the
prompt as quoted, delimited data (`geochat.prompting.render_passages`). Scores are cosine
similarities (1 - chromadb's cosine distance), higher is closer. A search tower with a query bank scores an
image for a text as cosine − its hubness offset (`QueryBank.image_offsets`: at most 0.0375 of lift for a
scene unlike every training caption, and a drop of up to ~0.08 on RSICD for images crowded by training
captions), which re-ranks the RERANK_POOL nearest images; such a score can exceed 1 slightly.

Image queries use the embedder recorded in the images collection, never the current default, so a
query vector always lives in the same space as the stored ones; a tower whose weights changed since
(its recorded digest differs) is refused with the rebuild command. Text→image search goes through the
image embedder's text side where it has one (the trained dual encoder shares MiniLM's space), else
through the MiniLM embeddings of the images' captions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.errors import ChromaError

from geochat.errors import GeoChatError
from geochat.prompting import Passage, label_passages
from geochat.retrieval.docs import BUNDLED_KNOWLEDGE, IndexReport
from geochat.retrieval.store import CAPTIONS, DOCS, IMAGES, CorruptIndexError, IndexStore, StoreLocation
from geochat.retrieval.text import TextEmbedder

DEFAULT_K = 4
RERANK_POOL = 100  # nearest images by cosine that a search tower's hubness correction re-ranks


@dataclass(frozen=True)
class ImageHit:
    path: str
    score: float
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "score": self.score, "metadata": self.metadata}


class Retriever:
    """Searches one open `IndexStore`; the embedders load on first use."""

    def __init__(self, store: IndexStore, k: int = DEFAULT_K, text_embedder: TextEmbedder | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.store = store
        self.k = k
        self._text = text_embedder
        self._runs: dict[str, str | None] = {}  # the run stamp of each collection as this retriever opened it

    @property
    def text_embedder(self) -> TextEmbedder:
        if self._text is None:
            self._text = TextEmbedder()
        return self._text

    @cached_property
    def _docs(self) -> Any | None:
        return self._open(DOCS)

    def forget_docs(self, indexed_here: bool = False) -> None:
        """Drop the cached docs collection: the next search opens it again (after a rebuild, here or elsewhere).
        `indexed_here`: this process wrote the new collection itself, so its store already sees it and the
        next search need not reopen the store for the collection's new run stamp."""
        self.__dict__.pop("_docs", None)
        if indexed_here:
            self._runs.pop(DOCS, None)

    @cached_property
    def _images(self) -> Any | None:
        return self._open(IMAGES)

    @cached_property
    def _captions(self) -> Any | None:
        return self._open(CAPTIONS)

    def _open(self, name: str) -> Any | None:
        col = self.store.collection(name)
        self._runs[name] = None if col is None else (col.metadata or {}).get("geochat_run")
        return col

    def _catch_up(self, name: str) -> bool:
        """Before a search of `name`: where an indexing run has finished it since this retriever opened it (here
        or in another process: `geochat index` beside a running app), or dropped it, open the store again, so
        that the search sees the new records and vectors (it would otherwise score the new texts by the old
        vectors). Returns whether it did."""
        if name not in self._runs or self.store.run_of(name) == self._runs[name]:
            return False
        self.store.reopen()
        for cached in ("_docs", "_images", "_captions", "image_embedder"):
            self.__dict__.pop(cached, None)
        self._runs.clear()
        return True

    @cached_property
    def image_embedder(self) -> Any | None:
        """The embedder that filled the images collection (None without one)."""
        from geochat.retrieval.embedders import check_weights, image_embedder_from_name

        if self._images is None:
            return None
        embedder = image_embedder_from_name(str(self._images.metadata["geochat_embedder"]))
        check_weights(self._images, embedder)
        return embedder

    @property
    def has_docs(self) -> bool:
        return self._docs is not None and self._docs.count() > 0

    # -- documentation ----------------------------------------------------------------------------

    def search(self, query: str, k: int | None = None) -> list[Passage]:
        """The `k` passages closest to `query`, labelled S1..Sk; [] where no docs are indexed."""
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not query.strip():
            return []
        changed = self._catch_up(DOCS)
        docs = self._docs
        if docs is None:  # none indexed, or dropped by a rebuild elsewhere: look again next time
            self.forget_docs()
            if changed:
                raise self._being_rebuilt()
            return []
        vector = self.text_embedder.embed_query(query)
        try:
            res = self._query_docs(docs, vector, k)
        except ChromaError:  # e.g. dropped by `index docs --rebuild` in another process since it was opened:
            try:                # read the new one
                res = self._query_docs(self._reopen_docs(), vector, k)
            except ChromaError as exc:
                self.forget_docs()
                raise CorruptIndexError(f"the docs index in {self.store.location} changed under this process "
                                        f"({exc}); ask again") from exc
        passages = [
            Passage(id="S0", source=str(meta.get("source", "")), heading=str(meta.get("heading", "")),
                    text=doc or "", score=round(1.0 - float(dist), 4))
            for doc, meta, dist in zip(res["documents"][0], res["metadatas"][0], res["distances"][0], strict=True)
            if meta is not None and doc is not None  # a chunk another process deleted since this one opened the store
        ]
        return label_passages(passages)

    def _query_docs(self, docs: Any, vector: np.ndarray, k: int | None) -> Any:
        return docs.query(query_embeddings=[vector.tolist()], n_results=k or self.k,
                          include=["documents", "metadatas", "distances"])

    def _reopen_docs(self) -> Any:
        """The docs collection opened again after another process replaced it; the next search tries again
        while it is still being rebuilt."""
        self.forget_docs()
        docs = self._docs  # the store says when the new one is still being written, or was left half-written
        if docs is None:
            raise self._being_rebuilt()
        return docs

    def _being_rebuilt(self) -> CorruptIndexError:
        return CorruptIndexError(f"the docs index in {self.store.location} is being rebuilt by another process; "
                                 "ask again when `geochat index docs` has finished")

    # -- images ----------------------------------------------------------------------------------

    def search_images(self, text: str, k: int | None = None) -> list[ImageHit]:
        """Archive images for a text: the embedder's text side, else the images' captions."""
        self._catch_up(IMAGES)
        if self._images is None or not text.strip():
            return []
        embedder = self.image_embedder
        if embedder is not None and embedder.has_text_side:
            return self._query_images(self._images, embedder.embed_text(text), k, embedder.text_offsets)
        if self._captions is None:
            return []
        return self._query_images(self._captions, self.text_embedder.embed_query(text), k)

    def similar_images(self, image: str | Path | np.ndarray, k: int | None = None) -> list[ImageHit]:
        """Archive images closest to `image` (a path or an (h, w, 3) uint8 RGB array)."""
        self._catch_up(IMAGES)
        if self._images is None:
            return []
        from geochat.retrieval.images import load_rgb

        embedder = self.image_embedder
        assert embedder is not None
        rgb = load_rgb(Path(image)) if isinstance(image, (str, Path)) else image
        return self._query_images(self._images, embedder.embed_images([rgb])[0], k)

    def _query_images(self, col: Any, vector: np.ndarray, k: int | None,
                      offsets: Callable[[np.ndarray], np.ndarray] | None = None) -> list[ImageHit]:
        """The k nearest records by cosine. With `offsets` (embeddings → per-image score offsets, the search
        tower's hubness correction) the RERANK_POOL nearest (at least 4·k) are ranked by cosine − offset,
        the score reported."""
        n = col.count()
        if n == 0:
            return []
        k = min(k or self.k, n)
        pool = k if offsets is None else min(max(RERANK_POOL, 4 * k), n)
        res = col.query(query_embeddings=[vector.tolist()], n_results=pool,
                        include=["metadatas", "distances", *([] if offsets is None else ["embeddings"])])
        ids, metas = res["ids"][0], res["metadatas"][0]
        scores = 1.0 - np.asarray(res["distances"][0], dtype=np.float64)  # cosine
        if offsets is not None:
            scores = scores - offsets(np.asarray(res["embeddings"][0], dtype=np.float32))
        order = np.argsort(-scores, kind="stable")[:k]
        by_id: dict[str, Any] = {}
        if col is not self._images and self._images is not None:
            # Caption hits point at their image's record, which holds the full metadata.
            records = self._images.get(ids=[ids[i] for i in order], include=["metadatas"])
            by_id = dict(zip(records["ids"], records["metadatas"], strict=True))
        hits = []
        for i in order:
            meta = by_id.get(ids[i], metas[i]) or {}
            hits.append(ImageHit(path=str(meta.get("path", "")), score=round(float(scores[i]), 4),
                                 metadata=public_image_metadata(meta)))
        return hits


BOOKKEEPING_KEYS = frozenset({"content_hash", "file_hash", "file_stat", "path"})  # the index's, not the user's


def public_image_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Stored image metadata as users see it: JSON-decoded bounds, no bookkeeping keys, no empty values."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key in BOOKKEEPING_KEYS or value in ("", None):
            continue
        if key == "bounds_lonlat":
            value = json.loads(value)
        out[key] = value
    return out


def open_retriever(store: IndexStore, k: int = DEFAULT_K) -> Retriever:
    retriever = Retriever(store, k=k)
    if retriever._docs is None and retriever._images is None:
        raise GeoChatError(f"the index at {store.location} is empty: run `geochat index docs` first")
    return retriever


def ensure_retriever(
    location: StoreLocation, docs_root: Path | None = BUNDLED_KNOWLEDGE, k: int = DEFAULT_K, progress: bool = True
) -> tuple[Retriever | None, IndexReport | None]:
    """A retriever over `location`, indexing `docs_root` there first where that is needed.

    Needed: the store holds no docs collection yet (first use), or its docs collection mirrors
    `docs_root` and a file there was added, changed or removed since (checked by content hash; an
    index of some other directory is left alone). Another run indexing there is waited for. Returns (None, None) when there is neither an
    index nor a docs directory; a broken index raises `CorruptIndexError` (never silently rebuilt:
    it may hold an image archive). The report is None when nothing was indexed.
    """
    from geochat.retrieval.docs import docs_root_of, index_docs, plan_docs

    has_docs_dir = docs_root is not None and docs_root.is_dir()
    if not IndexStore.exists(location) and not has_docs_dir:
        return None, None
    store = IndexStore.open(location, create=True)
    store.wait_for_writer()  # another run indexing here (a second app, `geochat index`) finishes first
    retriever = Retriever(store, k=k)
    if not has_docs_dir or docs_root is None:
        return retriever, None
    col = retriever._docs
    root = docs_root.resolve()
    if col is not None and (docs_root_of(col) != str(root) or plan_docs(col, root).up_to_date):
        return retriever, None
    report = index_docs(store, root, embedder=retriever.text_embedder, progress=progress)
    retriever.forget_docs(indexed_here=True)  # re-read the now finished collection
    return retriever, report
