"""Training and evaluation of the VQ image tokenizer (the network is in `tokenizer/vq.py`, the tokenizer that
wraps it in `tokenizer/image.py`, PSNR and SSIM in `tokenizer/metrics.py`)."""
from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.atomic import atomic_write
from clipforge.pipeline.video.pictures import contact_sheet, write_png
from clipforge.tokenizer.image import TRAIN_LOG_FILE, ImageTokenizer, check_frames, default_device, frames_to_tensor
from clipforge.tokenizer.metrics import psnr, ssim
from clipforge.tokenizer.vq import PRESETS, VQVAE, VQConfig

STATE_FILE = "train_state.pt"   # what a resumed run needs beyond weights.pt: optimizer, step, RNG


AUGMENTS = {"hflip", "channels"}


def augment(batch: np.ndarray, augments: list[str], rng: np.random.Generator) -> np.ndarray:
    """uint8 (B, S, S, 3) -> the same frames mirrored left-right (half of them, `hflip`) and with their
    colour channels permuted (`channels`, one permutation per frame).

    Why channels: a small corpus shows each shape in few colours on few backgrounds, and the codebook
    then fits those pairs; frames of unseen pairs decoded ~2 dB worse than training frames. Permuting
    R, G, B gives every edge in six colour pairs at no cost (docs/tokenizer.md). For natural frames
    (the cogview2 preset) it makes unnatural colours, so there only mirroring is on."""
    if not augments:
        return batch
    batch = batch.copy()
    if "hflip" in augments:
        flip = rng.random(len(batch)) < 0.5
        batch[flip] = batch[flip, :, ::-1]
    if "channels" in augments:
        perm = rng.permuted(np.tile(np.arange(3), (len(batch), 1)), axis=1)          # (B, 3)
        batch = np.take_along_axis(batch, perm[:, None, None, :], axis=3)
    return batch


def learning_rate(step: int, steps: int, lr: float, switch_step: int, switch_warmup: float = 0.05) -> float:
    """The tokenizer's schedule: a short linear warmup (a tenth of the steps, at most 20), a cosine down to
    10% of `lr`, and a second linear warmup over `switch_warmup` of the steps from `switch_step`, where
    quantisation starts. Why the second: the decoder then meets quantised inputs for the first time, and
    at the full rate a run of 1,600 steps blew up there (loss 0.005 -> 1.3, 6 dB) and never fully
    recovered; with it the same run trained through the switch (docs/tokenizer.md)."""
    warmup = max(1, min(20, steps // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    cosine = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    rewarm = max(1, int(steps * switch_warmup))
    if switch_step <= step < switch_step + rewarm:
        return cosine * (step - switch_step + 1) / rewarm
    return cosine


def train_image_tokenizer(frames: np.ndarray, out_dir: str | os.PathLike, preset: str | VQConfig = "tiny",
                          steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                          seed: int = 0, device: str | None = None, log: Callable[[str], None] | None = print,
                          restart_every: int = 10, restart_min_usage: float = 1.0,
                          ae_warmup: float = 0.3, switch_warmup: float = 0.05, max_minutes: float | None = None,
                          resume: bool = False,
                          stop_at: int | None = None, checkpoint_minutes: float = 5.0,
                          amp: bool | None = None) -> ImageTokenizer:
    """Train a VQ-VAE on uint8 frames [N, S, S, 3] (already at the preset's image_size) and save it.

    Writes out_dir/config.json, out_dir/weights.pt, out_dir/train_log.json (loss curve, codebook usage,
    restarts, seconds) and out_dir/train_state.pt (optimizer, step, RNG: what `resume` needs).

    steps, batch_size and lr default to the preset's `train_steps`, `train_batch` and `train_lr`.
    `max_minutes` bounds this invocation's wall time: the run stops after the step that crosses it,
    saves everything, and `resume=True` later continues from out_dir/train_state.pt to `steps`, with
    the same batches and learning-rate schedule an uninterrupted run would have had (batches are drawn
    from an RNG seeded by (seed, step); the torch RNG state is saved). `stop_at` stops after that global
    step, the same way. State is also saved every `checkpoint_minutes`, so a killed run loses little. `amp`
    (default: on CUDA only) runs the convolutions in bf16 autocast; weights, optimizer and codebook stay float32.

    The first `ae_warmup` fraction of the steps trains a plain autoencoder (no quantisation), then the
    codebook starts on k-means centroids of the encodings: quantising from step 0 collapsed onto a few
    codes that carried brightness but no colour (measured: ~20 dB, every shape decoded grey-pink). The
    learning rate warms up again over `switch_warmup` of the steps after that switch (`learning_rate`).
    Loss: MSE reconstruction in [-1, 1] + beta * commitment; the codebook follows an EMA of its assigned
    encoder outputs; every `restart_every` steps, codes assigned fewer than `restart_min_usage` times
    since the previous check are moved onto encoder outputs of the current batch (not in the last 10% of
    steps, so the final codebook is settled).
    """
    cfg, frames, augments = _training_inputs(frames, preset)
    steps = cfg.train_steps if steps is None else steps
    if steps < 1:
        raise ClipforgeError(f"steps must be at least 1, got {steps}")
    device = torch.device(device or default_device())
    settings = _TrainSettings(
        steps=steps, batch_size=cfg.train_batch if batch_size is None else batch_size,
        lr=cfg.train_lr if lr is None else lr, seed=seed, amp=device.type == "cuda" if amp is None else bool(amp),
        augments=augments, ae_steps=int(steps * ae_warmup), switch_warmup=switch_warmup,
        restart_every=restart_every, restart_min_usage=restart_min_usage, max_minutes=max_minutes,
        stop_at=stop_at, checkpoint_minutes=checkpoint_minutes)
    run = _TrainingRun(cfg, settings, frames, Path(out_dir), device, log or (lambda msg: None))
    if resume and (run.out_dir / STATE_FILE).exists():
        run.load_state()
    run.out_dir.mkdir(parents=True, exist_ok=True)
    return run.train()


def _training_inputs(frames: np.ndarray, preset: str | VQConfig) -> tuple[VQConfig, np.ndarray, list[str]]:
    """The preset's config, the frames and the augmentations, checked against each other."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ClipforgeError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    cfg.validate()
    augments = [a for a in cfg.train_augment.split(",") if a]
    if set(augments) - AUGMENTS:
        raise ClipforgeError(f"unknown train_augment {sorted(set(augments) - AUGMENTS)}; known: {sorted(AUGMENTS)}")
    frames = check_frames(frames, cfg.downsample)
    if frames.shape[1] != cfg.image_size or frames.shape[2] != cfg.image_size:
        raise ClipforgeError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the preset wants "
                             f"{cfg.image_size}x{cfg.image_size} (resize and center-crop first)")
    if len(frames) == 0:
        raise ClipforgeError("no frames to train on")
    return cfg, frames, augments


@dataclass(frozen=True)
class _TrainSettings:
    """One run's settings besides the network's config (see `train_image_tokenizer`)."""
    steps: int
    batch_size: int
    lr: float
    seed: int
    amp: bool
    augments: list[str]
    ae_steps: int                 # steps of plain autoencoder before quantisation starts
    switch_warmup: float
    restart_every: int
    restart_min_usage: float
    max_minutes: float | None
    stop_at: int | None
    checkpoint_minutes: float


class _TrainingRun:
    """A training run's state (network, optimizer, loss history, restarts, where it resumes) and the
    files it writes to `out_dir`."""

    def __init__(self, cfg: VQConfig, settings: _TrainSettings, frames: np.ndarray, out_dir: Path,
                 device: torch.device, log: Callable[[str], None]):
        self.cfg, self.settings, self.frames, self.out_dir, self.device, self.log = \
            cfg, settings, frames, out_dir, device, log
        torch.manual_seed(settings.seed)
        self.model = VQVAE(cfg).to(device).train()
        self.opt = torch.optim.Adam(list(self.model.encoder.parameters()) + list(self.model.decoder.parameters()),
                                    lr=settings.lr)
        self.history: list[dict] = []
        self.restarts_total, self.first_step, self.seconds_before = 0, 0, 0.0

    def load_state(self) -> None:
        """Continue from out_dir/train_state.pt, which must come from a run with the same settings."""
        s = self.settings
        state = torch.load(self.out_dir / STATE_FILE, map_location="cpu", weights_only=True)
        saved_cfg = VQConfig(**state["config"])
        if saved_cfg != self.cfg or state["steps"] != s.steps or state["seed"] != s.seed:
            raise ClipforgeError(f"{self.out_dir / STATE_FILE}: saved for another run (config, steps or seed "
                                 f"differ); use a fresh --out or the same settings")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.model.quantizer.usage.copy_(state["usage"])
        self.first_step, self.restarts_total = int(state["step"]), int(state["restarts"])
        self.seconds_before, self.history = float(state["seconds"]), list(state["history"])
        self.log(f"vq: resuming {self.out_dir} at step {self.first_step}/{s.steps}")

    def train(self) -> ImageTokenizer:
        """Train from `first_step` to the end, the time budget or `stop_at`; save and return the tokenizer."""
        s, t0 = self.settings, time.time()
        last_save = t0
        step = self.first_step
        while step < s.steps:
            rng = np.random.default_rng([s.seed, step])   # batches depend on (seed, step) only: resumable
            picked = self.frames[rng.integers(0, len(self.frames), size=min(s.batch_size, len(self.frames)))]
            x = frames_to_tensor(augment(picked, s.augments, rng), self.device)
            if step == s.ae_steps:
                self.init_codebook(rng)
            for group in self.opt.param_groups:
                group["lr"] = learning_rate(step, s.steps, s.lr, s.ae_steps, s.switch_warmup)
            z, idx, loss, rec_loss = self.optimise(x, quantize=step >= s.ae_steps)
            restarted = 0
            if s.restart_every and step > s.ae_steps and (step + 1) % s.restart_every == 0 and step + 1 < s.steps * 0.9:
                restarted = self.restart_dead_codes(z)
            elapsed = self.seconds_before + time.time() - t0
            if step % 25 == 0 or step == s.steps - 1:
                self.record(step, loss, rec_loss, idx, restarted, elapsed)
            step += 1
            out_of_time = s.max_minutes is not None and time.time() - t0 >= 60 * s.max_minutes
            if step < s.steps and (out_of_time or (s.stop_at is not None and step >= s.stop_at)):
                self.log(f"vq: stopping at step {step}/{s.steps} ({'time budget' if out_of_time else 'stop_at'}); "
                         f"rerun with resume to continue")
                break
            if step < s.steps and time.time() - last_save >= 60 * s.checkpoint_minutes:
                self.save(step, elapsed)
                last_save = time.time()
        self.model.eval()
        return self.save(step, self.seconds_before + time.time() - t0)

    @torch.no_grad()
    def init_codebook(self, rng: np.random.Generator) -> None:
        """End of the autoencoder warm-up: the codebook starts on k-means centroids of current encodings."""
        frames, batch_size = self.frames, self.settings.batch_size
        pool = frames[rng.integers(0, len(frames), size=min(len(frames), max(8 * batch_size, 256)))]
        z_pool = torch.cat([self.model.encoder(frames_to_tensor(pool[i:i + 256], self.device))
                            for i in range(0, len(pool), 256)])                    # (P, D, h, w)
        flat = z_pool.permute(0, 2, 3, 1).reshape(-1, self.cfg.code_dim)
        self.model.quantizer.init_kmeans(self.model.quantizer.prepare(flat))

    def optimise(self, x: torch.Tensor, quantize: bool):
        """One optimizer step on batch `x`; returns the encodings, code ids, loss and reconstruction loss."""
        amp, model = self.settings.amp, self.model
        # convolutions in bf16 under `amp`; the quantiser (EMA statistics, nearest codes) and the loss in float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            z = model.encoder(x)
        q, idx, commit = model.quantizer(z.float(), quantize=quantize)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            recon = model.decoder(q)
        rec_loss = F.mse_loss(recon.float(), x)
        loss = rec_loss + commit
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        return z, idx, loss, rec_loss

    def restart_dead_codes(self, z: torch.Tensor) -> int:
        flat = self.model.quantizer.prepare(z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.cfg.code_dim))
        restarted = self.model.quantizer.restart_dead(flat, self.settings.restart_min_usage)
        self.restarts_total += restarted
        return restarted

    def record(self, step: int, loss, rec_loss, idx, restarted: int, elapsed: float) -> None:
        """One point of the loss curve in the history, and a log line."""
        train_psnr = 10 * math.log10(4.0 / max(rec_loss.item(), 1e-10))  # range [-1, 1]: peak-to-peak 2
        used = int(torch.unique(idx).numel())
        self.history.append({"step": step, "loss": round(loss.item(), 6), "recon_mse": round(rec_loss.item(), 6),
                             "psnr": round(train_psnr, 2), "batch_codes_used": used, "restarted": restarted,
                             "seconds": round(elapsed, 2)})
        self.log(f"vq step {step:5d}/{self.settings.steps} loss {loss.item():.4f} psnr {train_psnr:5.2f} dB "
                 f"codes in batch {used}/{self.cfg.codebook_size} ({elapsed:.1f}s)")

    def save(self, step_done: int, elapsed: float) -> ImageTokenizer:
        """Tokenizer files (weights.pt stays a plain state_dict, so its hash is the tokenizer's id) plus the
        resumable state and the log."""
        s, cfg, model = self.settings, self.cfg, self.model
        was_training = model.training
        tok = ImageTokenizer(cfg, model, device=self.device, channels_last=False)   # this sets eval mode
        tok.save(self.out_dir)
        model.train(was_training)
        state = {"config": asdict(cfg), "steps": s.steps, "seed": s.seed, "step": step_done,
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": self.opt.state_dict(), "torch_rng": torch.get_rng_state(),
                 "usage": model.quantizer.usage.detach().cpu(),    # dead-code bookkeeping since the last check
                 "restarts": self.restarts_total, "seconds": elapsed, "history": self.history}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.out_dir / STATE_FILE, buf.getvalue())
        train_log = {"config": asdict(cfg), "steps": s.steps, "steps_done": step_done, "finished": step_done >= s.steps,
                     "batch_size": s.batch_size, "lr": s.lr, "seed": s.seed, "device": str(self.device), "amp": s.amp,
                     "frames": int(len(self.frames)), "seconds": round(elapsed, 2), "restarts": self.restarts_total,
                     "tokenizer_id": tok.tokenizer_id, "history": self.history}
        atomic_write(self.out_dir / TRAIN_LOG_FILE, json.dumps(train_log, indent=2).encode("utf-8"))
        return tok


def codebook_stats(codes: np.ndarray, codebook_size: int) -> dict:
    """Fraction of the codebook used and perplexity (exp of the code-distribution entropy)."""
    counts = np.bincount(np.asarray(codes).ravel().astype(np.int64), minlength=codebook_size)
    p = counts / max(1, counts.sum())
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum())) if len(nz) else 0.0}


def evaluate_image_tokenizer(tok: ImageTokenizer, frames: np.ndarray, out_dir: str | os.PathLike,
                             sheet_frames: int = 8) -> dict:
    """PSNR, SSIM, codebook usage and a round-trip contact sheet (originals above reconstructions).

    Writes out_dir/metrics.json and out_dir/roundtrip.png; returns the metrics.
    """
    frames = check_frames(frames, tok.downsample)
    if len(frames) == 0:
        raise ClipforgeError("no frames to evaluate")
    t0 = time.time()
    codes = tok.encode(frames)
    recon = tok.decode(codes)
    per_frame = [psnr(a, b) for a, b in zip(frames, recon)]
    finite = [p for p in per_frame if math.isfinite(p)]
    ssim_frames = ssim(frames, recon, per_frame=True)
    metrics = {"tokenizer_id": tok.tokenizer_id, "frames": int(len(frames)), "psnr": psnr(frames, recon),
               "psnr_mean_per_frame": float(np.mean(finite)) if finite else float("inf"),
               "psnr_min_frame": float(np.min(per_frame)),
               "ssim": float(np.mean(ssim_frames)), "ssim_min_frame": float(np.min(ssim_frames)),
               **codebook_stats(codes, tok.codebook_size), "codebook_size": tok.codebook_size,
               "tokens_hw": list(codes.shape[1:]), "encode": tok.encode_settings,
               "seconds": round(time.time() - t0, 3)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = np.linspace(0, len(frames) - 1, num=min(sheet_frames, len(frames))).round().astype(int)
    write_png(out_dir / "roundtrip.png", contact_sheet([frames[idx], recon[idx]]))
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode("utf-8"))
    return metrics
