"""Run artifacts: image grids written as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_grid(path: Path, columns: list[torch.Tensor], titles: list[str], cell: int = 96) -> None:
    """One column per tensor (each float [B, C, H, W] in [0, 1]), one row per image, with a title row.

    Images are upscaled (nearest) to ``cell`` pixels so small inputs stay visible.
    """
    rows = columns[0].shape[0]
    pad, title_h = 4, 16
    width = len(columns) * (cell + pad) + pad
    height = title_h + rows * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (images, title) in enumerate(zip(columns, titles, strict=True)):
        x0 = pad + c * (cell + pad)
        draw.text((x0, 2), title, fill=(0, 0, 0))
        for r in range(rows):
            img = images[r].detach().float().clamp(0, 1)
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
            tile = tile.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (x0, title_h + pad + r * (cell + pad)))
    canvas.save(path)
