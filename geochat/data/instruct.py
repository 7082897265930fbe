"""Build LLaVA-format instruction conversations from real annotations.

One sample is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}`` with `image` relative to the JSON file. The human turn is
written by `geochat.prompting.build_user_message`, the same function the engine uses at inference
(task tokens, the classification options, the image-facts block), so the model is trained on
exactly the prompts it will be asked. Kinds of sample:

- RSICD scenes: a brief caption (one reference caption), a detailed description (the distinct
  reference captions joined), classification with the list of options and without, and a yes/no
  question about an object that the captions mention (yes) or that none of the five mentions (no);
- DOTA tiles (oriented boxes) and SpaceNet tiles (building footprints → minimum-area rectangles):
  `[refer]` a class → its boxes, `[grounding]` → a sentence with tagged phrases and boxes,
  `[identify]` a box → its class. Boxes are on the tile's 0–100 grid (`pixel_box_to_grid`).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from geochat.data.dota import load_dota
from geochat.data.rsicd import RsicdItem, clean_caption, load_rsicd
from geochat.data.spacenet import load_footprints
from geochat.errors import GeoChatError
from geochat.grounding import Box, format_grounded, pixel_box_to_grid
from geochat.prompting import Task, build_user_message, prompt_facts

IMAGE_PLACEHOLDER = "<image>"
DETAILED_PROMPT = "Describe the image in detail."
KINDS = ("brief", "detail", "options", "class", "yesno", "refer", "grounding", "identify")
MAX_BOXES = 12          # refer/grounding answers longer than this are skipped (sequence length)
DOTA_TILE, DOTA_STRIDE = 512, 384
SPACENET_TILE = 300

# Objects whose presence a caption can attest: question word → pattern over the five captions.
PRESENCE = {
    "airplane": r"\b(?:air)?planes?\b|\baircrafts?\b",
    "river": r"\brivers?\b",
    "bridge": r"\bbridges?\b",
    "building": r"\bbuildings?\b",
    "tree": r"\btrees?\b",
    "road": r"\broads?\b",
    "car": r"\bcars?\b|\bvehicles?\b",
    "boat": r"\bboats?\b|\bships?\b",
    "pond": r"\bponds?\b|\blakes?\b",
    "storage tank": r"\btanks?\b",
    "playground": r"\bplaygrounds?\b",
    "parking lot": r"\bparking\b",
    "railway": r"\brailways?\b|\btrains?\b",
    "beach": r"\bbeach(?:es)?\b",
    "mountain": r"\bmountains?\b|\bhills?\b",
    "house": r"\bhouses?\b",
    "swimming pool": r"\bpools?\b",
}
PHRASES = {  # class → (singular, plural)
    "plane": ("plane", "planes"), "ship": ("ship", "ships"), "storage-tank": ("storage tank", "storage tanks"),
    "harbor": ("harbor", "harbors"), "bridge": ("bridge", "bridges"), "large-vehicle": ("large vehicle", "large vehicles"),
    "small-vehicle": ("small vehicle", "small vehicles"), "helicopter": ("helicopter", "helicopters"),
    "building": ("building", "buildings"), "swimming-pool": ("swimming pool", "swimming pools"),
}


@dataclass(frozen=True)
class BuildOptions:
    split: str = "train"
    limit: int | None = None         # RSICD images used (first N of the split, shuffled by seed)
    facts: bool = True               # add the image-facts block, as the engine does at inference
    seed: int = 0
    kinds: tuple[str, ...] = KINDS   # which kinds of sample to write
    tile_stride: float | None = None  # DOTA/SpaceNet tile step as a fraction of the tile (default 0.75 / 1.0)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.tile_stride is not None and not 0.05 <= self.tile_stride <= 1:
            raise ValueError("tile_stride must be in [0.05, 1] (a fraction of the tile size)")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"unknown sample kinds {unknown}; choose from {', '.join(KINDS)}")


def _phrase(label: str, n: int) -> str:
    singular, plural = PHRASES.get(label, (label.replace("-", " "), label.replace("-", " ") + "s"))
    return singular if n == 1 else plural


def _facts(path: Path, use: bool) -> dict[str, Any] | None:
    if not use:
        return None
    from geochat.imagery import load_image

    return prompt_facts(load_image(path).facts)  # exactly the lines the engine puts in the prompt


def sample(sid: str, image: Path, out_dir: Path, human: str, gpt: str) -> dict[str, Any]:
    return {
        "id": sid,
        "image": os.path.relpath(image, out_dir),
        "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{human}"}, {"from": "gpt", "value": gpt}],
    }


def _distinct(captions: Sequence[str]) -> list[str]:
    seen: dict[str, str] = {}
    for c in captions:
        clean = clean_caption(c)
        seen.setdefault(clean.lower(), clean)
    return list(seen.values())


def rsicd_samples(items: Sequence[RsicdItem], labels: Sequence[str], out_dir: Path, opts: BuildOptions) -> Iterator[dict[str, Any]]:
    rng = random.Random(opts.seed)
    for item in items:
        caps = _distinct(item.captions)
        if not caps:
            continue
        facts = _facts(item.image, opts.facts)
        sid = item.image.stem
        yield sample(f"rsicd-{sid}-brief", item.image, out_dir,
                     build_user_message("", Task.CAPTION, facts=facts), rng.choice(caps))
        yield sample(f"rsicd-{sid}-detail", item.image, out_dir,
                     build_user_message(DETAILED_PROMPT, facts=facts), " ".join(caps[:3]))
        options = list(labels) if rng.random() < 0.5 else _option_subset(labels, item.label, rng)
        yield sample(f"rsicd-{sid}-options", item.image, out_dir,
                     build_user_message("", Task.CLASSIFY, facts=facts, labels=options), item.label)
        yield sample(f"rsicd-{sid}-class", item.image, out_dir,
                     build_user_message("", Task.CLASSIFY, facts=facts), item.label)
        question = presence_question(item.captions, rng)
        if question is not None:
            q, a = question
            yield sample(f"rsicd-{sid}-yesno", item.image, out_dir, build_user_message(q, facts=facts), a)


def _option_subset(labels: Sequence[str], label: str, rng: random.Random) -> list[str]:
    others = [x for x in labels if x != label]
    chosen = [*rng.sample(others, min(len(others), rng.randint(3, 9))), label]
    rng.shuffle(chosen)
    return chosen


def presence_question(captions: Sequence[str], rng: random.Random) -> tuple[str, str] | None:
    """A yes/no question whose answer all five captions support: mentioned (yes) or in none (no); None without
    captions (nothing supports a no)."""
    if not captions:
        return None
    text = " ".join(captions).lower()
    present = [obj for obj, pattern in PRESENCE.items() if re.search(pattern, text)]
    absent = [obj for obj in PRESENCE if obj not in present]
    if present and (not absent or rng.random() < 0.5):
        obj, answer = rng.choice(present), "Yes."
    elif absent:
        obj, answer = rng.choice(absent), "No."
    else:
        return None
    article = "an" if obj[0] in "aeiou" else "a"
    return f"Is there {article} {obj} in this image? Answer yes or no.", answer


def tile_samples(tile: Path, out_dir: Path, objects: Sequence[tuple[str, tuple[float, ...]]], size: int,
                 opts: BuildOptions, rng: random.Random) -> Iterator[dict[str, Any]]:
    """refer / grounding / identify samples of one tile; `objects` = (class, pixel box in the tile)."""
    by_class: dict[str, list[Box]] = defaultdict(list)
    for label, pixel_box in objects:
        x1, y1, x2, y2, theta = pixel_box
        box = canonical_box(pixel_box_to_grid(x1, y1, x2, y2, size, size, theta))
        if box is not None:
            by_class[label].append(box)
    if not by_class:
        return
    facts = _facts(tile, opts.facts)
    sid = tile.stem
    for label, boxes in sorted(by_class.items()):
        if len(boxes) <= MAX_BOXES:
            yield sample(f"{sid}-refer-{label}", tile, out_dir,
                         build_user_message(_phrase(label, 2), Task.REFER, facts=facts),
                         format_grounded([(_phrase(label, len(boxes)), boxes)]))
    if sum(len(b) for b in by_class.values()) <= MAX_BOXES:
        parts = [(f"{len(b)} {_phrase(label, len(b))}" if len(b) > 1 else f"a {_phrase(label, 1)}", b)
                 for label, b in sorted(by_class.items())]
        text = format_grounded(parts)
        yield sample(f"{sid}-grounding", tile, out_dir, build_user_message("", Task.GROUNDING, facts=facts),
                     f"The image shows {text}.")
    label, boxes = rng.choice(sorted(by_class.items()))
    yield sample(f"{sid}-identify", tile, out_dir,
                 build_user_message("", Task.IDENTIFY, region=rng.choice(boxes), facts=facts),
                 f"This is a {_phrase(label, 1)}.")


def canonical_box(box: Box) -> Box | None:
    """The same rectangle with |θ| <= 45 (width and height swapped when turned by 90°), so that its
    unrotated corners stay near the object; None when they still leave the 0–100 grid (the model's
    box grammar cannot say that)."""
    if abs(box.theta) > 45:
        cx, cy = box.center
        w, h = box.x2 - box.x1, box.y2 - box.y1
        theta = box.theta - 90 if box.theta > 0 else box.theta + 90
        box = Box(cx - h / 2, cy - w / 2, cx + h / 2, cy + w / 2, theta)
    if min(box.x1, box.y1) < 0 or max(box.x2, box.y2) > 100:
        return None
    return box


def _shift(box: tuple[float, ...], col: int, row: int) -> tuple[float, ...]:
    x1, y1, x2, y2, theta = box
    return (x1 - col, y1 - row, x2 - col, y2 - row, theta)


def _positions(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def dota_samples(directory: Path, out_dir: Path, opts: BuildOptions) -> Iterator[dict[str, Any]]:
    rng = random.Random(opts.seed + 1)
    for tile, objects in dota_tiles(directory, out_dir, opts.tile_stride):
        yield from tile_samples(tile, out_dir, objects, DOTA_TILE, opts, rng)


def dota_tiles(directory: Path, out_dir: Path, tile_stride: float | None = None
               ) -> Iterator[tuple[Path, list[tuple[str, tuple[float, ...]]]]]:
    """DOTA scenes cut into DOTA_TILE-pixel PNG tiles under out_dir/tiles: (tile, [(class, pixel box in the
    tile)]) for every tile that holds a whole object."""
    tiles_dir = out_dir / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    for scene in load_dota(directory):
        try:
            with Image.open(scene.image) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as exc:  # not an image (PIL's UnidentifiedImageError), truncated, unreadable
            raise GeoChatError(f"{scene.image} is not a readable image ({exc}); export it again or remove it and "
                               "its label file") from exc
        h, w = rgb.shape[:2]
        stride = round(DOTA_TILE * tile_stride) if tile_stride else DOTA_STRIDE
        for row in _positions(h, DOTA_TILE, stride):
            for col in _positions(w, DOTA_TILE, stride):
                inside = [o for o in scene.objects if o.inside(col, row, DOTA_TILE)]
                if not inside:
                    continue
                tile = tiles_dir / f"dota-{scene.image.stem}-{col}-{row}.png"
                Image.fromarray(_pad(rgb[row : row + DOTA_TILE, col : col + DOTA_TILE], DOTA_TILE)).save(tile)
                yield tile, [(o.label, _shift(o.rotated_box, col, row)) for o in inside]


def _pad(tile: np.ndarray, size: int) -> np.ndarray:
    """Pad a border tile to size×size (black), so the tile's grid is the model's square."""
    if tile.shape[:2] == (size, size):
        return tile
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[: tile.shape[0], : tile.shape[1]] = tile
    return out


def spacenet_samples(raster: Path, geojson: Path, out_dir: Path, opts: BuildOptions) -> Iterator[dict[str, Any]]:
    rng = random.Random(opts.seed + 2)
    for tile, objects in spacenet_tiles(raster, geojson, out_dir, opts.tile_stride):
        yield from tile_samples(tile, out_dir, objects, SPACENET_TILE, opts, rng)


def spacenet_tiles(raster: Path, geojson: Path, out_dir: Path, tile_stride: float | None = None
                   ) -> Iterator[tuple[Path, list[tuple[str, tuple[float, ...]]]]]:
    """A SpaceNet raster cut into SPACENET_TILE-pixel PNG tiles under out_dir/tiles: (tile, [("building",
    pixel box in the tile)]) for every tile that holds a whole footprint."""
    from geochat.imagery import load_image

    loaded = load_image(raster, max_size=100_000)
    rgb = loaded.rgb
    footprints = load_footprints(raster, geojson)
    tiles_dir = out_dir / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    stride = round(SPACENET_TILE * tile_stride) if tile_stride else SPACENET_TILE
    for row in _positions(h, SPACENET_TILE, stride):
        for col in _positions(w, SPACENET_TILE, stride):
            inside = [f for f in footprints
                      if all(col <= x < col + SPACENET_TILE and row <= y < row + SPACENET_TILE for x, y in f.polygon)]
            if not inside:
                continue
            tile = tiles_dir / f"spacenet-{raster.stem}-{col}-{row}.png"
            Image.fromarray(rgb[row : row + SPACENET_TILE, col : col + SPACENET_TILE]).save(tile)
            yield tile, [("building", _shift(f.rotated_box, col, row)) for f in inside]


def build_ground(out: Path, dota: Path | None = None, spacenet: tuple[Path, Path] | None = None,
                 tile_stride: float | None = None) -> dict[str, int]:
    """Write an `eval ground` file from DOTA labels and/or SpaceNet footprints, cut into the tiles that
    build-instruct makes (written beside `out`): one row a tile and class, ``{"image", "phrase" (the
    class, plural, as a refer question names it), "boxes": [[x1, y1, x2, y2, θ], …] (tile pixels)}``, for
    the classes with at most MAX_BOXES objects in the tile, as the refer samples are. Returns row counts
    by source."""
    out_dir = out.parent.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sources: list[tuple[str, Iterator[tuple[Path, list[tuple[str, tuple[float, ...]]]]]]] = []
    if dota is not None:
        sources.append(("dota", dota_tiles(dota, out_dir, tile_stride)))
    if spacenet is not None:
        sources.append(("spacenet", spacenet_tiles(*spacenet, out_dir, tile_stride)))
    rows, counts, written = [], {}, []
    for name, tiles in sources:
        counts[name] = 0
        for tile, objects in tiles:
            written.append(tile)
            by_class: dict[str, list[list[float]]] = defaultdict(list)
            for label, box in objects:
                by_class[label].append([round(v, 2) for v in box])
            for label, boxes in sorted(by_class.items()):
                if len(boxes) <= MAX_BOXES:
                    rows.append({"image": os.path.relpath(tile, out_dir), "phrase": _phrase(label, 2), "boxes": boxes})
                    counts[name] += 1
    if not rows:
        for tile in written:  # nothing refers to them
            tile.unlink(missing_ok=True)
        raise GeoChatError(f"no tile holds a class with at most {MAX_BOXES} whole objects (the most a refer answer "
                           "names), so there is nothing to score; try a smaller --tile-stride, or other scenes")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return counts


def build_instruct(out: Path, rsicd: Path | None = None, dota: Path | None = None,
                   spacenet: tuple[Path, Path] | None = None, opts: BuildOptions = BuildOptions()) -> dict[str, int]:
    """Write the conversation JSON to `out` (tiles beside it); returns sample counts by source."""
    out_dir = out.parent.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    if rsicd is not None:
        all_items = load_rsicd(rsicd)
        labels = sorted({i.label for i in all_items})
        items = [i for i in all_items if i.split == opts.split]
        random.Random(opts.seed).shuffle(items)
        items = items[: opts.limit] if opts.limit else items
        counts["rsicd"] = _extend(samples, rsicd_samples(items, labels, out_dir, opts), opts.kinds)
    if dota is not None:
        counts["dota"] = _extend(samples, dota_samples(dota, out_dir, opts), opts.kinds)
    if spacenet is not None:
        counts["spacenet"] = _extend(samples, spacenet_samples(*spacenet, out_dir, opts), opts.kinds)
    out.write_text(json.dumps(samples, ensure_ascii=False, indent=1), encoding="utf-8")
    return counts


def build_presence_vqa(out: Path, rsicd: Path, split: str = "test", seed: int = 0, limit: int | None = None) -> dict[str, int]:
    """Write an `eval vqa` file of RSICD yes/no presence questions (one an image, as the yesno samples are made)
    to `out`, images relative to it; returns the counts of "yes" and "no" answers.

    A row is ``{"image", "question", "answer": "yes"|"no", "type": "presence (yes)"|"presence (no)"}``. "No"
    means that none of the image's five captions mentions the object, which is weaker evidence than a "yes".
    """
    out_dir = out.parent.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    items = load_rsicd(rsicd, split)
    if not items:
        raise GeoChatError(f"{rsicd} has no images in the split {split!r}")
    rng = random.Random(seed)
    items = rng.sample(items, limit) if limit and limit < len(items) else items
    missing = [item.image for item in items if not item.image.is_file()]
    if missing:  # a question about a missing image would fail only at evaluation time
        raise GeoChatError(f"{len(missing)} of the images the questions would ask about are missing, e.g. {missing[0]}; "
                           f"check {rsicd}/annotations.jsonl against its images/ folder")
    rows, counts = [], {"yes": 0, "no": 0}
    for item in items:
        question = presence_question(item.captions, rng)
        if question is None:
            continue
        answer = question[1].rstrip(".").lower()
        counts[answer] += 1
        rows.append({"image": os.path.relpath(item.image, out_dir), "question": question[0], "answer": answer,
                     "type": f"presence ({answer})"})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return counts


def sample_kind(sample_id: str) -> str:
    """The kind of a sample from its id (`rsicd-00001-brief`, `dota-P1-0-0-refer-ship`, ...)."""
    parts = sample_id.split("-")
    return "refer" if "refer" in parts else parts[-1]


def _extend(samples: list[dict[str, Any]], new: Iterator[dict[str, Any]], kinds: Sequence[str]) -> int:
    before = len(samples)
    samples.extend(s for s in new if sample_kind(s["id"]) in kinds)
    return len(samples) - before
