"""Seconds to merge the boxes of a tiled run over a large scene (`join_cut_boxes`, then `merge_boxes`).

A 50,000 × 50,000 px scene in 1,024-px tiles with 128 px overlap (3,136 tiles); each tile reports
`--per-tile` boxes of one phrase (seeded), about 40 % of them cut at an inner tile edge. What is measured is the
bookkeeping after the model has answered every tile, which must stay small beside the answers themselves.

    .venv/bin/python benchmarks/box_merge.py [--per-tile 10] [--json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from report import print_results  # noqa: E402  (benchmarks/report.py, beside this script)

sys.path.insert(0, str(REPO))

from geochat.box_geometry import merge_boxes  # noqa: E402
from geochat.grounding import Box  # noqa: E402
from geochat.tiling import cut_edges, join_cut_boxes, plan_tiles  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50_000)
    parser.add_argument("--per-tile", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(0)
    tiles = plan_tiles(args.size, args.size, 1024, 128)
    pieces = []
    for t in tiles:
        for _ in range(args.per_tile):
            w, h = rng.uniform(10, 200), rng.uniform(10, 200)
            x = t.col + rng.choice([0.0, rng.uniform(0, t.width - w), t.width - w])  # at an edge 2 times in 3
            y = t.row + rng.uniform(0, t.height - h)
            box = Box(x, y, x + w, y + h, rng.choice([0.0, 0.0, 0.0, 20.0]))
            pieces.append(("building", box, t, cut_edges(box, t, args.size, args.size)))
    t0 = time.perf_counter()
    joined = join_cut_boxes(pieces)
    t1 = time.perf_counter()
    merged = merge_boxes(joined)
    t2 = time.perf_counter()
    results = {"tiles": len(tiles), "boxes": len(pieces), "cut": sum(p[3] for p in pieces), "after_join": len(joined),
               "after_merge": len(merged), "join_s": round(t1 - t0, 3), "merge_s": round(t2 - t1, 3)}
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
