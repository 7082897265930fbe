"""Image→image retrieval on real scenes: RSICD's test split indexed with `index_images`, scored by label.

    .venv/bin/python benchmarks/retrieval_images_eval.py [--json] [--limit N] [--embedder auto|stem|tower:DIR]

Each indexed image queries the archive with its own stored vector (itself excluded); a neighbour
is relevant when it has the same scene label. Reports label precision@1/@5 and image ingest
throughput. Needs `../shared/data/rsicd` (research use; not shipped with geochat).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geochat.retrieval import IndexStore, StoreLocation, image_embedder_from_name, index_images  # noqa: E402
from geochat.retrieval.store import IMAGES  # noqa: E402

RSICD = REPO.parent / "shared" / "data" / "rsicd"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="first N test images only (0: all)")
    parser.add_argument("--embedder", default="auto")
    args = parser.parse_args()
    if not (RSICD / "annotations.jsonl").is_file():
        print(f"RSICD not found at {RSICD}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in (RSICD / "annotations.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "test"][: args.limit or None]
    with tempfile.TemporaryDirectory(prefix="geochat-rsicd-") as tmp:
        archive = Path(tmp) / "archive"
        (archive / "images").mkdir(parents=True)
        for r in rows:  # links, so the archive holds just the test split (and its annotations)
            (archive / r["image"]).symlink_to(RSICD / r["image"])
        (archive / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        store = IndexStore.open(StoreLocation(path=Path(tmp) / "index"), create=True)
        embedder = image_embedder_from_name(args.embedder)
        report = index_images(store, archive, embedder=embedder, progress=not args.json)
        col = store.collection(IMAGES)
        got = col.get(include=["embeddings", "metadatas"])
        label = dict(zip(got["ids"], (m["label"] for m in got["metadatas"]), strict=True))
        res = col.query(query_embeddings=got["embeddings"], n_results=6, include=[])
        p1 = p5 = 0.0
        for qid, ids in zip(got["ids"], res["ids"], strict=True):
            neighbours = [i for i in ids if i != qid][:5]
            p1 += label[neighbours[0]] == label[qid]
            p5 += sum(label[i] == label[qid] for i in neighbours) / 5
        n = len(got["ids"])
        shutil.rmtree(archive)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "data": "RSICD test split", "images": n, "labels": len(set(label.values())),
        "embedder": embedder.name, "label_precision@1": round(p1 / n, 4), "label_precision@5": round(p5 / n, 4),
        "ingest_images_per_s": round(report.chunks_embedded / report.seconds, 2),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{n} RSICD test images, {result['labels']} labels, {embedder.name}: label precision@1 "
              f"{result['label_precision@1']:.3f}, @5 {result['label_precision@5']:.3f}; "
              f"ingest {result['ingest_images_per_s']} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
