"""Throughput of many single questions (evaluation, batch captioning): one `chat` per image vs `chat_batch`.

Captions N images twice with the default model (or --model): one `GeoChat.chat` call per image, then
`GeoChat.chat_batch` with --batch images per call, and reports images per second for both and the
speed-up. Greedy decoding both ways; `same_answers` says how many of the N answers agree.

    .venv/bin/python benchmarks/batch_generation.py [--images DIR] [-n 32] [--batch 16] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from report import print_results  # noqa: E402  (benchmarks/report.py, beside this script)

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "rsicd" / "images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of PNG/JPEG/TIFF images")
    parser.add_argument("-n", type=int, default=32, help="images to caption")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from geochat import GeoChat
    from geochat.cli import _quiet_libraries

    _quiet_libraries()
    paths = sorted(p for p in args.images.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    paths = paths[:: max(1, len(paths) // args.n)][: args.n]
    if not paths:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    gc = GeoChat.from_pretrained(args.model, max_new_tokens=args.max_new_tokens)
    gc.chat_batch(paths[:2], "", task="caption")  # warm-up

    t = time.perf_counter()
    single = [gc.chat(p, "", task="caption").answer for p in paths]
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    batched = [a for i in range(0, len(paths), args.batch) for a in gc.chat_batch(paths[i : i + args.batch], "", task="caption")]
    batch_s = time.perf_counter() - t

    result = {
        "model": gc.model_info.name, "images": len(paths), "batch": args.batch,
        "one_by_one_images_per_s": round(len(paths) / single_s, 2),
        "batched_images_per_s": round(len(paths) / batch_s, 2),
        "speedup": round(single_s / batch_s, 2),
        "same_answers": sum(a == b for a, b in zip(single, batched, strict=True)),
    }
    print_results(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
