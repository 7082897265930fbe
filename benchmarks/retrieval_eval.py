"""Retrieval quality over `benchmarks/retrieval_questions.jsonl`, and the end-to-end answer rate.

    .venv/bin/python benchmarks/retrieval_eval.py [--json] [--e2e N|all] [--baseline]

1. Recall@1/@5 of the docs retriever: a hit is a passage from the right file AND heading (the
   file-level rate is reported too), plus MRR@5.
2. End to end (`--e2e`): each question goes through `GeoChat.chat(None, question)` (what `geochat ask
   --no-image` runs) with the offline default model and the retriever attached; the rate at which
   the answer contains the expected `answer` string (case and spacing ignored). `--baseline` runs the
   same questions without retrieval for comparison.

The index is (re)built incrementally from `knowledge/` in `<cache>/bench-index` (or `--index-dir`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geochat.paths import cache_root  # noqa: E402
from geochat.retrieval import BUNDLED_KNOWLEDGE, IndexStore, Retriever, StoreLocation, index_docs  # noqa: E402

QUESTIONS = REPO / "benchmarks" / "retrieval_questions.jsonl"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().replace("\u2009", " ").replace("\u00a0", " ")).strip()


def recall(retriever: Retriever, rows: list[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    hits1 = hits5 = files1 = files5 = 0
    rr = 0.0
    misses = []
    start = time.perf_counter()
    for row in rows:
        passages = retriever.search(row["question"], k=k)
        keys = [(p.source, p.heading) for p in passages]
        rank = next((i for i, key in enumerate(keys) if key == (row["source"], row["heading"])), None)
        frank = next((i for i, (src, _) in enumerate(keys) if src == row["source"]), None)
        hits1 += rank == 0
        hits5 += rank is not None
        files1 += frank == 0
        files5 += frank is not None
        rr += 1.0 / (rank + 1) if rank is not None else 0.0
        if rank is None:
            misses.append({"question": row["question"], "expected": f"{row['source']} § {row['heading']}",
                           "got": [f"{s} § {h}" for s, h in keys[:2]]})
    n = len(rows)
    return {
        "n": n, "recall@1": round(hits1 / n, 4), "recall@5": round(hits5 / n, 4),
        "file_recall@1": round(files1 / n, 4), "file_recall@5": round(files5 / n, 4), "mrr@5": round(rr / n, 4),
        "seconds_per_query": round((time.perf_counter() - start) / n, 4), "misses": misses,
    }


def end_to_end(retriever: Retriever | None, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    from geochat.engine import GeoChat

    gc = GeoChat.from_pretrained(None, max_new_tokens=max_new_tokens)
    gc.retriever = retriever
    correct = cited = 0
    start = time.perf_counter()
    examples = []
    for i, row in enumerate(rows):
        answer = gc.chat(None, row["question"])
        ok = _norm(row["answer"]) in _norm(answer.answer)
        correct += ok
        cited += bool(re.search(r"\[S\d", answer.raw))
        if len(examples) < 5:
            examples.append({"question": row["question"], "expected": row["answer"], "answer": answer.answer, "ok": ok})
        print(f"\r  e2e {i + 1}/{len(rows)}: {correct} correct", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    n = len(rows)
    return {"n": n, "answer_contains_fact": round(correct / n, 4), "cites_a_passage": round(cited / n, 4),
            "model": gc.model_info.name, "max_new_tokens": max_new_tokens,
            "seconds_per_question": round((time.perf_counter() - start) / n, 2), "examples": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--index-dir", type=Path, default=None)
    parser.add_argument("--e2e", default="0",
                        help="questions for the end-to-end run: a number (an evenly spaced sample) or 'all' (default 0)")
    parser.add_argument("--k", type=int, default=4, help="passages in the prompt for the end-to-end run (default 4, as ask)")
    parser.add_argument("--baseline", action="store_true", help="also run end to end without retrieval")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    location = StoreLocation(path=(args.index_dir or cache_root() / "bench-index").resolve())
    store = IndexStore.open(location, create=True)
    built = index_docs(store, BUNDLED_KNOWLEDGE, progress=not args.json)
    retriever = Retriever(store)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "questions": str(QUESTIONS.relative_to(REPO)),
        "index": built.to_json(), "retrieval": recall(retriever, rows),
    }
    n_e2e = len(rows) if args.e2e == "all" else min(int(args.e2e), len(rows))
    if n_e2e:
        sample = [rows[round(i * len(rows) / n_e2e)] for i in range(n_e2e)]
        result["end_to_end"] = end_to_end(Retriever(store, k=args.k), sample, args.max_new_tokens)
        result["end_to_end"]["k"] = args.k
        if args.baseline:
            result["end_to_end_without_retrieval"] = end_to_end(None, sample, args.max_new_tokens)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    r = result["retrieval"]
    print(f"retrieval over {r['n']} questions: R@1 {r['recall@1']:.3f}  R@5 {r['recall@5']:.3f}  "
          f"(file level R@1 {r['file_recall@1']:.3f}  R@5 {r['file_recall@5']:.3f}; MRR@5 {r['mrr@5']:.3f}; "
          f"{r['seconds_per_query'] * 1000:.0f} ms/query)")
    for miss in r["misses"]:
        print(f"  miss: {miss['question']}\n        expected {miss['expected']}\n        got {miss['got']}")
    for key in ("end_to_end", "end_to_end_without_retrieval"):
        if key in result:
            e = result[key]
            print(f"{key}: answer contains the fact {e['answer_contains_fact']:.3f} over {e['n']} questions "
                  f"(cites a passage {e['cites_a_passage']:.3f}; {e['model']}; {e['seconds_per_question']} s/question)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
