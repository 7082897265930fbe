"""`geochat ask IMAGE "question"`: one question about one image, printed readably or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from geochat.commands.index import add_store_arguments
from geochat.errors import GeoChatError
from geochat.prompting import QUESTION_OPTIONAL, Task


def register(sub: Any) -> None:
    p = sub.add_parser("ask", help="ask one question about an image (or, with --no-image, a text-only question)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE QUESTION", help="image path then question (question only with --no-image)")
    p.add_argument("--task", choices=[t.value for t in Task], default=None,
                   help="refer: locate the phrase; grounding: describe with boxes; identify: describe --region")
    p.add_argument("--region", type=_floats, help="pixel box x1,y1,x2,y2[,theta] for --task identify")
    p.add_argument("--cot", action="store_true", help="chain-of-thought: reasoning returned apart from the answer")
    p.add_argument("--bands", type=_ints, help="1-based bands for the RGB view, e.g. 4,3,2")
    p.add_argument("--sensor", help="sensor preset for band roles: sentinel2, landsat8, naip, ...")
    p.add_argument("--labels", help="comma-separated options for --task classify (the answer is always one of them)")
    p.add_argument("--model", default=None, help="assistant directory or name (default: the offline default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-image", action="store_true", help="a text-only question")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, help="where to save the image with boxes drawn (default: IMAGE_boxes.png)")
    p.add_argument("--tile", type=int, help="large scenes: ask every overlapping TILE-pixel window and merge the boxes")
    p.add_argument("--overlap", type=int,
                   help="pixels shared by neighbouring tiles (with --tile; default 128); an object cut at a seam is joined "
                        "into one box where the tiles overlap, so 0 leaves its pieces apart")
    p.add_argument("--no-retrieval", action="store_true", help="answer without documentation passages")
    p.add_argument("--k", type=int, default=4, help="documentation passages to put in the prompt (default 4)")
    add_store_arguments(p)
    p.set_defaults(func=run)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,3,2, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 10,20,110,90, got {text!r}") from None
    if len(values) not in (4, 5):
        raise argparse.ArgumentTypeError("a region is x1,y1,x2,y2 or x1,y1,x2,y2,theta")
    return values


def _retriever(args: argparse.Namespace) -> Any | None:
    """The docs retriever; the index is built from the shipped knowledge/ on first use (and kept in step with it)."""
    from geochat.retrieval import StoreLocation, ensure_retriever

    if args.k < 1:
        raise GeoChatError(f"--k must be at least 1, got {args.k}")
    location = StoreLocation.resolve(args.index_dir, args.chroma_host, args.chroma_port)
    retriever, built = ensure_retriever(location, k=args.k)
    if built is not None:
        print(f"geochat: indexed the documentation: {built.summary('documents')} ({location})", file=sys.stderr)
    if retriever is None:
        print(f"geochat: no documentation index at {location}; answering without retrieval", file=sys.stderr)
    return retriever


DRAWING_SUFFIXES = (".png", ".jpg", ".jpeg")


def _drawing_path(out: Path | None, image_path: Path) -> Path:
    """Where the boxes are drawn (default: IMAGE_boxes.png in the current folder), checked before the model runs:
    a picture file in an existing folder, never the input image itself."""
    path = out or Path(f"{image_path.stem}_boxes.png")
    if path.exists() and path.resolve() == image_path.resolve():
        raise GeoChatError(f"--out {path} is the input image, which the drawing would overwrite; name another file")
    if path.is_dir():
        raise GeoChatError(f"--out {path} is a folder; name a picture file in it, e.g. {path / 'boxes.png'}")
    if path.suffix.lower() not in DRAWING_SUFFIXES:
        raise GeoChatError(f"--out {path}: name a .png or .jpg file (the drawing is a picture, not a raster)")
    if not path.parent.is_dir():
        raise GeoChatError(f"--out {path}: the folder {path.parent} does not exist; create it or name another")
    return path


def run(args: argparse.Namespace) -> int:
    if args.overlap is not None and args.tile is None:
        raise GeoChatError("--overlap applies to tiles: pass --tile as well")
    from geochat.tiling import DEFAULT_OVERLAP, check_tiling

    overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    if args.tile is not None:
        check_tiling(args.tile, overlap)  # before the model loads
    if args.no_image:
        if len(args.inputs) != 1:
            raise GeoChatError("with --no-image pass only the question")
        given = [name for name, value in (("--bands", args.bands), ("--sensor", args.sensor), ("--tile", args.tile),
                                          ("--out", args.out)) if value is not None]
        if given:
            raise GeoChatError(f"{', '.join(given)} need an image; drop them or --no-image")
        image_path, question, drawing = None, args.inputs[0], None
    else:
        optional = args.task in QUESTION_OPTIONAL
        if not (len(args.inputs) == 2 or (optional and len(args.inputs) == 1)):
            raise GeoChatError('pass an image and a question: geochat ask IMAGE "question" (or --no-image "question")')
        image_path, question = Path(args.inputs[0]), (args.inputs[1] if len(args.inputs) == 2 else "")
        if not image_path.exists():
            raise GeoChatError(f"image not found: {image_path}")
        drawing = _drawing_path(args.out, image_path)

    from geochat.engine import GeoChat
    from geochat.imagery import load_image
    from geochat.imagery.raster import DEFAULT_MAX_PIXELS, TILED_MAX_PIXELS

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels is not None else None
    if labels == []:
        raise GeoChatError(f"--labels {args.labels!r} names no label: pass comma-separated options, e.g. "
                           "--labels airport,forest,harbour")
    limit = TILED_MAX_PIXELS if args.tile is not None else DEFAULT_MAX_PIXELS  # tile by tile, a scene may be larger
    loaded = load_image(image_path, bands=args.bands, sensor=args.sensor, max_pixels=limit) if image_path else None
    gc = GeoChat.from_pretrained(args.model, max_new_tokens=args.max_new_tokens)
    if not args.no_retrieval:
        gc.retriever = _retriever(args)
    if args.tile is not None:
        if image_path is None or args.region:
            raise GeoChatError("--tile needs an image and does not take --region")
        answer = gc.chat_tiled(image_path, question, overview=loaded, task=args.task or "grounding", tile=args.tile,
                               overlap=overlap, bands=args.bands,
                               sensor=args.sensor, cot=args.cot, labels=labels, progress=True)
    else:
        answer = gc.chat(loaded, question, task=args.task, cot=args.cot, region=args.region, labels=labels)

    if args.json:
        print(json.dumps(answer.to_json(), ensure_ascii=False))
        return 0
    if answer.reasoning:
        print(f"Reasoning: {answer.reasoning}\n")
    print(answer.answer or "(no answer text)")
    for box in answer.boxes:
        print(f"  box {box.phrase or '-'}: pixels {[round(v, 1) for v in box.pixel]}")
    if answer.sources:  # the passages the model was given, so that a reader can check the answer against them
        print("Sources:")
        for source in answer.sources:
            print(f"  [{source.get('id', '?')}] {source.get('source', '?')} § {source.get('heading') or '(no heading)'}")
    if answer.boxes and loaded is not None and drawing is not None:
        from geochat.drawing import draw_boxes

        polygons = [b.pixel_polygon() for b in answer.boxes]
        draw_boxes(loaded.rgb, polygons, [b.phrase for b in answer.boxes], scale=loaded.scale).save(drawing)
        print(f"boxes drawn on {drawing}", file=sys.stderr)
    print(f"[{answer.model.name}; {answer.timings.total_s:.1f} s]", file=sys.stderr)
    return 0
