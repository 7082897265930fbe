"""Turn an RGB view into the tower's `pixel_values`: centre-pad to square, resize, normalise.

LLaVA-1.5 and GeoChat pad to a square before resizing ("expand2square") so that objects keep their
aspect ratio; boxes the model emits are therefore on the padded square's grid and must be mapped
back (see `geochat.grounding.grid_to_pixel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from geochat.imagery import pad_to_square


def square_resized(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """(h, w, 3) uint8 → (image_size, image_size, 3) uint8: padded to a square, then resized (bicubic)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    square, _ = pad_to_square(rgb)
    return np.array(Image.fromarray(square).resize((image_size, image_size), Image.Resampling.BICUBIC))  # writable


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, S, S) values in [0, 1] → the tower's input scale."""
    shape = (1, 3, 1, 1)
    return (pixels - torch.tensor(mean, device=pixels.device).view(shape)) / torch.tensor(std, device=pixels.device).view(shape)


def unit_scale(images: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 → (B, 3, S, S) float32 in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255.0


def to_pixel_values(
    rgb: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(h, w, 3) uint8 → (1, 3, image_size, image_size) float32, normalised."""
    return normalise(unit_scale(torch.from_numpy(square_resized(rgb, image_size))[None]), mean, std)
