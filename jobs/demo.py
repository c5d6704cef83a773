"""`clipforge demo`: the embedded default, end to end on this machine.

synth → text tokenizer → image tokenizer → build (local Ray) → verify → audit → train (image phase, then
the sequential phase from it) → sample a caption of a held-out video, checked by eval-synth's pixel
detector. Sizes are chosen so that a 2-core CPU finishes in under ten minutes: 64×64 frames, 8×8 codes per
frame, a 0.76M-parameter transformer of 2 layers; the settings are docs/model.md's recipe, shortened.
Real corpora use CogVideo's sizes, the defaults (160×160, 5 frames, 20×20 codes).
"""
from __future__ import annotations

import json
import time
from pathlib import Path


SQUARE_SIZES = ((64, 64), (96, 96), (128, 128), (144, 144))   # (width, height) of the demo's videos
CROSS_BAND = 0.25   # the demo's paths run within the middle quarter of the frame across their direction


DEMO_MARKER = ".clipforge-demo"


class Steps:
    """Logs each step's name and keeps its seconds."""

    def __init__(self, log):
        self.log, self.seconds, self.name, self.t0 = log, {}, None, 0.0

    def __call__(self, name: str) -> "Steps":
        self.name = name
        return self

    def __enter__(self):
        self.log(f"\n== {self.name} ==")
        self.t0 = time.time()

    def __exit__(self, *exc):
        self.seconds[self.name] = round(time.time() - self.t0, 1)


def demo_folder(out: str) -> dict[str, Path]:
    """The demo's paths under OUT; OUT must be new, empty, or a folder an earlier demo made (its marker)."""
    root = Path(out)
    marker = root / DEMO_MARKER
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise FileExistsError(f"{root} is not empty and is not a folder clipforge demo made: pick a new --out "
                              f"(the demo replaces what it wrote on a rerun, so it never writes over other files)")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by clipforge demo: a rerun replaces this folder's demo outputs\n")
    return {k: root / v for k, v in {"corpus": "corpus", "held": "held", "text_tokenizer": "tokenizers/text.model",
                                      "image_tokenizer": "tokenizers/image", "dataset": "dataset",
                                      "audit": "audit", "image_run": "run-image", "run": "run",
                                      "video": "sample.mp4"}.items()}


def demo_corpus(paths: dict, videos: int, steps: Steps, log) -> tuple[Path, Path]:
    """(training manifest, held-out manifest), and the tokenizers trained on the training corpus."""
    from clipforge.jobs.tokenizers import train_image, train_text
    from clipforge.pipeline.video.synth import SynthConfig, write_synthetic_corpus

    with steps("synth"):
        # short videos: each gives a few clips, and more videos (shape, colour, path) teach more than longer
        # ones. Square frames: the build centre-crops, and on landscape sizes the crop cut the ends off every
        # horizontal path, so left and right were learnt worse than up and down. Paths in the middle quarter
        # across: in its minutes the sequential phase reads the axis of motion from where frame 0 stands far
        # sooner than from the caption's words (docs/model.md, "The demo").
        manifest = write_synthetic_corpus(paths["corpus"], SynthConfig(
            videos=videos, seed=0, max_seconds=4.0, sizes=SQUARE_SIZES, cross_band=CROSS_BAND,
            dirty_captions=0.25, broken=2))
        held = write_synthetic_corpus(paths["held"], SynthConfig(videos=4, seed=1, max_seconds=8.0))
    with steps("text tokenizer"):
        train_text(str(manifest), str(paths["text_tokenizer"]), vocab_size=400, log=log, overwrite=True)
    with steps("image tokenizer"):
        # local codes (1x1 encoder kernel) at the recipe's lr: the default 3e-3 collapsed with them once
        train_image(str(manifest), str(paths["image_tokenizer"]), preset="tiny", max_frames=3000, lr=1.5e-3,
                    steps=4000, max_minutes=2.0, overrides={"encoder_kernel": 1, "padding": "replicate"}, log=log,
                    overwrite=True)
    return manifest, held


def demo_dataset(paths: dict, manifest: Path, steps: Steps, log) -> None:
    """Build (on a local Ray), verify and audit the demo's dataset."""
    from clipforge.jobs.build import BuildConfig, build, with_overrides
    from clipforge.jobs.verify import verify_dataset
    from clipforge.pipeline.text.audit import audit

    with steps("build"):
        if paths["dataset"].exists():   # a rerun of the demo (its marker is there) starts its dataset afresh
            import shutil
            shutil.rmtree(paths["dataset"])
        config = with_overrides(BuildConfig(), size=64, mode="both", inputs_per_shard=32, text_slot=40,
                                tokenize_batch=32)
        info = build(str(manifest), str(paths["dataset"]), str(paths["image_tokenizer"]),
                     str(paths["text_tokenizer"]), config, log=log)
        log(json.dumps(info["funnel"], indent=1))
    with steps("verify"):
        report = verify_dataset(paths["dataset"])
        log(f"verify: {'ok' if not report['problems'] else report['problems']}")
    with steps("audit"):
        audit(str(paths["dataset"]), str(paths["audit"]), text_tokenizer_path=str(paths["text_tokenizer"]), slot=40)


def demo_training(paths: dict, train_minutes: float, steps: Steps, log) -> None:
    """The image phase (a third of the minutes), then the sequential phase from it."""
    from clipforge.model.config import TrainConfig
    from clipforge.model.train import train

    with steps("train"):
        tokenizers = dict(image_tokenizer=str(paths["image_tokenizer"]), text_tokenizer=str(paths["text_tokenizer"]))
        first = train(str(paths["dataset"]), str(paths["image_run"]),
                      TrainConfig(phase="image", steps=5000, max_minutes=train_minutes / 3, n_layer=2,
                                  **tokenizers),   # 2 layers: twice the steps of 4 in the minutes given
                      overwrite=True)
        log(json.dumps(first, default=str))
        # train's defaults: the whole model, no joint frame-0 loss (the image-phase run draws frame 0), no
        # dropout (in 3.7 minutes of 1,500 videos the phase is far from memorising: held-out loss 0.39
        # against 0.40 with it, and its masks cost a fifth of a step)
        result = train(str(paths["dataset"]), str(paths["run"]),
                       TrainConfig(phase="sequential", steps=6000, max_minutes=train_minutes * 2 / 3, warmup_steps=20,
                                   init_from=str(paths["image_run"]), **tokenizers), overwrite=True)
        log(json.dumps(result, default=str))


def demo_sample(paths: dict, held: Path, candidates: int, steps: Steps, log) -> dict:
    """A caption of a video the model never saw, sampled with the recipe's sampler and checked against that
    video's ground truth by the synthetic corpus's pixel detector; returns the sampler's settings."""
    import pandas as pd

    from clipforge.model.sample import sample
    from clipforge.pipeline.video.synth_detector import detect, read_clip

    with steps("sample"):
        truth = pd.read_parquet(held).iloc[0]
        prompt = str(truth["caption"])
        log(f"prompt: {prompt!r} (a held-out video's caption: {truth['color']} {truth['shape']}, "
            f"{truth['direction']})")
        # frame 0 from the image-phase run: the sequential phase trained the whole model on frames 1.. only,
        # and in its minutes the base channel drifted from frame 0 (docs/model.md, "The demo")
        sampler = dict(candidates=candidates, image_run=str(paths["image_run"]))
        sampled = sample(str(paths["run"]), prompt, str(paths["video"]), **sampler)
        log(json.dumps(sampled, default=str))
        seen = detect(read_clip(sampled["out"], 64, sampled["frames"]))
        checks = {a: seen[a] == truth[a] for a in ("color", "shape", "direction")}
        log("sample check (pixel detector, as in `clipforge eval-synth`): " + ", ".join(
            f"{a} {seen[a]} ({'right' if ok else 'wanted ' + str(truth[a])})" for a, ok in checks.items()))
    return sampler


def run_demo(out: str = "demo-out", videos: int = 1500, train_minutes: float = 5.5, candidates: int = 4,
             log=print) -> dict:
    """train_minutes: both training phases together, a third for the image phase. candidates: videos drawn
    for the prompt, of which the one its caption explains best is kept (`clipforge sample --candidates`):
    4, not more, because among 32 draws the score's favourite was often a smear of the caption's colour
    over half the frame (docs/model.md, "The demo")."""
    paths = demo_folder(out)
    steps = Steps(log)
    manifest, held = demo_corpus(paths, videos, steps, log)
    demo_dataset(paths, manifest, steps, log)
    demo_training(paths, train_minutes, steps, log)
    sampler = demo_sample(paths, held, candidates, steps, log)
    log("\n== outputs ==")
    for name in ("corpus", "text_tokenizer", "image_tokenizer", "dataset", "audit", "image_run", "run", "video"):
        log(f"{name:>16}: {paths[name]}")
    log(f"{'report':>16}: {paths['audit'] / 'report.html'}")
    log(f"{'seconds':>16}: {json.dumps(steps.seconds)}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sampler.items())
    log(f"\nanother prompt: clipforge sample {paths['run']} --prompt 'a red ball drifts to the left' --out other.mp4 "
        f"{flags}")
