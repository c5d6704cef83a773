"""Pictures of frames for people to look at: contact sheets of uint8 frames, written as PNG files
(the tokenizer's round-trip sheet, the clip sampler's and the synthetic-data evaluation's sheets)."""
from __future__ import annotations

import os

import numpy as np


def contact_sheet(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack equally long rows of uint8 frames [n, H, W, 3] into one image, `pad` px apart."""
    n, h, w, _ = rows[0].shape
    sheet = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y:y + h, x:x + w] = img
    return sheet


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    from PIL import Image  # Pillow comes with matplotlib, a dependency
    Image.fromarray(image).save(path)
