"""Disk caches of frozen encoders' outputs, so that contrastive epochs cost only the trainable part.

The hybrid tower's EfficientNet stem is frozen, so its patch features of an image never change:
they are computed once, stored as a float16 `.npy` file (memory-mapped on read), and every epoch of
the align stage runs only the transformer blocks and head on them. MiniLM is frozen too, so the
caption embeddings are cached the same way.

A cache file is keyed by what determines its content (the image list or the text list, the image
size, the encoder), hashed into its name; it is written to a temporary file and renamed into place,
so a run killed mid-way never leaves a truncated cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from geochat.model.hybrid_tower import GeoHybridVisionModel
from geochat.model.processor import to_pixel_values

STEM_BATCH = 32
TEXT_BATCH = 256


def content_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (file lists, sizes, encoder names)."""
    blob = json.dumps([str(p) if isinstance(p, Path) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (h, w, 3) uint8 (the training images are plain PNG/JPEG)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _save_atomic(array_path: Path, array: np.ndarray) -> None:
    tmp = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.rename(array_path)


@torch.no_grad()
def cache_stem_features(
    tower: GeoHybridVisionModel,
    images: Sequence[Path],
    cache_dir: Path,
    mean: Sequence[float],
    std: Sequence[float],
    progress: bool = True,
    rotation: int = 0,
) -> np.ndarray:
    """(len(images), N, C) float16 stem features, computed once and memory-mapped afterwards.

    `rotation` k turns every image by k quarter turns first (`torch.rot90` of the pixels: the
    augmentation the align stages draw from). With `trainable_stem_blocks` the features are the
    frozen part's output (the input of the trainable tail).
    """
    size = tower.config.image_size
    tail = tower.config.trainable_stem_blocks
    extra = ([{"trainable_stem_blocks": tail}] if tail else []) + ([{"rotation": rotation % 4}] if rotation % 4 else [])
    key = content_key("stem", tower.config.stem, size, list(mean), list(std), [str(p) for p in images], *extra)
    path = cache_dir / f"stem-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tower.eval()
    out: np.ndarray | None = None
    desc = f"stem features{f' ({rotation % 4 * 90}°)' if rotation % 4 else ''}"
    bar = tqdm(range(0, len(images), STEM_BATCH), desc=desc, disable=not progress, unit="batch")
    for start in bar:
        batch = images[start : start + STEM_BATCH]
        pixels = torch.cat([to_pixel_values(read_rgb(p), size, mean, std) for p in batch])  # (b, 3, S, S)
        feats = tower.stem_features(torch.rot90(pixels, rotation % 4, dims=(2, 3))).numpy()
        if out is None:
            out = np.empty((len(images), *feats.shape[1:]), dtype=np.float16)
        out[start : start + len(batch)] = feats.astype(np.float16)
    if out is None:  # no images
        out = np.empty((0, tower.config.num_patches, tower.config.stem_channels), dtype=np.float16)
    _save_atomic(path, out)
    return np.load(path, mmap_mode="r")


def cache_text_embeddings(texts: Sequence[str], cache_dir: Path, encoder_dir: Path, progress: bool = True) -> np.ndarray:
    """(len(texts), D) float32 L2-normalised sentence embeddings of a frozen sentence-transformers model."""
    key = content_key("text", str(encoder_dir), list(texts))
    path = cache_dir / f"text-{key}.npy"
    if path.is_file():
        return np.load(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from geochat.train.dual_encoder import TextEncoder

    emb = TextEncoder(encoder_dir).encode(list(texts), batch_size=TEXT_BATCH, progress=progress)
    _save_atomic(path, emb)
    return emb
