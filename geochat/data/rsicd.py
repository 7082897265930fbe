"""RSICD: aerial scenes with five human captions and a scene label each.

- Source: Lu, Wang, Zheng, Li, "Exploring Models and Data for Remote Sensing Image Caption
  Generation", IEEE TGRS 56(4), 2018. Research use; cite the paper.
- Sensor: mixed — Google Earth, Baidu Map, MapABC and Tianditu mosaics (aerial/satellite RGB),
  resolutions varying between scenes (roughly 0.5–8 m); no georeferencing.
- Bands: 3 (RGB), 8-bit; images are 224×224 (re-encoded JPEG, quality 85 in `../shared/data`).
- Classes (31): airport, bareland, baseballfield, beach, bridge, center, church, commercial,
  denseresidential, desert, farmland, forest, industrial, meadow, mediumresidential, mountain,
  park, parking, playground, pond, port, railwaystation, resort, river, school, sparseresidential,
  square, stadium, storagetanks, viaduct (plus `playfields` in this release's labels).
- Splits: 8,734 train / 1,093 val / 1,094 test (`split` field of `annotations.jsonl`).
- Format: `annotations.jsonl`, one `{"image", "split", "label", "captions": [5]}` a line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geochat.errors import GeoChatError
from geochat.eval.annotations import read_annotations

ANNOTATIONS = "annotations.jsonl"


@dataclass(frozen=True)
class RsicdItem:
    image: Path
    split: str
    label: str
    captions: tuple[str, ...]


def clean_caption(text: str) -> str:
    """`a plane is parked .` → `A plane is parked.` (RSICD's captions are lower case, space before '.')."""
    text = " ".join(text.replace(" .", ".").replace(" ,", ",").split()).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def load_rsicd(directory: Path, split: str | None = None) -> list[RsicdItem]:
    """Items of `directory/annotations.jsonl` (of one split when given), images as absolute paths."""
    path = directory / ANNOTATIONS
    if not path.is_file():
        raise GeoChatError(f"no RSICD annotations at {path}")
    items = []
    for row in read_annotations(path, split):  # the evaluation's reader: malformed rows are one line each
        if row.label is None:
            raise GeoChatError(f"{path}:{row.line}: an RSICD row needs its scene class as 'label'")
        items.append(RsicdItem(row.image.resolve(), row.split or "", row.label, row.captions))
    return items
