"""Image grids: the one picture format genflow shows people (MLflow artifacts, `genflow sample`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """uint8 [N, 3, H, W] -> one RGB picture, `columns` wide (default: as square as possible)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid wants uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    n, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    for index in range(n):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[index]
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns).save(path)
    return path
