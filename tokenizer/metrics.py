"""Picture-quality figures for the image tokenizer's round trip: PSNR and SSIM over uint8 frames.

The build calls `psnr(frames, tokenizer.decode(tokenizer.encode(frames)))` on a few samples per shard, so
that a bad tokenizer shows up in the first shard's stats; `clipforge tokenizer eval-image` reports both.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays of the same shape (one MSE over all pixels together, so a
    batch of frames gives one figure; identical inputs give inf)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("psnr: empty input")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, per_frame: bool = False):
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, peak 255) between uint8
    frames [N, H, W, 3] (or one [H, W, 3]), per colour channel, averaged over the valid window positions
    and channels; the mean over frames, or one value per frame with `per_frame`.

    Frames smaller than the window use a window of the frame's size, so tiny test frames still work."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[-1] != 3 or len(a) == 0:
        raise ValueError(f"ssim: frames must be [N, H, W, 3], got {a.shape}")
    n, h, w, c = a.shape
    size = min(11, h, w)
    g = _gaussian(size)
    win_h = g.view(1, 1, size, 1).repeat(c, 1, 1, 1)      # separable: a vertical then a horizontal pass
    win_w = g.view(1, 1, 1, size).repeat(c, 1, 1, 1)

    def blur(x):  # (n, c, H, W) -> (n, c, H-size+1, W-size+1), each channel on its own
        return F.conv2d(F.conv2d(x, win_h, groups=c), win_w, groups=c)

    out = []
    for i in range(0, n, 64):  # chunks bound the memory for 160x160 frames
        x = torch.from_numpy(a[i:i + 64]).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(b[i:i + 64]).permute(0, 3, 1, 2).double()
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out.append(m.mean(dim=(1, 2, 3)))
    values = torch.cat(out).numpy()
    return values.astype(float) if per_frame else float(values.mean())
