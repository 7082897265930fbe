"""`geochat eval TASK --annotations FILE.jsonl`: the field's metrics for the dual encoder or the assistant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from geochat.errors import GeoChatError

HELP = {
    "classify": "zero-shot scene classification accuracy over the labels in the file (or --labels)",
    "retrieve": "text→image and image→text Recall@1/5/10 with the dual encoder (rows naming one image are one "
                "gallery image; n counts images)",
    "caption": "BLEU-1..4, METEOR, ROUGE-L, CIDEr of the assistant's captions",
    "vqa": "VQA accuracy, by question type",
    "ground": "referring grounding acc@0.5 (rotated IoU; boxes [x1, y1, x2, y2, theta?] in the image's pixels, "
              "theta in degrees; the first N predicted boxes are matched to N references)",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="evaluate with the field's metrics", description=__doc__)
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    for task, text in HELP.items():
        p = tasks.add_parser(task, help=text, description=text)
        p.add_argument("--annotations", type=Path, required=True, help="JSONL file, images relative to it")
        p.add_argument("--model", help="assistant directory (default: the shipped default model)")
        p.add_argument("--split", help="only rows of this split (e.g. test)")
        p.add_argument("--limit", type=int, help="only the first N usable rows")
        p.add_argument("--sample", type=int, metavar="N",
                       help="only a seeded random N of the usable rows (files sorted by class need this, not --limit)")
        p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--report", type=Path, metavar="DIR", help="write a Markdown report (and figures) here")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if task == "classify":
            p.add_argument("--labels", help='comma-separated labels, used as written (default: those in the file)')
            p.add_argument("--mode", choices=("dual", "vlm"), default="dual",
                           help="dual: image vs label-prompt embeddings; vlm: ask the assistant with the options")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geochat.eval import tasks
    from geochat.eval.annotations import read_annotations

    for name in ("limit", "sample"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GeoChatError(f"--{name} must be >= 1")
    if args.report is not None:  # before the model runs: a bad folder must not cost the evaluation
        if args.report.exists() and not args.report.is_dir():
            raise GeoChatError(f"--report {args.report} is a file; name a folder for the report (it is created)")
        try:
            args.report.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GeoChatError(f"--report {args.report}: cannot create the folder ({exc.strerror})") from exc
    task = args.eval_task
    all_rows = read_annotations(args.annotations, args.split)
    rows = tasks.rows_for(task, all_rows, args.limit)
    if args.sample is not None and args.sample < len(rows):
        import random

        rows = [rows[i] for i in sorted(random.Random(args.seed).sample(range(len(rows)), args.sample))]
    # zero-shot over the labels of the whole file (a --limit/--sample subset must not shrink the choice)
    labelled = [r for r in read_annotations(args.annotations, None) if r.label] if task == "classify" else []
    progress = not (args.quiet or args.json)
    if task == "retrieve" or (task == "classify" and args.mode == "dual"):
        dual = tasks.load_dual(args.model)
        if task == "retrieve":
            result = tasks.retrieve(rows, dual, progress)
        else:
            result = tasks.classify_dual(rows, tasks.labels_of(labelled, args.labels), dual, progress)
    else:
        from geochat.engine import GeoChat

        chat = GeoChat.from_pretrained(args.model)
        if task == "classify":
            result = tasks.classify_vlm(rows, tasks.labels_of(labelled, args.labels), chat, progress)
        else:
            result = {"caption": tasks.caption, "vqa": tasks.vqa, "ground": tasks.ground}[task](rows, chat, progress)
    if args.report:
        from geochat.eval.report import write_report

        path = write_report(result, args.report, str(args.annotations), args.model or "default", _selection(args))
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.metrics, ensure_ascii=False))
    else:
        for key, value in result.metrics.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k:<24} {v:.4f}")
            else:
                print(f"{key:<26} {value:.4f}" if isinstance(value, float) else f"{key:<26} {value}")
    return 0


def _selection(args: argparse.Namespace) -> str:
    """Which rows a run scored, in words for its report: `split test, the first 100, a random 50 (seed 0)`."""
    parts = [f"split `{args.split}`" if args.split is not None else "all splits"]
    if args.limit is not None:
        parts.append(f"the first {args.limit} usable")
    if args.sample is not None:
        parts.append(f"a random {args.sample} of them (seed {args.seed})")
    return ", ".join(parts)
