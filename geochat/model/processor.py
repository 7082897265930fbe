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


def to_pixel_values(
    rgb: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(h, w, 3) uint8 → (1, 3, image_size, image_size) float32, normalised."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    square, _ = pad_to_square(rgb)
    resized = Image.fromarray(square).resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)
