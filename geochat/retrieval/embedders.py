"""Image embedders for the archive index: what turns an image (and, where it has one, a text) into the vector
a collection stores. One collection never mixes two: it records the embedder's name and the digest of its
trained weights (`check_weights`).

- `efficientnet-lite0-stem-mean` (default until the dual encoder is trained): the frozen ImageNet
  EfficientNet-Lite0 stem of `GeoHybridVisionModel`, its 7×7×1280 feature map mean-pooled to 1280-d.
  The tower's transformer blocks and head are random before training, so the stem is the part
  that carries scene similarity (a linear probe on it reaches 0.76 on 31 RSICD classes). It has no
  text side: text→image search then goes through the captions' MiniLM embeddings.
- `tower:DIR`: the trained dual encoder's tower saved under DIR/vision/ (`geochat.train.dual_encoder`),
  its `pooler_output` (384-d) aligned with MiniLM; it has a text side (MiniLM itself, and the query
  expansion of DIR/query_bank.safetensors where its training stage wrote one, whose hubness correction
  `text_offsets` gives). Used by default (`auto`) once `adapters/geochat-mini/` ships one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from geochat.errors import GeoChatError
from geochat.model.weights import TRAINED_DEFAULT_DIR
from geochat.retrieval.store import MixedEmbedderError
from geochat.retrieval.text import TextEmbedder

if TYPE_CHECKING:  # torch is imported lazily: the docs-only paths never load it
    from geochat.train.dual_encoder import QueryBank, TextHead

EMBED_SIZE = 224
STEM_EMBEDDER = "efficientnet-lite0-stem-mean"
WEIGHTS_KEY = "geochat_weights"  # collection metadata: the embedder's `weights` digest
TOWER_PREFIX = "tower:"


class ImageEmbedder(Protocol):
    name: str
    dim: int
    has_text_side: bool
    weights: str  # a digest of trained weights that `name` does not pin down ("" when none)

    def embed_images(self, rgbs: Sequence[np.ndarray]) -> np.ndarray: ...  # (n, dim), unit length

    def embed_text(self, text: str) -> np.ndarray: ...  # (dim,), only where has_text_side

    @property
    def text_offsets(self) -> Callable[[np.ndarray], np.ndarray] | None: ...  # (n, dim) → (n,) off text scores


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _pixels(rgbs: Sequence[np.ndarray], size: int = EMBED_SIZE) -> Any:
    import torch

    from geochat.model.hybrid_tower import IMAGE_MEAN, IMAGE_STD
    from geochat.model.processor import to_pixel_values

    return torch.cat([to_pixel_values(rgb, size, IMAGE_MEAN, IMAGE_STD) for rgb in rgbs])  # (B, 3, S, S)


class StemEmbedder:
    """Mean-pooled ImageNet EfficientNet-Lite0 stem features (1280-d); no text side."""

    name = STEM_EMBEDDER
    dim = 1280
    has_text_side = False
    weights = ""  # the shipped package's ImageNet weights

    @cached_property
    def tower(self) -> Any:
        from transformers import AutoModel

        from geochat.model.hybrid_tower import GeoHybridVisionConfig

        tower = AutoModel.from_config(GeoHybridVisionConfig())
        tower.load_stem_weights()
        return tower.eval()

    def embed_images(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            feats = self.tower.stem_features(_pixels(rgbs)).mean(dim=1)  # (B, N, 1280) → (B, 1280)
        return unit_rows(feats.float().numpy())

    def embed_text(self, text: str) -> np.ndarray:
        raise GeoChatError(f"the {self.name} image embedder has no text side; search the captions instead")

    text_offsets = None  # no text side, nothing to correct


class TowerEmbedder:
    """A trained dual-encoder tower: `pooler_output` (B, 384), aligned with MiniLM's text space.

    `directory` holds `vision/` as the align stage writes it (an align output or an assistant
    directory); `geochat.train.dual_encoder.load_tower` reads it and adds the shipped stem. The name
    records DIR exactly, so a collection is always queried with the tower that built it; `auto` picks
    the default model's search tower (`retrieval/`, the recipe's retrieval stage) when it has one.
    """

    has_text_side = True

    def __init__(self, directory: Path) -> None:
        from geochat.model.hybrid_tower import GeoHybridVisionConfig

        vision = directory / "vision"
        if not (vision / "config.json").is_file():
            raise GeoChatError(f"no trained vision tower in {directory} ({vision}/config.json missing)")
        self.directory = directory
        self.name = tower_name(directory)
        from geochat.train.dual_encoder import tower_weights

        weights = tower_weights(directory)  # a retrained tower in the same directory has another digest
        self.weights = file_digest(weights)[:16] if weights.is_file() else ""
        self.dim = int(GeoHybridVisionConfig.from_pretrained(vision).projection_dim)
        self._text = TextEmbedder()
        if self.dim != self._text.dim:
            raise GeoChatError(f"the tower in {directory} projects to {self.dim}-d, MiniLM gives {self._text.dim}-d")

    @cached_property
    def tower(self) -> Any:
        from geochat.train.dual_encoder import load_tower

        return load_tower(self.directory)

    @cached_property
    def bank(self) -> QueryBank | None:
        from geochat.train.dual_encoder import load_query_bank

        return load_query_bank(self.directory)

    def embed_images(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        from geochat.train.dual_encoder import tower_embedding

        return tower_embedding(self.tower, _pixels(rgbs, self.tower.config.image_size))  # (B, 384), unit

    @cached_property
    def text_head(self) -> TextHead | None:
        from geochat.train.dual_encoder import load_text_head

        return load_text_head(self.directory)

    def embed_text(self, text: str) -> np.ndarray:
        from geochat.train.dual_encoder import search_queries

        own = self._search_text
        emb = own.encode([text]) if own is not None else self._text.embed_query(text)[None]
        return search_queries(emb, self.text_head, self.bank)[0]

    @cached_property
    def _search_text(self) -> Any:
        from geochat.train.dual_encoder import search_encoder

        return search_encoder(self.text_head)

    @property
    def text_offsets(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The query bank's hubness correction of image embeddings, where the bank has one."""
        return self.bank.image_offsets if self.bank is not None and self.bank.hub_weight else None


def image_embedder_from_name(name: str) -> ImageEmbedder:
    """The embedder a collection records, or one a user names: `stem`, `tower:DIR`, `auto`."""
    if name in ("stem", STEM_EMBEDDER):
        return StemEmbedder()
    if name.startswith(TOWER_PREFIX):
        return TowerEmbedder(Path(name[len(TOWER_PREFIX):]))
    if name == "auto":
        return image_embedder_from_name(auto_embedder_name())
    raise GeoChatError(f"unknown image embedder {name!r}: use 'auto', 'stem' or 'tower:DIR'")


def auto_embedder_name() -> str:
    """What `auto` means today: the default model's search tower, else the bare stem."""
    from geochat.train.dual_encoder import search_tower_dir, tower_weights

    directory = search_tower_dir(TRAINED_DEFAULT_DIR)
    return tower_name(directory) if tower_weights(directory).is_file() else STEM_EMBEDDER


def tower_name(directory: Path) -> str:
    """The name a collection records for the tower in `directory` (exact: the resolved path)."""
    return f"{TOWER_PREFIX}{directory.resolve()}"


def check_weights(collection: Any, embedder: ImageEmbedder) -> None:
    """Refuse a collection whose recorded tower weights are not `embedder`'s (retrained since indexing)."""
    recorded = (collection.metadata or {}).get(WEIGHTS_KEY)
    if recorded and recorded != embedder.weights:
        raise MixedEmbedderError(
            f"the images in this index were embedded by {embedder.name} with other weights (recorded {recorded}, "
            f"now {embedder.weights or 'none'}): the tower was retrained or replaced since; re-embed them with "
            "`geochat index images DIR --rebuild`"
        )


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
