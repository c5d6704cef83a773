"""`clipforge tokenizer train-text | train-image | eval-image`: wiring from a manifest to the tokenizers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipforge.pipeline.text.captions import CleanCaption, CleanConfig
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.decode import DecodeVideo
from clipforge.pipeline.manifest import manifest_rows, read_manifest
from clipforge.pipeline.schema import is_ok


def clean_captions(manifest: str, config: CleanConfig = CleanConfig()) -> list[str]:
    rows = CleanCaption(config)(manifest_rows(read_manifest(manifest)))
    return [r["caption"] for r in rows if is_ok(r)]


def train_text(manifest: str, out: str, vocab_size: int = 8000, log=print) -> dict:
    from clipforge.tokenizer.text import train_text_tokenizer

    captions = clean_captions(manifest)
    tok = train_text_tokenizer(captions, out, vocab_size=vocab_size)
    log(f"text tokenizer: {tok.vocab_size} pieces from {len(captions)} captions -> {out}")
    return {"out": str(out), "vocab_size": tok.vocab_size, "captions": len(captions), "id": tok.tokenizer_id}


def sample_frames(manifest: str, size: int, max_frames: int = 4000, seed: int = 0, progress: bool = True) -> np.ndarray:
    """Frames for the image tokenizer: every planned clip of every video, both sampling modes, in
    manifest order, until `max_frames` (decoded in the isolated decoder, like the build job)."""
    from tqdm import tqdm

    config = ClipConfig(size=size, mode="both", seed=seed)
    stage = DecodeVideo(config, timeout_s=120)
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
        raise ValueError(f"{manifest}: no video could be decoded to train the image tokenizer")
    return np.concatenate(frames)[:max_frames]


def train_image(manifest: str, out: str, preset: str = "tiny", steps: int = 300, batch_size: int = 32,
                max_frames: int = 4000, seed: int = 0, device: str | None = None, progress: bool = True,
                log=print) -> dict:
    from clipforge.tokenizer.image import PRESETS
    from clipforge.tokenizer.image_train import evaluate_image_tokenizer, train_image_tokenizer

    frames = sample_frames(manifest, PRESETS[preset].image_size, max_frames, seed, progress)
    log(f"image tokenizer: training {preset} on {len(frames)} frames for {steps} steps")
    tok = train_image_tokenizer(frames, out, preset=preset, steps=steps, batch_size=batch_size, seed=seed,
                                device=device, log=log)
    held_out = frames[:: max(1, len(frames) // 256)][:256]
    metrics = evaluate_image_tokenizer(tok, held_out, Path(out) / "eval")
    log(f"image tokenizer: PSNR {metrics.get('psnr', float('nan')):.2f} dB -> {out}")
    return {"out": str(out), "frames": int(len(frames)), **metrics}


def eval_image(checkpoint: str, manifest: str, out: str, max_frames: int = 512, progress: bool = True) -> dict:
    from clipforge.tokenizer.image import ImageTokenizer
    from clipforge.tokenizer.image_train import evaluate_image_tokenizer

    tok = ImageTokenizer.load(checkpoint)
    frames = sample_frames(manifest, tok.image_size, max_frames, progress=progress)
    return evaluate_image_tokenizer(tok, frames, out)
