"""Retrieval latency and ingest throughput.

    .venv/bin/python benchmarks/retrieval_latency.py [--json] [--synthetic-dir DIR] [--n 100000]

- corpus: the `knowledge/` docs index (built from scratch in a temp dir, which also gives the ingest
  throughput with MiniLM embedding); per query, the MiniLM query embedding, the chromadb query
  (k=5, documents + metadata + distances) and both together (`Retriever.search`), p50/p95 over the
  benchmark questions;
- synthetic: N random unit vectors (384-d, cosine HNSW, a short document and metadata each) added to
  a chromadb `PersistentClient` store (built once, in a temp dir unless `--synthetic-dir` keeps it),
  then p50/p95 of k=5 queries, and HNSW recall@5 against exact search (random vectors are the hard
  case for HNSW; real embeddings cluster).
- query bank: a text→image query with the default search tower, the shared MiniLM alone vs the whole search
  query (`TowerEmbedder.embed_text`: the search tower's text side, its own adapted MiniLM where it has one, then
  the query bank's expansion), p50/p95 over the benchmark questions, and the first such query of a process
  (it loads the text side and the bank); and the bank's
  hubness offsets of the RERANK_POOL images a search re-ranks (`TowerEmbedder.text_offsets`), the first
  call and then per query.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geochat.retrieval import BUNDLED_KNOWLEDGE, IndexStore, Retriever, StoreLocation, index_docs  # noqa: E402
from geochat.retrieval.retriever import RERANK_POOL  # noqa: E402
from geochat.retrieval.store import DOCS  # noqa: E402

DIM = 384
K = 5
ADD_BATCH = 5000


def _pct(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2),
            "mean_ms": round(statistics.fmean(ms), 2), "n": len(ms)}


def corpus(questions: list[str], workdir: Path) -> dict[str, Any]:
    store = IndexStore.open(StoreLocation(path=workdir / "docs-index"), create=True)
    report = index_docs(store, BUNDLED_KNOWLEDGE, progress=True)
    retriever = Retriever(store, k=K)
    col = store.collection(DOCS)
    retriever.search(questions[0])  # warm-up: model load, first query
    embed, query, total = [], [], []
    for q in questions:
        t0 = time.perf_counter()
        v = retriever.text_embedder.embed_query(q)
        t1 = time.perf_counter()
        col.query(query_embeddings=[v.tolist()], n_results=K, include=["documents", "metadatas", "distances"])
        t2 = time.perf_counter()
        retriever.search(q)
        t3 = time.perf_counter()
        embed.append(t1 - t0)
        query.append(t2 - t1)
        total.append(t3 - t2)
    return {
        "chunks": report.total_records, "files": report.files,
        "ingest_chunks_per_s": round(report.chunks_embedded / report.seconds, 2), "ingest_s": round(report.seconds, 1),
        "query_embedding": _pct(embed), "chroma_query": _pct(query), "search_total": _pct(total),
    }


def query_bank(questions: list[str]) -> dict[str, Any]:
    from geochat.retrieval.embedders import image_embedder_from_name

    embedder: Any = image_embedder_from_name("auto")
    if getattr(embedder, "bank", None) is None:
        return {"bank": None}
    t0 = time.perf_counter()
    embedder.embed_text(questions[0])  # warm-up: loads MiniLM, the search text side and the bank
    first_query = time.perf_counter() - t0
    plain, expanded = [], []
    for q in questions:
        t0 = time.perf_counter()
        embedder._text.embed_query(q)
        t1 = time.perf_counter()
        embedder.embed_text(q)
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        expanded.append(t2 - t1)
    # the hubness correction of the re-ranked pool (the first call reads the bank's stored centre, or
    # computes it from the bank's rows when the bank was written without one)
    pool, offsets_of = embedder.bank.values[:RERANK_POOL].numpy(), embedder.text_offsets
    t0 = time.perf_counter()
    offsets_of(pool)
    first = time.perf_counter() - t0
    offsets = []
    for _ in questions:
        t0 = time.perf_counter()
        offsets_of(pool)
        offsets.append(time.perf_counter() - t0)
    return {"bank_images": len(embedder.bank.keys), "minilm": _pct(plain), "search_query": _pct(expanded),
            "first_query_s": round(first_query, 3),
            "hub_offsets_first_s": round(first, 3), f"hub_offsets_{RERANK_POOL}": _pct(offsets)}


def synthetic(n: int, directory: Path, queries: int = 300, seed: int = 0) -> dict[str, Any]:
    import chromadb

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    client = chromadb.PersistentClient(path=str(directory), settings=chromadb.Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection("synthetic", configuration={"hnsw": {"space": "cosine"}},
                                          embedding_function=None)
    build_s = None
    if col.count() != n:
        client.delete_collection("synthetic")
        col = client.create_collection("synthetic", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
        start = time.perf_counter()
        for lo in tqdm(range(0, n, ADD_BATCH), desc=f"building {n:,}-chunk store", unit="batch", file=sys.stderr):
            hi = min(n, lo + ADD_BATCH)
            col.add(
                ids=[f"c{i}" for i in range(lo, hi)], embeddings=vectors[lo:hi],
                documents=[f"synthetic chunk {i} " + "lorem ipsum " * 40 for i in range(lo, hi)],
                metadatas=[{"source": f"synthetic/doc{i // 10}.md", "heading": f"section {i % 10}"} for i in range(lo, hi)],
            )
        build_s = time.perf_counter() - start
    q = rng.normal(size=(queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    col.query(query_embeddings=q[:1], n_results=K)  # warm-up: loads the HNSW index
    times, found = [], []
    for vec in q:
        t0 = time.perf_counter()
        res = col.query(query_embeddings=vec[None], n_results=K, include=["documents", "metadatas", "distances"])
        times.append(time.perf_counter() - t0)
        found.append({int(i[1:]) for i in res["ids"][0]})
    exact = np.argsort(-(q @ vectors.T), axis=1)[:, :K]
    recall = float(np.mean([len(f & set(e.tolist())) / K for f, e in zip(found, exact, strict=True)]))
    # Queries with a true near neighbour (a stored vector plus noise), as real questions have.
    picks = rng.choice(n, size=queries, replace=False)
    near = vectors[picks] + rng.normal(0, 0.02, size=(queries, DIM)).astype(np.float32)
    res = col.query(query_embeddings=near, n_results=1, include=[])
    top1 = float(np.mean([ids[0] == f"c{i}" for ids, i in zip(res["ids"], picks, strict=True)]))
    out: dict[str, Any] = {"chunks": n, "dim": DIM, "k": K, "query": _pct(times),
                           "hnsw_recall@5_vs_exact": round(recall, 4), "near_duplicate_top1": round(top1, 4)}
    if build_s is not None:
        out["build_s"] = round(build_s, 1)
        out["add_vectors_per_s"] = round(n / build_s, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--n", type=int, default=100_000, help="synthetic store size")
    parser.add_argument("--synthetic-dir", type=Path, default=None, help="keep (and reuse) the synthetic store here")
    parser.add_argument("--skip-corpus", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (REPO / "benchmarks" / "retrieval_questions.jsonl").read_text().splitlines() if line.strip()]
    questions = [r["question"] for r in rows]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="geochat-latency-") as tmp:
        if not args.skip_corpus:
            result["corpus"] = corpus(questions, Path(tmp))
        if not args.skip_synthetic:
            result["synthetic"] = synthetic(args.n, args.synthetic_dir or Path(tmp) / "synthetic")
    result["query_bank"] = query_bank(questions)
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if "corpus" in result:
        c = result["corpus"]
        print(f"corpus: {c['chunks']} chunks from {c['files']} files; ingest {c['ingest_chunks_per_s']} chunks/s (MiniLM, CPU)")
        for key in ("query_embedding", "chroma_query", "search_total"):
            print(f"  {key:16s} p50 {c[key]['p50_ms']:7.2f} ms  p95 {c[key]['p95_ms']:7.2f} ms")
    b = result["query_bank"]
    if b.get("bank_images"):
        print(f"text→image query, {b['bank_images']:,}-image query bank: MiniLM p50 {b['minilm']['p50_ms']} ms, "
              f"search text side + bank p50 {b['search_query']['p50_ms']} ms (p95 {b['search_query']['p95_ms']} ms; "
              f"first query of a process {b['first_query_s']} s); "
              f"hubness offsets of {RERANK_POOL} images p50 {b[f'hub_offsets_{RERANK_POOL}']['p50_ms']} ms "
              f"(first query {b['hub_offsets_first_s']} s)")
    s = result.get("synthetic")
    if s:
        print(f"synthetic {s['chunks']:,} x {s['dim']}-d: query p50 {s['query']['p50_ms']} ms  p95 {s['query']['p95_ms']} ms; "
              f"HNSW recall@5 vs exact {s['hnsw_recall@5_vs_exact']} (random queries), "
              f"near-duplicate top-1 {s['near_duplicate_top1']}"
              + (f"; built in {s['build_s']} s ({s['add_vectors_per_s']:.0f} vectors/s)" if "build_s" in s else ""))
    print(f"(load average {result['load_avg_1m']} → {result['load_avg_1m_after']} on {result['cpus']} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
