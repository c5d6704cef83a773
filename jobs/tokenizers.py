"""`clipforge tokenizer train-text | train-image | eval-image`: wiring from a manifest to the tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipforge.pipeline.text.captions import CleanConfig
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.manifest import manifest_rows, read_manifest
from clipforge.pipeline.schema import is_ok
from clipforge.tokenizer.image import TRAIN_LOG_FILE
from clipforge.pipeline.errors import ClipforgeError


def clean_captions(manifest: str, config: CleanConfig = CleanConfig()) -> list[str]:
    from clipforge.pipeline.chain import BuildConfig, build_stages

    (clean,) = build_stages(BuildConfig(captions=config), decode=False)
    return [r["caption"] for r in clean(manifest_rows(read_manifest(manifest))) if is_ok(r)]


def refuse_existing(out, overwrite: bool, what: str) -> None:
    """A tokenizer that datasets may be pinned to (by its hash) is replaced only when asked."""
    path = Path(out)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    raise FileExistsError(f"{out} already holds {what}: datasets built with it are pinned to its hash; pick a new "
                          f"--out, or pass --overwrite to replace it")


def train_text(manifest: str, out: str, vocab_size: int = 8000, log=print, overwrite: bool = False) -> dict:
    from clipforge.tokenizer.text import train_text_tokenizer

    refuse_existing(out, overwrite, "a text tokenizer")

    captions = clean_captions(manifest)
    tok = train_text_tokenizer(captions, out, vocab_size=vocab_size)
    log(f"text tokenizer: {tok.vocab_size} pieces from {len(captions)} captions -> {out}")
    return {"out": str(out), "vocab_size": tok.vocab_size, "captions": len(captions), "id": tok.tokenizer_id}


def sample_frames(manifest: str, size: int, max_frames: int = 4000, seed: int = 0, progress: bool = True) -> np.ndarray:
    """Frames for the image tokenizer: every planned clip of every video, both sampling modes, in
    manifest order, until `max_frames` (decoded in the isolated decoder, like the build job)."""
    from tqdm import tqdm

    from clipforge.pipeline.chain import BuildConfig, build_stages

    # the build's own decode stage, so that the tokenizer trains on the frames a build would encode (every
    # video's, whatever its caption)
    _, stage = build_stages(BuildConfig(clips=ClipConfig(size=size, mode="both", seed=seed)))
    rows = list(manifest_rows(read_manifest(manifest)))
    frames, total = [], 0
    try:
        for row in tqdm(rows, desc="frames", unit="video", disable=not progress):
            for out in stage([row]):
                if is_ok(out):
                    frames.append(out["frames"])
                    total += len(out["frames"])
            if total >= max_frames:
                break
    finally:
        stage.close()
    if not frames:
        raise ClipforgeError(f"{manifest}: no video could be decoded to train the image tokenizer")
    return np.concatenate(frames)[:max_frames]


def train_image(manifest: str, out: str, preset: str = "tiny", steps: int | None = None,
                batch_size: int | None = None, max_frames: int = 4000, seed: int = 0, device: str | None = None,
                max_minutes: float | None = None, resume: bool = False, lr: float | None = None,
                eval_frames: int = 64, progress: bool = True, overrides: dict | None = None, log=print,
                overwrite: bool = False) -> dict:
    """Sample frames from the manifest, train (or, with `resume`, continue) the preset, evaluate on a spread
    of the training frames. steps / batch_size / lr default to the preset's; `max_minutes` bounds this run;
    `overrides` replaces fields of the preset's VQConfig (e.g. {"encoder_kernel": 1, "padding": "replicate"})."""
    from dataclasses import replace

    from clipforge.tokenizer.vq import PRESETS
    from clipforge.tokenizer.image_train import evaluate_image_tokenizer, train_image_tokenizer

    if preset not in PRESETS:
        raise ClipforgeError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if not resume:
        refuse_existing(out, overwrite, "an image tokenizer (or other files)")
    config = replace(PRESETS[preset], **(overrides or {}))
    frames = sample_frames(manifest, config.image_size, max_frames, seed, progress)
    log(f"image tokenizer: training {preset}{' ' + json.dumps(overrides) if overrides else ''} on {len(frames)} frames")
    tok = train_image_tokenizer(frames, out, preset=config, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                device=device, log=log, max_minutes=max_minutes, resume=resume)
    train_log = json.loads((Path(out) / TRAIN_LOG_FILE).read_text(encoding="utf-8"))
    # a quick figure on a spread of training frames; held-out figures are `eval-image`'s job
    seen = frames[:: max(1, len(frames) // eval_frames)][:eval_frames]
    metrics = evaluate_image_tokenizer(tok, seen, Path(out) / "eval")
    log(f"image tokenizer: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} on training frames; "
        f"step {train_log['steps_done']}/{train_log['steps']} -> {out}")
    return {"out": str(out), "frames": int(len(frames)), "steps_done": train_log["steps_done"],
            "finished": train_log["finished"], "train_seconds": train_log["seconds"], **metrics}


def eval_image(checkpoint: str, manifest: str, out: str, max_frames: int = 512, device: str | None = None,
               dtype: str = "float32", seed: int = 0, progress: bool = True) -> dict:
    """PSNR / SSIM / codebook usage of a trained tokenizer on frames of a manifest (use one it never saw)."""
    from clipforge.tokenizer.image_train import evaluate_image_tokenizer
    from clipforge.tokenizer.sources import open_image_tokenizer

    tok = open_image_tokenizer(checkpoint, device=device, dtype=dtype)
    frames = sample_frames(manifest, tok.image_size, max_frames, seed=seed, progress=progress)
    return {"manifest": str(manifest), **evaluate_image_tokenizer(tok, frames, out)}
