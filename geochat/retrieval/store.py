"""Where the retrieval collections live: a chromadb store on disk (or a chroma server), checked on open.

One store holds up to three collections: `geochat_docs` (documentation chunks, MiniLM),
`geochat_images` (image embeddings, by whichever image embedder indexed them) and
`geochat_image_captions` (MiniLM embeddings of the images' captions, for text→image search when the
image embedder has no text side).

How a broken store is recognised, so that a search never answers from half an index:

- a local store directory carries `geochat-index.json` (format name and version), written before
  chromadb creates anything; a non-empty directory without it, or with an unknown one, is refused;
- chromadb itself refuses a `chroma.sqlite3` that is not a database (e.g. garbage written into it);
- every collection records in its metadata which embedder filled it (and the vector size), whether
  the last indexing run finished (`geochat_complete`) and how many records it left
  (`geochat_count`); an interrupted run or a record count that differs is refused.

Each refusal is a `CorruptIndexError` that names the fix, `geochat index docs --rebuild`. A rebuild
deletes only what chromadb and geochat wrote (it refuses a directory holding anything else).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chromadb
from chromadb.api.client import SharedSystemClient
from chromadb.errors import ChromaError, NotFoundError

from geochat.errors import GeoChatError
from geochat.paths import cache_root

INDEX_ENV = "GEOCHAT_INDEX"
MANIFEST = "geochat-index.json"
FORMAT = "geochat-index"
FORMAT_VERSION = 1
REBUILD_HINT = "run `geochat index docs --rebuild` (and `geochat index images DIR --rebuild` for an image archive)"

DOCS = "geochat_docs"
IMAGES = "geochat_images"
CAPTIONS = "geochat_image_captions"
COLLECTIONS = (DOCS, IMAGES, CAPTIONS)
WRITE_LOCK = ".geochat-index.lock"  # held by an indexing run (flock), so that runs take turns

log = logging.getLogger(__name__)


class CorruptIndexError(GeoChatError):
    """The store is unreadable, half-written or not a geochat index; the message says how to rebuild."""


class MixedEmbedderError(GeoChatError):
    """A collection filled by one embedder was asked to take vectors from another."""


@dataclass(frozen=True)
class StoreLocation:
    """A local directory (`path`) or a chroma server (`host`, `port`); exactly one of the two."""

    path: Path | None = None  # a str is taken as a path
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.path, str):
            object.__setattr__(self, "path", Path(self.path))  # (frozen: set through object)
        if (self.path is None) == (self.host is None):
            raise ValueError("a store location is either a path or a host (with a port)")
        if self.host is not None and not (self.port and 0 < self.port < 65536):
            raise ValueError(f"a chroma server needs a port in 1..65535, got {self.port!r}")

    @classmethod
    def resolve(cls, index_dir: str | Path | None = None, host: str | None = None, port: int | None = None) -> StoreLocation:
        """`--chroma-host/--chroma-port`, else `--index-dir`, else `$GEOCHAT_INDEX`, else `<cache>/index`."""
        if host:
            return cls(host=host, port=port or 8000)
        if port:
            raise GeoChatError("--chroma-port needs --chroma-host")
        chosen = Path(index_dir or os.environ.get(INDEX_ENV) or cache_root() / "index").expanduser().resolve()
        if chosen.exists() and not chosen.is_dir():
            source = "--index-dir" if index_dir else f"${INDEX_ENV}" if os.environ.get(INDEX_ENV) else "the index path"
            raise GeoChatError(f"{source} {chosen} is a file, not an index folder; name a folder (it is created)")
        return cls(path=chosen)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"chroma server {self.host}:{self.port}"


def _chroma_owned(entry: Path) -> bool:
    """True for what chromadb writes into its directory: the sqlite file (and journals), segment dirs."""
    if entry.name.startswith("chroma.sqlite3"):
        return True
    try:
        uuid.UUID(entry.name)
    except ValueError:
        return False
    return entry.is_dir()


class IndexStore:
    """An open chromadb client plus geochat's checks on its collections."""

    def __init__(self, location: StoreLocation, client: Any) -> None:
        self.location = location
        self.client = client
        self._writing = False  # this store holds the write lock (its own run is not "another run")

    # -- opening --------------------------------------------------------------------------------

    @staticmethod
    def exists(location: StoreLocation) -> bool:
        """Whether a local store directory has anything in it (a server always 'exists')."""
        if location.path is None:
            return True
        return location.path.is_dir() and any(location.path.iterdir())

    @classmethod
    def open(cls, location: StoreLocation, create: bool = False) -> IndexStore:
        """Open the store; `create` makes a new local store where none is. Raises `CorruptIndexError`."""
        settings = chromadb.Settings(anonymized_telemetry=False)
        if location.path is None:
            assert location.host is not None and location.port is not None  # StoreLocation guarantees it
            try:
                client = chromadb.HttpClient(host=location.host, port=location.port, settings=settings)
                client.heartbeat()
            except (ChromaError, ValueError, OSError) as exc:
                raise GeoChatError(f"cannot reach the {location}: {exc}") from exc
            return cls(location, client)
        path = location.path
        if not cls.exists(location):
            if not create:
                raise GeoChatError(f"no index at {path}: run `geochat index docs` first")
            path.mkdir(parents=True, exist_ok=True)
            _write_manifest(path)
        _check_manifest(path)
        try:
            client = chromadb.PersistentClient(path=str(path), settings=settings)
            client.list_collections()
        except ChromaError as exc:
            raise CorruptIndexError(f"the index at {path} is unreadable ({exc}); {REBUILD_HINT}") from exc
        return cls(location, client)

    # -- writing --------------------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store's write lock for an indexing run: two runs (two `geochat index`, or two first
        `geochat ask`) take turns instead of one finding the other's collection unfinished. A chroma server
        has no local lock; one writer at a time is then up to the operator."""
        if self.location.path is None:
            yield
            return
        with (self.location.path / WRITE_LOCK).open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another indexing run is writing %s; waiting for it to finish", self.location)
                fcntl.flock(f, fcntl.LOCK_EX)
            self._writing = True
            try:
                yield
            finally:
                self._writing = False
                fcntl.flock(f, fcntl.LOCK_UN)

    def wait_for_writer(self) -> None:
        """Return once no indexing run holds the write lock (at once when none does); read-only access suffices."""
        self._writer_present(wait=True)

    def being_written(self) -> bool:
        """Whether another indexing run holds the write lock right now."""
        return self._writer_present(wait=False)

    def _writer_present(self, wait: bool) -> bool:
        """Whether another indexing run holds the write lock (with `wait`: after waiting for it to finish). A shared
        lock on the lock file, opened for reading: a read-only index volume is fine."""
        if self._writing or self.location.path is None or not (self.location.path / WRITE_LOCK).is_file():
            return False
        with (self.location.path / WRITE_LOCK).open("r") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    return True
                log.warning("another indexing run is writing %s; waiting for it to finish", self.location)
                fcntl.flock(f, fcntl.LOCK_SH)
                fcntl.flock(f, fcntl.LOCK_UN)
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def _unfinished(self, name: str) -> CorruptIndexError:
        if self.being_written():
            return CorruptIndexError(f"collection {name} in {self.location} is being indexed right now by another "
                                     "run; try again when it has finished")
        return CorruptIndexError(
            f"collection {name} in {self.location} was half-written (an indexing run did not finish); {REBUILD_HINT}")

    # -- collections ----------------------------------------------------------------------------

    def collection(self, name: str) -> Any | None:
        """A finished, consistent collection, or None where it does not exist."""
        try:
            col = self.client.get_collection(name, embedding_function=None)
        except NotFoundError:
            return None
        except ChromaError as exc:
            raise CorruptIndexError(f"collection {name} in {self.location} is unreadable ({exc}); {REBUILD_HINT}") from exc
        meta = col.metadata or {}
        if meta.get("geochat_complete") is not True:
            raise self._unfinished(name)
        try:
            count = col.count()
        except ChromaError as exc:
            raise CorruptIndexError(f"collection {name} in {self.location} is unreadable ({exc}); {REBUILD_HINT}") from exc
        if count != meta.get("geochat_count"):
            raise CorruptIndexError(
                f"collection {name} in {self.location} holds {count} records, its manifest says "
                f"{meta.get('geochat_count')}; {REBUILD_HINT}"
            )
        return col

    def writable_collection(self, name: str, embedder: str, dim: int) -> Any:
        """Get or create `name` for writing with `embedder`; marks it unfinished until `finish()`."""
        try:
            col = self.client.get_collection(name, embedding_function=None)
        except NotFoundError:
            col = self.client.create_collection(
                name, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None,
                metadata=_meta(embedder, dim, complete=False, count=0),
            )
            return col
        meta = col.metadata or {}
        if meta.get("geochat_embedder") != embedder or meta.get("geochat_dim") != dim:
            raise MixedEmbedderError(
                f"collection {name} in {self.location} holds vectors from {meta.get('geochat_embedder')!r} "
                f"({meta.get('geochat_dim')}-d); this run embeds with {embedder!r} ({dim}-d) and embedders "
                f"cannot be mixed in one collection: re-index with --rebuild"
            )
        if meta.get("geochat_complete") is not True:
            raise self._unfinished(name)
        col.modify(metadata={**meta, "geochat_complete": False})
        return col

    def finish(self, col: Any, **extra: str) -> int:
        """Mark a collection finished and record its size (and `extra` metadata) and a new run stamp (`run_of`);
        returns the size."""
        meta = dict(col.metadata or {})
        count = col.count()
        col.modify(metadata={**meta, **extra, "geochat_complete": True, "geochat_count": count,
                             "geochat_run": uuid.uuid4().hex})
        return count

    def run_of(self, name: str) -> str | None:
        """The stamp of the last indexing run that finished `name`, read afresh from the store (None where it
        does not exist). A process that opened the store before another process's run ended still searches
        the vectors it loaded then: a changed stamp says to `reopen`."""
        try:
            return (self.client.get_collection(name, embedding_function=None).metadata or {}).get("geochat_run")
        except NotFoundError:
            return None
        except ChromaError as exc:
            raise CorruptIndexError(f"collection {name} in {self.location} is unreadable ({exc}); {REBUILD_HINT}") from exc

    def reopen(self) -> None:
        """Open a local store afresh. chromadb keeps one system per path, with its vector indexes in memory, and
        never reloads them after another process writes: the cached system is set aside (not stopped: other
        clients in this process may still hold it) so that the new client loads what is on disk now."""
        if self.location.path is None:
            return  # a chroma server serves every client the same, current collections
        identifier = str(getattr(self.client, "_identifier", ""))
        SharedSystemClient._identifier_to_system.pop(identifier, None)
        SharedSystemClient._identifier_to_refcount.pop(identifier, None)
        self.client = chromadb.PersistentClient(path=str(self.location.path),
                                                settings=chromadb.Settings(anonymized_telemetry=False))

    def drop(self, name: str) -> None:
        try:
            self.client.delete_collection(name)
        except NotFoundError:
            pass

    def embedder_of(self, name: str) -> str | None:
        col = self.collection(name)
        return None if col is None else str((col.metadata or {}).get("geochat_embedder"))


def _meta(embedder: str, dim: int, complete: bool, count: int) -> dict[str, Any]:
    return {"geochat_embedder": embedder, "geochat_dim": dim, "geochat_complete": complete, "geochat_count": count}


def _write_manifest(path: Path) -> None:
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION}) + "\n")
    tmp.replace(path / MANIFEST)


def _foreign(path: Path) -> list[str]:
    """The names in a store directory that neither chromadb nor geochat writes (sorted)."""
    return sorted(e.name for e in path.iterdir()
                  if e.name not in (MANIFEST, f".{MANIFEST}.tmp", WRITE_LOCK) and not _chroma_owned(e))


def _check_manifest(path: Path) -> None:
    manifest = path / MANIFEST
    if not manifest.is_file() and (foreign := _foreign(path)):  # e.g. --index-dir naming the docs folder
        raise GeoChatError(f"{path} is not a geochat index: it holds other files ({', '.join(foreign[:5])}); "
                           "name a new or empty folder for --index-dir")
    if not manifest.is_file():
        raise CorruptIndexError(
            f"{path} is not a geochat index or was half-written (no {MANIFEST}); {REBUILD_HINT}"
        )
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptIndexError(f"{manifest} is unreadable ({exc}); {REBUILD_HINT}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
        raise CorruptIndexError(
            f"{manifest} is not a geochat index manifest of version {FORMAT_VERSION} (found {data!r}); {REBUILD_HINT}"
        )


def wipe_store(location: StoreLocation) -> None:
    """Delete a local store's files (only those chromadb and geochat write) so it can be rebuilt."""
    path = location.path
    if path is None:
        raise GeoChatError("a chroma server's store cannot be wiped from here; drop its collections instead")
    if not path.exists():
        return
    foreign = _foreign(path)
    if foreign:
        raise GeoChatError(
            f"refusing to rebuild {path}: it holds files geochat did not write ({', '.join(foreign[:5])}); "
            f"choose another --index-dir or remove them"
        )
    # chromadb caches one system per path; drop it so the files are closed before they are deleted.
    SharedSystemClient.clear_system_cache()
    for entry in path.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
