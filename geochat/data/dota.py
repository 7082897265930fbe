"""DOTA: large aerial images with oriented (quadrilateral) object boxes.

- Source: Xia et al., "DOTA: A Large-scale Dataset for Object Detection in Aerial Images", CVPR
  2018. Academic use only (DOTA terms).
- Sensor: Google Earth mosaics, plus GF-2 and JL-1 satellite scenes in the full data set; the
  `imagesource` and `gsd` (metres) header lines of each label file record which.
- Bands: 3 (RGB), 8-bit PNG; images 800–4,000 px a side (too large for the model: tiled here).
- Classes (DOTA v1.0, 15): plane, ship, storage-tank, baseball-diamond, tennis-court,
  basketball-court, ground-track-field, harbor, bridge, large-vehicle, small-vehicle, helicopter,
  roundabout, soccer-ball-field, swimming-pool.
- Splits: train/val/test in the full release; `../shared/data/dota` holds two images (P0706,
  P1888), used here for grounding examples only.
- Format: `labels/NAME.txt`, after two header lines one object a line:
  `x1 y1 x2 y2 x3 y3 x4 y4 class difficulty` (pixels, corners in order around the object).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geochat.box_geometry import polygon_to_rotated_box
from geochat.errors import GeoChatError

Point = tuple[float, float]


@dataclass(frozen=True)
class DotaObject:
    label: str
    corners: tuple[Point, Point, Point, Point]
    difficult: bool

    @property
    def rotated_box(self) -> tuple[float, float, float, float, float]:
        """(x1, y1, x2, y2, θ) in pixels, θ by the project's convention (`geochat.grounding`)."""
        return polygon_to_rotated_box(self.corners)

    def inside(self, col: int, row: int, size: int) -> bool:
        return all(col <= x < col + size and row <= y < row + size for x, y in self.corners)


@dataclass(frozen=True)
class DotaImage:
    image: Path
    gsd_m: float | None
    objects: tuple[DotaObject, ...]


def read_label_file(path: Path) -> tuple[float | None, list[DotaObject]]:
    gsd = None
    objects = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if line.startswith("gsd:"):
            value = line.split(":", 1)[1].strip()
            gsd = float(value) if value not in ("", "null", "None") else None
        if len(parts) < 9 or ":" in line:
            continue
        try:
            xy = [float(v) for v in parts[:8]]
        except ValueError as exc:
            raise GeoChatError(f"{path}: cannot read DOTA line {line!r}") from exc
        corners = ((xy[0], xy[1]), (xy[2], xy[3]), (xy[4], xy[5]), (xy[6], xy[7]))
        objects.append(DotaObject(parts[8], corners, len(parts) > 9 and parts[9] == "1"))
    return gsd, objects


def load_dota(directory: Path) -> list[DotaImage]:
    """Every `images/NAME.png` with its `labels/NAME.txt`."""
    labels = sorted((directory / "labels").glob("*.txt"))
    if not labels:
        raise GeoChatError(f"no DOTA label files under {directory / 'labels'}")
    out = []
    for label_file in labels:
        image = directory / "images" / f"{label_file.stem}.png"
        if not image.is_file():
            raise GeoChatError(f"{label_file} has no image {image}")
        gsd, objects = read_label_file(label_file)
        out.append(DotaImage(image.resolve(), gsd, tuple(objects)))
    return out
