"""Chat latency on the default model: load time, time to first token per turn, decode speed.

A 3-turn chat about one image. Turn 1 encodes the image and prefills the whole prompt; later turns
reuse the image tokens and the KV cache of the conversation so far, so their time to first token
should be a small fraction of turn 1's (`turn2_over_turn1`; the plain way, re-encoding and
re-prefilling everything each turn, is ~1.0 — measured here too as `plain_turn2_over_turn1`).

    .venv/bin/python benchmarks/chat_latency.py [--json] [--image PATH] [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from report import print_results  # noqa: E402  (benchmarks/report.py, beside this script)

DEFAULT_IMAGE = REPO / "examples" / "landsat_rgb_utm18.tif"
QUESTIONS = ("Describe this image.", "Is there any water?", "What is the ground resolution?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from geochat import GeoChat
    from geochat.cli import _quiet_libraries

    _quiet_libraries()
    if not args.image.exists():
        print(f"image not found: {args.image}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    gc = GeoChat.from_pretrained(args.model, max_new_tokens=args.max_new_tokens)
    load_s = time.perf_counter() - t
    gc.chat(None, "warm up", max_new_tokens=2)  # first-call library overheads, not the model's speed

    answers = []
    for q in QUESTIONS:
        answers.append(gc.chat(args.image, q, history=[a.as_turn() for a in answers]))
    # The plain way for comparison: a fresh engine (no session) for turn 2, so everything is recomputed.
    plain = GeoChat(gc.assistant, max_new_tokens=args.max_new_tokens)
    plain_turn2 = plain.chat(args.image, QUESTIONS[1], history=[answers[0].as_turn()])

    tokenizer = gc.assistant.tokenizer
    decode_tokens = sum(len(tokenizer(a.raw)["input_ids"]) for a in answers)
    decode_s = sum(a.timings.total_s - a.timings.ttft_s for a in answers)
    result = {
        "load_s": round(load_s, 3),
        "ttft_turn1_s": answers[0].timings.ttft_s,
        "ttft_turn2_s": answers[1].timings.ttft_s,
        "ttft_turn3_s": answers[2].timings.ttft_s,
        "decode_tok_s": round(decode_tokens / decode_s, 1) if decode_s > 0 else None,
        "turn2_over_turn1": round(answers[1].timings.ttft_s / answers[0].timings.ttft_s, 3),
        "plain_turn2_over_turn1": round(plain_turn2.timings.ttft_s / answers[0].timings.ttft_s, 3),
        "model": answers[0].model.name,
    }
    print_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
