"""Generate a video from text with a trained RUN, like nanoGPT's sample.py: everything comes from RUN.

    sample("demo-out/run", "a red circle moves to the right", "sample.mp4", seed=0)

Steps (CogVideo's sampling): build the text slot "<span> <sep> prompt" and the guide slot (same span, empty
caption); frame 0 from the image phase, frames 1..4 from the sequential phase, every token with
classifier-free guidance, temperature and top-k; optional interpolation rounds (5 -> 9 -> 17 -> 33 frames,
the span prefix halving each round) with a model trained for the interpolation phase (this run, or
`interp_run`); decode with the run's image tokenizer; write mp4 or gif.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from clipforge.model.distributed import default_device
from clipforge.model.checkpoint import load_checkpoint, model_from_checkpoint
from clipforge.model.config import SAMPLING
from clipforge.model.run_folder import local_run
from clipforge.model.video import upscale, write_video
from clipforge.pipeline.errors import ClipforgeError


def _default_span(ckpt: dict, mode: str) -> float | None:
    spans = ckpt.get("spans") or {}
    for key in (mode, "all"):
        if key in spans:
            return float(spans[key])
    return None


def rounds_for(frames: int, frames_out: int) -> int:
    """Interpolation rounds that turn `frames` into exactly `frames_out` (each round: n -> 2n - 1)."""
    n, r = frames, 0
    while n < frames_out:
        n, r = 2 * n - 1, r + 1
    if n != frames_out:
        raise ClipforgeError(f"frames_out must be {frames}, {2 * frames - 1}, {4 * frames - 3}, ... (each "
                         f"interpolation round turns n frames into 2n - 1), got {frames_out}")
    return r


def load_run(run: Path, device: torch.device):
    """(checkpoint, model in eval mode, text tokenizer, image tokenizer) of a run, rebuilt from the run
    folder alone; the tokenizers must match the model's vocabularies."""
    from clipforge.model.start import run_tokenizer_specs
    from clipforge.tokenizer.sources import open_image_tokenizer, open_text_tokenizer

    ckpt = load_checkpoint(run, device="cpu")
    model = model_from_checkpoint(ckpt, device).eval()
    cfg = model.config
    specs = run_tokenizer_specs(run)
    text, image = open_text_tokenizer(specs["text"]), open_image_tokenizer(specs["image"], device=device)
    image.fit_size(cfg.tokens_h * image.downsample)
    if text.vocab_size != cfg.text_vocab or image.codebook_size != cfg.image_vocab:
        raise ClipforgeError(f"{run}: tokenizers do not match the model's vocabularies")
    return ckpt, model, text, image


def load_companion(other_run, model, run, device):
    """(model in eval mode, phases) of another run whose frames `model`'s must fit: the same vocabularies
    and layout (an interpolation run, or the image-phase run to draw frame 0 with)."""
    ckpt = load_checkpoint(other_run, device="cpu")
    other = model_from_checkpoint(ckpt, device).eval()
    if other.config.token_layout != model.config.token_layout:
        raise ClipforgeError(f"{other_run} was trained for other vocabularies or another layout than {run}")
    return other, ckpt.get("phases", [ckpt["phase"]])


def frame0_run(ckpt: dict, image_run) -> str | None:
    """The run whose image phase draws frame 0: `image_run` when given ("none" or False: the run's own
    base channel); by default the image-phase run a later phase started from (`init_from`), which drew
    frame 0 better than a base channel that kept training on frames 1.. (docs/model.md, the recipe)."""
    if image_run is False or (isinstance(image_run, str) and image_run.lower() == "none"):
        return None
    if image_run is not None:
        return str(image_run)
    init = (ckpt.get("train_config") or {}).get("init_from")
    if not init or ckpt.get("phase") == "image":
        return None
    try:
        return str(init) if load_checkpoint(init).get("phase") == "image" else None
    except (OSError, ValueError):   # the run it started from is gone: the run's own base channel
        return None


def sample(run_dir: str | os.PathLike, prompt: str, out_path: str | os.PathLike, seed: int = SAMPLING.seed,
           guidance: float = SAMPLING.guidance, temperature: float = SAMPLING.temperature,
           top_k: int | None = SAMPLING.top_k, frames_out: int | None = None, fps: float | None = None,
           span: float | None = None, interp_run: str | os.PathLike | None = None, device: str | None = None,
           min_side: int = 128, top_p: float | None = SAMPLING.top_p, candidates: int = SAMPLING.candidates,
           image_run: str | os.PathLike | None = None) -> dict:
    """Generate a video for `prompt` and write it to `out_path` (.mp4 or .gif).

    span: the time-span prefix in seconds (default: the most common span of the run's sequential
    training clips). frames_out: 5 (default), 9, 17 or 33 with an interpolation-trained model. fps: default
    real time, (frames - 1) / span. candidates: draw that many and keep the one the caption explains
    best (CogVideo.caption_scores). image_run: draw frame 0 with that run's image phase (default: the
    image-phase run this one started from, if any; "none": this run's own). Returns {"out", "frames",
    "seconds", "tokens", "span", "fps", "rounds", ...}.
    """
    t0 = time.time()
    run = local_run(run_dir)   # a run on object storage: its latest checkpoint and tokenizers, pulled
    device = torch.device(device or default_device())
    ckpt, model, text, image = load_run(run, device)
    cfg = model.config

    frames_out = frames_out or cfg.frames
    rounds = rounds_for(cfg.frames, frames_out)
    interp = model
    if rounds:
        if interp_run is not None:
            interp, phases = load_companion(interp_run, model, run, device)
        else:
            phases = ckpt.get("phases", [ckpt["phase"]])
        if "interpolation" not in phases:
            raise ClipforgeError(f"{frames_out} frames need interpolation rounds, but the model was not trained for "
                             f"the interpolation phase (phases {phases}); pass interp_run=RUN of one that was")
    span = span if span is not None else _default_span(ckpt, "sequential")
    ids, _ = text.encode_caption(prompt)

    def slots(s):
        cond, cut = text.build_slot(ids, s, cfg.text_slot)
        null, _ = text.build_slot([], s, cfg.text_slot)
        return torch.from_numpy(cond).to(device), torch.from_numpy(null).to(device), cut

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    kw = dict(guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    cond, null, prompt_cut = slots(span)   # prompt_cut: the words past the slot are not seen
    use_null = null if guidance != 1.0 else None
    image_run = frame0_run(ckpt, image_run)
    frame0_model = load_companion(image_run, model, run, device)[0] if image_run is not None else None
    codes = model.generate(cond, use_null, candidates=candidates, frame0_model=frame0_model, **kw)  # (frames, h, w)
    for r in range(rounds):
        c, n, _ = slots(span / 2 ** (r + 1) if span is not None else None)
        codes = interp.interpolate(codes, c.view(1, -1), n.view(1, -1) if use_null is not None else None, **kw)
    codes_np = codes.cpu().numpy().astype(np.uint16)
    frames = image.decode(codes_np)                                              # (T, S, S, 3)
    if fps is None:
        rate = (cfg.frames - 1) / span if span else 1.0
        fps = rate * 2 ** rounds
    out = write_video(upscale(frames, min_side), out_path, fps=fps)
    n_tokens = int(codes_np.size)
    return {"out": out, "frames": int(len(frames)), "seconds": round(time.time() - t0, 2), "tokens": n_tokens,
            "span": span, "fps": fps, "rounds": rounds, "prompt": prompt, "prompt_cut": bool(prompt_cut), "seed": seed,
            "candidates": candidates, "image_run": None if image_run is None else str(image_run),
            "size": [int(frames.shape[1]), int(frames.shape[2])]}
