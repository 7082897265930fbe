"""Index an image archive into the store's `geochat_images` collection (and captions into a second one).

`geochat index images DIR` walks DIR for PNG/JPEG/GeoTIFF files, reads each through
`geochat.imagery.load_image` with a small `max_size` (decimated overview reads: a big GeoTIFF is
never read whole), embeds the RGB view and stores path, bounds (lon/lat), CRS, date and caption.

The image embedders (the stem, a trained tower) are in `geochat.retrieval.embedders`.

Captions come from a sidecar `<stem>.txt` / `<name>.txt`, or from `annotations.jsonl` files in
the tree (`{"image": path relative to the file, "captions": [...], "label": ...}`). The date comes
from the TIFF tags (`TIFFTAG_DATETIME`, `ACQUISITIONDATETIME`, ...) or a `YYYYMMDD` / `YYYY-MM-DD`
in the file name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from geochat.errors import GeoChatError, ImageryError
from geochat.jsonl import iter_jsonl
from geochat.paths import utf8_name
from geochat.retrieval.docs import IndexReport
from geochat.retrieval.embedders import (
    WEIGHTS_KEY,
    ImageEmbedder,
    check_weights,
    file_digest,
    image_embedder_from_name,
    unit_rows,
)
from geochat.retrieval.store import CAPTIONS, IMAGES, CorruptIndexError, IndexStore
from geochat.retrieval.text import TextEmbedder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
INDEX_MAX_SIZE = 256  # long side of the overview read for embedding
EMBED_BATCH = 16
_DATE_TAGS = ("ACQUISITIONDATETIME", "ACQUISITION_DATE", "DATE_ACQUIRED", "TIFFTAG_DATETIME", "DATETIME")
_TAG_DATE = re.compile(r"((?:19|20)\d{2})[:\-/]?(0[1-9]|1[0-2])[:\-/]?(0[1-9]|[12]\d|3[01])")
_NAME_DATE = re.compile(r"(?<!\d)((?:19|20)\d{2})-?(0[1-9]|1[0-2])-?(0[1-9]|[12]\d|3[01])(?!\d)")


# -- metadata -------------------------------------------------------------------------------------


def find_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise GeoChatError(f"image directory not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def annotation_captions(root: Path) -> dict[Path, dict[str, Any]]:
    """image path → {"captions": [...], "label": ...} from every `annotations.jsonl` under `root`."""
    out: dict[Path, dict[str, Any]] = {}
    for ann in sorted(root.rglob("annotations.jsonl")):
        for _, row in iter_jsonl(ann):
            if isinstance(row, dict) and "image" in row:
                captions = row.get("captions") or ([row["caption"]] if row.get("caption") else [])
                out[_abs(ann.parent / row["image"])] = {"captions": [str(c) for c in captions],
                                                               "label": row.get("label")}
    return out


def sidecar_captions(path: Path) -> list[str]:
    for side in (path.with_suffix(".txt"), path.with_name(path.name + ".txt")):
        if side.is_file():
            return [line.strip() for line in side.read_text(encoding="utf-8").splitlines() if line.strip()]
    return []


def image_date(path: Path) -> str | None:
    """ISO date (YYYY-MM-DD) from TIFF tags, else from the file name; None when neither has one."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import rasterio

        with rasterio.open(path) as ds:
            tags = {k.upper(): v for k, v in ds.tags().items()}
        for key in _DATE_TAGS:
            m = _TAG_DATE.search(tags.get(key, ""))
            if m:
                return "-".join(m.groups())
    m = _NAME_DATE.search(path.stem)
    return "-".join(m.groups()) if m else None


def load_rgb(path: Path, max_size: int = INDEX_MAX_SIZE) -> np.ndarray:
    from geochat.imagery import load_image

    return load_image(path, max_size=max_size).rgb


@dataclass
class _Item:
    path: Path
    rid: str
    rgb: np.ndarray
    metadata: dict[str, Any]
    captions: list[str]


def _words(path: Path, annotations: dict[Path, dict[str, Any]]) -> tuple[list[str], str]:
    """An image's captions (its sidecar's, else its annotation row's) and label ("" without one)."""
    ann = annotations.get(_abs(path), {})
    return sidecar_captions(path) or ann.get("captions", []), str(ann.get("label") or "")


def _read_item(path: Path, digest: str, captions: list[str], label: str, max_size: int,
               file_meta: dict[str, str]) -> _Item:
    from geochat.imagery import load_image

    loaded = load_image(path, max_size=max_size)
    info = loaded.info
    meta = {
        "path": str(_abs(path)),
        "content_hash": digest,
        **file_meta,
        "width": info.width,
        "height": info.height,
        "bounds_lonlat": json.dumps([round(v, 7) for v in info.bounds_lonlat]) if info.bounds_lonlat else "",
        "crs": info.crs or "",
        "date": image_date(path) or "",
        "caption": captions[0] if captions else "",
        "captions": " | ".join(captions),
        "label": label,
    }
    return _Item(path, _record_id(path), loaded.rgb, meta, captions)


def _record_id(path: Path) -> str:
    return hashlib.sha1(str(_abs(path)).encode()).hexdigest()


def _abs(path: Path) -> Path:
    """Absolute and normalised, but a symlinked image keeps its own path (its archive is where it is linked)."""
    return Path(os.path.normpath(path.absolute()))


def index_images(
    store: IndexStore,
    root: Path,
    embedder: ImageEmbedder | None = None,
    text_embedder: TextEmbedder | None = None,
    rebuild: bool = False,
    max_size: int = INDEX_MAX_SIZE,
    progress: bool = True,
) -> IndexReport:
    """Embed the images under `root` (incrementally); images indexed from other directories stay, except
    with `rebuild`, which empties the whole archive (a warning names the other directories to index again)."""
    with store.writing():
        return _index_images(store, root, embedder, text_embedder, rebuild, max_size, progress)


def _index_images(store: IndexStore, root: Path, embedder: ImageEmbedder | None, text_embedder: TextEmbedder | None,
                  rebuild: bool, max_size: int, progress: bool) -> IndexReport:
    start = time.perf_counter()
    root = root.resolve()
    paths: list[Path] = []
    unnamed: list[Path] = []
    for path in find_images(root):  # GDAL and chromadb take UTF-8 names: others are listed as unreadable
        (paths if utf8_name(path) else unnamed).append(path)
    # What can refuse the run does so before anything is dropped or marked as being written: a refused run
    # leaves the archive searchable.
    embedder = embedder or image_embedder_from_name("auto")
    text_embedder = text_embedder or TextEmbedder()
    annotations = annotation_captions(root)
    if rebuild:
        _warn_of_other_roots(store, root)
        store.drop(IMAGES)
        store.drop(CAPTIONS)
    existing = store.collection(IMAGES)
    if existing is not None and (existing.metadata or {}).get("geochat_embedder") == embedder.name:
        check_weights(existing, embedder)  # (another embedder is refused by writable_collection, unmodified)
    images = store.writable_collection(IMAGES, embedder.name, embedder.dim)
    # Weights are recorded when every vector is known to be theirs: a new collection, or one that records them.
    record_weights = images.count() == 0 or WEIGHTS_KEY in (images.metadata or {})
    captions = store.writable_collection(CAPTIONS, text_embedder.name, text_embedder.dim)
    got = images.get(include=["metadatas"])
    stored = {rid: m for rid, m in zip(got["ids"], got["metadatas"], strict=True) if m}
    prefix = str(root) + "/"
    current = {_record_id(p) for p in paths}
    gone = [rid for rid, m in stored.items() if str(m.get("path", "")).startswith(prefix) and rid not in current]
    report = IndexReport(files=len(paths) + len(unnamed), removed_files=sorted(stored[r]["path"] for r in gone))
    report.failed_files += [f"{os.fsencode(p.name)!r} (the file name is not valid UTF-8; rename the file)"
                            for p in unnamed]
    if gone:
        images.delete(ids=gone)
        captions.delete(ids=gone)
    bar = tqdm(total=len(paths), desc="embedding images", unit="image", disable=not progress or not paths,
               file=sys.stderr)
    batch: list[_Item] = []
    for path in paths:
        try:
            # the pixels and the words about them: an edited caption or label re-indexes the image too. The
            # file's bytes are hashed only when its size or modification time changed (archives can hold GBs)
            old = stored.get(_record_id(path))
            st = path.stat()
            stat = f"{st.st_size}:{st.st_mtime_ns}"
            pixels = str(old["file_hash"]) if old and old.get("file_stat") == stat and old.get("file_hash") else file_digest(path)
            texts, label = _words(path, annotations)  # (`captions` is the captions collection here)
            digest = hashlib.sha256(f"{pixels}\n{json.dumps([texts, label])}".encode()).hexdigest()
            if old is not None and (old.get("content_hash") == digest or _same_as_before(old, pixels, texts, label)):
                if old.get("content_hash") != digest or old.get("file_stat") != stat:  # keep the vector, renew the keys
                    images.update(ids=[_record_id(path)],
                                  metadatas=[{**old, "content_hash": digest, "file_hash": pixels, "file_stat": stat}])
                report.skipped += 1
                bar.update(1)
                continue
            batch.append(_read_item(path, digest, texts, label, max_size, {"file_hash": pixels, "file_stat": stat}))
        except (ImageryError, OSError, UnicodeDecodeError) as exc:  # unreadable, vanished, a non-UTF-8 caption
            report.failed_files.append(f"{path.name} ({exc})")
            bar.update(1)
            continue
        if len(batch) == EMBED_BATCH:
            _add(batch, images, captions, embedder, text_embedder, report)
            bar.update(len(batch))
            batch = []
    if batch:
        _add(batch, images, captions, embedder, text_embedder, report)
        bar.update(len(batch))
    bar.close()
    store.finish(captions)
    report.total_records = store.finish(images, **({WEIGHTS_KEY: embedder.weights} if record_weights else {}))
    report.seconds = time.perf_counter() - start
    return report


def _same_as_before(old: dict[str, Any], pixels: str, captions: list[str], label: str) -> bool:
    """A record written before the content hash covered the words (its hash is the file's alone) that still
    matches the file and its words: kept, not re-embedded, when an older index is first updated."""
    return (old.get("content_hash") == pixels and old.get("captions", "") == " | ".join(captions)
            and old.get("label", "") == label)


def _warn_of_other_roots(store: IndexStore, root: Path) -> None:
    try:
        old = store.collection(IMAGES)
    except CorruptIndexError:  # a half-written archive: what --rebuild is for; nothing to list
        return
    if old is None:
        return
    outside = [p for m in old.get(include=["metadatas"])["metadatas"] if m
               and not (p := str(m.get("path", ""))).startswith(f"{root}/")]
    if outside:
        others = sorted({str(Path(p).parent) for p in outside})
        log.warning("--rebuild empties the whole image archive: %d images from %d other directories (%s) go too; "
                    "index them again with `geochat index images DIR`", len(outside), len(others), ", ".join(others[:5]))


def _add(batch: list[_Item], images: Any, captions: Any, embedder: ImageEmbedder,
         text_embedder: TextEmbedder, report: IndexReport) -> None:
    ids = [it.rid for it in batch]
    vectors = embedder.embed_images([it.rgb for it in batch])
    images.upsert(ids=ids, embeddings=vectors.tolist(), metadatas=[it.metadata for it in batch])
    captions.delete(ids=ids)  # a changed image may have lost its caption
    with_caps = [it for it in batch if it.captions]
    if with_caps:
        # One vector per image: the normalised mean of its captions' embeddings.
        flat = [c for it in with_caps for c in it.captions]
        emb = text_embedder.embed_texts(flat)
        bounds = np.cumsum([0] + [len(it.captions) for it in with_caps])
        means = unit_rows(np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))
        captions.add(ids=[it.rid for it in with_caps], embeddings=means.tolist(),
                     metadatas=[{"path": it.metadata["path"]} for it in with_caps],
                     documents=[it.metadata["captions"] for it in with_caps])
    report.embedded_files.extend(str(it.path) for it in batch)
    report.chunks_embedded += len(batch)
