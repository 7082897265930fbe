"""The typed result of one chat turn, shared by the Python API, the CLI, the app and the HTTP API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from geochat.errors import GeoChatError
from geochat.grounding import Box


@dataclass(frozen=True)
class Turn:
    """One earlier exchange, as the model saw it: the built user message and the raw model output.

    Passing turns back verbatim (from `Answer.as_turn()`) lets the engine reuse the KV cache of the
    whole conversation so far instead of recomputing it.
    """

    user: str
    assistant: str

    @classmethod
    def of(cls, turn: Turn | tuple[str, str] | list[str]) -> Turn:
        """A history entry: a `Turn`, or a (question, answer) pair of strings."""
        if isinstance(turn, Turn):
            return turn
        if isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(x, str) for x in turn):
            return cls(*turn)
        raise GeoChatError(f"each history entry is a Turn or a (question, answer) pair of strings, got {turn!r:.80}")


@dataclass(frozen=True)
class BoxResult:
    phrase: str | None
    pixel: tuple[float, float, float, float, float]  # x1, y1, x2, y2 in original raster pixels, θ in degrees
    polygon_lonlat: list[tuple[float, float]] | None  # closed ring, EPSG:4326; None without georeferencing

    def pixel_polygon(self) -> list[tuple[float, float]]:
        """The box's (rotated) corners in original raster pixels."""
        return Box(*self.pixel).corners()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vision: str
    llm: str


@dataclass(frozen=True)
class Timings:
    encode_s: float
    ttft_s: float
    total_s: float


@dataclass(frozen=True)
class Answer:
    answer: str
    reasoning: str | None
    task: str
    boxes: list[BoxResult]
    geojson: dict[str, Any] | None
    facts: dict[str, Any]
    sources: list[dict[str, Any]]
    model: ModelInfo
    timings: Timings
    prompt: str = field(default="", repr=False)  # the user message as built (task token, facts, passages)
    raw: str = field(default="", repr=False)  # the model's output before parsing
    cut_short: bool = field(default=False, repr=False)  # generation stopped at max_new_tokens, not at its end

    def as_turn(self) -> Turn:
        """This exchange as the model saw it, for `history=[...]` of the next question (its KV cache is reused)."""
        return Turn(user=self.prompt, assistant=self.raw)

    def to_json(self) -> dict[str, Any]:
        """The CLI/API JSON contract (without the internal prompt/raw/cut_short fields)."""
        data = asdict(self)
        data.pop("prompt")
        data.pop("raw")
        data.pop("cut_short")
        data["boxes"] = [
            {
                "phrase": b.phrase,
                "pixel": list(b.pixel),
                "polygon_lonlat": [list(p) for p in b.polygon_lonlat] if b.polygon_lonlat is not None else None,
            }
            for b in self.boxes
        ]
        return data
