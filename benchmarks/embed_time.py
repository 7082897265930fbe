"""Milliseconds per image of the dual encoder's image embedding, for each tower a model directory holds.

The embedding is what zero-shot classification, text→image search and `geochat index images` compute:
`tower_embedding`, the mean over four 90° rotations (and, for comparison, one view). Random 224-px
inputs (the cost does not depend on the content).

    .venv/bin/python benchmarks/embed_time.py [--model adapters/geochat-mini] [--batch 32] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from report import print_results  # noqa: E402  (benchmarks/report.py, beside this script)

sys.path.insert(0, str(REPO))

from geochat.train.dual_encoder import RETRIEVAL_DIR, load_tower, tower_embedding, tower_weights  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "adapters" / "geochat-mini")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    towers = {"chat tower (vision/)": args.model}
    if tower_weights(args.model / RETRIEVAL_DIR).is_file():
        towers["search tower (retrieval/vision/)"] = args.model / RETRIEVAL_DIR
    pixels = torch.randn(args.batch, 3, 224, 224)
    results = {"threads": torch.get_num_threads(), "batch": args.batch}
    for name, directory in towers.items():
        tower = load_tower(directory)
        for views in (1, 4):
            tower_embedding(tower, pixels[:2], views)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                tower_embedding(tower, pixels, views)
                times.append((time.perf_counter() - start) / args.batch * 1000)
            results[f"{name}, {views} view(s), ms/image"] = round(statistics.median(times), 1)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
