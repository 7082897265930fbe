"""`geochat data build-instruct`: LLaVA-format instruction data from the real annotations.
`geochat data build-vqa`: an `eval vqa` file of yes/no presence questions from RSICD's captions.
`geochat data build-ground`: an `eval ground` file from DOTA labels and SpaceNet footprints, cut into tiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from geochat.errors import GeoChatError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="build training data", description=__doc__)
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = sub.add_parser("build-instruct", help="write LLaVA-format conversations (captions, classes, yes/no, grounding)")
    p.add_argument("--rsicd", type=Path, help="RSICD directory (annotations.jsonl + images/)")
    p.add_argument("--dota", type=Path, help="DOTA directory (images/ + labels/)")
    p.add_argument("--spacenet", nargs=2, type=Path, metavar=("TIF", "GEOJSON"), help="SpaceNet raster + footprints")
    p.add_argument("--out", type=Path, required=True, help="output JSON (tiles are written beside it)")
    p.add_argument("--split", default="train", help="RSICD split to use (default: train)")
    p.add_argument("--limit", type=int, help="use only N RSICD images (a seeded random subset)")
    p.add_argument("--no-facts", action="store_true", help="leave out the image-facts block the engine adds")
    p.add_argument("--kinds", help="comma-separated sample kinds to write (default: all): "
                   "brief,detail,options,class,yesno,refer,grounding,identify")
    p.add_argument("--tile-stride", type=float,
                   help="DOTA/SpaceNet tile step as a fraction of the tile (default 0.75 / 1.0; 0.25 = 16x the tiles)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    v = sub.add_parser("build-vqa", help="write an eval vqa file: a yes/no presence question an RSICD image")
    v.add_argument("--rsicd", type=Path, required=True, help="RSICD directory (annotations.jsonl + images/)")
    v.add_argument("--out", type=Path, required=True, help="output JSONL (images are written relative to it)")
    v.add_argument("--split", default="test", help="RSICD split to use (default: test)")
    v.add_argument("--limit", type=int, help="use only N images (a seeded random subset)")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=run_vqa)
    g = sub.add_parser("build-ground", help="write an eval ground file: DOTA / SpaceNet tiles and their boxes by class")
    g.add_argument("--dota", type=Path, help="DOTA directory (images/ + labels/)")
    g.add_argument("--spacenet", nargs=2, type=Path, metavar=("TIF", "GEOJSON"), help="SpaceNet raster + footprints")
    g.add_argument("--out", type=Path, required=True, help="output JSONL (tiles are written beside it)")
    g.add_argument("--tile-stride", type=float, help="tile step as a fraction of the tile (default 0.75 / 1.0)")
    g.set_defaults(func=run_ground)


def run(args: argparse.Namespace) -> int:
    from geochat.data.instruct import BuildOptions, build_instruct

    if not (args.rsicd or args.dota or args.spacenet):
        raise GeoChatError("name at least one source: --rsicd, --dota or --spacenet")
    for path in [args.rsicd, args.dota, *(args.spacenet or [])]:
        if path is not None and not path.exists():
            raise GeoChatError(f"not found: {path}")
    try:
        kinds = {"kinds": tuple(k.strip() for k in args.kinds.split(",") if k.strip())} if args.kinds else {}
        opts = BuildOptions(split=args.split, limit=args.limit, facts=not args.no_facts, seed=args.seed,
                            tile_stride=args.tile_stride, **kinds)
    except ValueError as exc:
        raise GeoChatError(str(exc)) from exc
    counts = build_instruct(args.out, args.rsicd, args.dota, tuple(args.spacenet) if args.spacenet else None, opts)
    total = sum(counts.values())
    print(f"{total} conversations written to {args.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())})",
          file=sys.stderr)
    return 0


def run_vqa(args: argparse.Namespace) -> int:
    from geochat.data.instruct import build_presence_vqa

    if not args.rsicd.exists():
        raise GeoChatError(f"not found: {args.rsicd}")
    if args.limit is not None and args.limit < 1:
        raise GeoChatError(f"--limit must be at least 1, got {args.limit}")
    counts = build_presence_vqa(args.out, args.rsicd, args.split, args.seed, args.limit)
    print(f"{sum(counts.values())} questions written to {args.out} (yes: {counts['yes']}, no: {counts['no']}); "
          f"score them with: geochat eval vqa --annotations {args.out}", file=sys.stderr)
    return 0


def run_ground(args: argparse.Namespace) -> int:
    from geochat.data.instruct import BuildOptions, build_ground

    if not (args.dota or args.spacenet):
        raise GeoChatError("name at least one source: --dota or --spacenet")
    for path in [args.dota, *(args.spacenet or [])]:
        if path is not None and not path.exists():
            raise GeoChatError(f"not found: {path}")
    try:
        stride = BuildOptions(tile_stride=args.tile_stride).tile_stride  # the tiles are build-instruct's: its check
    except ValueError as exc:
        raise GeoChatError(str(exc)) from exc
    counts = build_ground(args.out, args.dota, tuple(args.spacenet) if args.spacenet else None, stride)
    print(f"{sum(counts.values())} rows written to {args.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
          f"score them with: geochat eval ground --annotations {args.out}", file=sys.stderr)
    return 0
