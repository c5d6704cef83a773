"""Training and evaluation of the VQ image tokenizer (the model itself is in `tokenizer/image.py`)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.tokenizer.image import (PRESETS, TRAIN_LOG_FILE, VQVAE, ImageTokenizer, VQConfig, atomic_write, check_frames,
                             frames_to_tensor)




def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_image_tokenizer(frames: np.ndarray, out_dir: str | os.PathLike, preset: str | VQConfig = "tiny",
                          steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                          device: str | None = None, log: Callable[[str], None] | None = print,
                          restart_every: int = 10, restart_min_usage: float = 1.0,
                          ae_warmup: float = 0.3) -> ImageTokenizer:
    """Train a VQ-VAE on uint8 frames [N, S, S, 3] (already at the preset's image_size) and save it.

    Writes out_dir/config.json, out_dir/weights.pt and out_dir/train_log.json (loss curve, codebook
    usage, restarts, seconds).

    The first `ae_warmup` fraction of the steps trains a plain autoencoder (no quantisation), then the
    codebook starts on k-means centroids of the encodings: quantising from step 0 collapsed onto a few
    codes that carried brightness but no colour (measured: ~20 dB, every shape decoded grey-pink).
    Loss: MSE reconstruction in [-1, 1] + beta * commitment; the codebook
    follows an EMA of its assigned encoder outputs; every `restart_every` steps, codes assigned fewer than
    `restart_min_usage` times since the previous check are moved onto random encoder outputs of the
    current batch (not in the last 10% of steps, so the final codebook is settled).
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    cfg.validate()
    frames = check_frames(frames, cfg)
    if frames.shape[1] != cfg.image_size or frames.shape[2] != cfg.image_size:
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the preset wants "
                         f"{cfg.image_size}x{cfg.image_size} (resize and center-crop first)")
    if len(frames) == 0:
        raise ValueError("no frames to train on")
    device = torch.device(device or default_device())
    log = log or (lambda msg: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQVAE(cfg).to(device).train()
    opt = torch.optim.Adam(list(model.encoder.parameters()) + list(model.decoder.parameters()), lr=lr)
    warmup = max(1, min(20, steps // 10))
    ae_steps = int(steps * ae_warmup)

    def lr_at(step):  # short linear warmup, then cosine to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    history = []
    restarts_total = 0
    t0 = time.time()
    for step in range(steps):
        batch = frames[rng.integers(0, len(frames), size=min(batch_size, len(frames)))]
        x = frames_to_tensor(batch, device)
        if step == ae_steps:  # end of the autoencoder warm-up: codebook = k-means of current encodings
            with torch.no_grad():
                pool = frames[rng.integers(0, len(frames), size=min(len(frames), max(8 * batch_size, 256)))]
                z_pool = torch.cat([model.encoder(frames_to_tensor(pool[i:i + 256], device))
                                    for i in range(0, len(pool), 256)])                    # (P, D, h, w)
                flat = z_pool.permute(0, 2, 3, 1).reshape(-1, cfg.code_dim)
                model.quantizer.init_kmeans(model.quantizer.prepare(flat))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        z = model.encoder(x)
        q, idx, commit = model.quantizer(z, quantize=step >= ae_steps)
        recon = model.decoder(q)
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        restarted = 0
        if restart_every and step > ae_steps and (step + 1) % restart_every == 0 and step + 1 < steps * 0.9:
            flat = model.quantizer.prepare(z.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim))
            restarted = model.quantizer.restart_dead(flat, restart_min_usage)
            restarts_total += restarted
        if step % 25 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4.0 / max(rec_loss.item(), 1e-10))  # range [-1, 1] has peak-to-peak 2
            used = int(torch.unique(idx).numel())
            history.append({"step": step, "loss": round(loss.item(), 6), "recon_mse": round(rec_loss.item(), 6),
                            "psnr": round(psnr, 2), "batch_codes_used": used, "restarted": restarted,
                            "seconds": round(time.time() - t0, 2)})
            log(f"vq step {step:5d}/{steps} loss {loss.item():.4f} psnr {psnr:5.2f} dB "
                f"codes in batch {used}/{cfg.codebook_size} ({time.time() - t0:.1f}s)")
    seconds = time.time() - t0
    tok = ImageTokenizer(cfg, model.eval(), device=device)
    out_dir = Path(out_dir)
    tok.save(out_dir)
    train_log = {"config": asdict(cfg), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                 "device": str(device), "frames": int(len(frames)), "seconds": round(seconds, 2),
                 "restarts": restarts_total, "tokenizer_id": tok.tokenizer_id, "history": history}
    atomic_write(out_dir / TRAIN_LOG_FILE, json.dumps(train_log, indent=2).encode("utf-8"))
    return tok


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays of the same shape (over all pixels together)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def codebook_stats(codes: np.ndarray, codebook_size: int) -> dict:
    """Fraction of the codebook used and perplexity (exp of the code-distribution entropy)."""
    counts = np.bincount(np.asarray(codes).ravel().astype(np.int64), minlength=codebook_size)
    p = counts / max(1, counts.sum())
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum())) if len(nz) else 0.0}


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


def evaluate_image_tokenizer(tok: ImageTokenizer, frames: np.ndarray, out_dir: str | os.PathLike,
                             sheet_frames: int = 8) -> dict:
    """PSNR, codebook usage and a round-trip contact sheet (originals above reconstructions).

    Writes out_dir/metrics.json and out_dir/roundtrip.png; returns the metrics.
    """
    frames = check_frames(frames, tok.config)
    t0 = time.time()
    codes = tok.encode(frames)
    recon = tok.decode(codes)
    per_frame = [psnr(a, b) for a, b in zip(frames, recon)]
    finite = [p for p in per_frame if math.isfinite(p)]
    metrics = {"tokenizer_id": tok.tokenizer_id, "frames": int(len(frames)), "psnr": psnr(frames, recon),
               "psnr_mean_per_frame": float(np.mean(finite)) if finite else float("inf"),
               "psnr_min_frame": float(np.min(per_frame)) if per_frame else float("nan"),
               **codebook_stats(codes, tok.codebook_size), "codebook_size": tok.codebook_size,
               "tokens_hw": list(codes.shape[1:]), "seconds": round(time.time() - t0, 3)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = np.linspace(0, len(frames) - 1, num=min(sheet_frames, len(frames))).round().astype(int)
    write_png(out_dir / "roundtrip.png", contact_sheet([frames[idx], recon[idx]]))
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode("utf-8"))
    return metrics
