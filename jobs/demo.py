"""`clipforge demo`: the embedded default, end to end on this machine.

synth → text tokenizer → image tokenizer → build (local Ray) → verify → audit → train (image stage, then
the sequential stage from it) → sample a caption of a held-out video, checked by eval-synth's pixel
detector. Sizes are chosen so that a 2-core CPU finishes in under ten minutes: 64×64 frames, 8×8 codes per
frame, a 0.76M-parameter transformer of 2 layers; the settings are docs/model.md's recipe ("Generalisation
on CPU"), shortened. Real corpora use the SPEC's defaults (160×160, 5 frames, 20×20 codes).
"""
from __future__ import annotations

import json
import time
from pathlib import Path


SQUARE_SIZES = ((64, 64), (96, 96), (128, 128), (144, 144))   # (width, height) of the demo's videos
CROSS_BAND = 0.25   # the demo's paths run within the middle quarter of the frame across their direction


DEMO_MARKER = ".clipforge-demo"


def run_demo(out: str = "demo-out", videos: int = 1500, train_minutes: float = 5.5, candidates: int = 4,
             log=print) -> dict:
    """train_minutes: both training stages together, a third for the image stage. candidates: videos drawn
    for the prompt, of which the one its caption explains best is kept (`clipforge sample --candidates`):
    4, not more, because among 32 draws the score's favourite was often a smear of the caption's colour
    over half the frame (docs/model.md, "A middle band")."""
    from clipforge.jobs.build import BuildConfig, build, with_overrides
    from clipforge.jobs.eval_synth import detect, read_clip
    from clipforge.jobs.tokenizers import train_image, train_text
    from clipforge.model.sample import sample
    from clipforge.model.train import TrainConfig, train
    from clipforge.pipeline.text.audit import audit
    from clipforge.pipeline.video.synth import SynthConfig, write_synthetic_corpus
    from clipforge.jobs.verify import verify_dataset

    root = Path(out)
    marker = root / DEMO_MARKER
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise FileExistsError(f"{root} is not empty and is not a folder clipforge demo made: pick a new --out "
                              f"(the demo replaces what it wrote on a rerun, so it never writes over other files)")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by clipforge demo: a rerun replaces this folder's demo outputs\n")
    paths = {k: root / v for k, v in {"corpus": "corpus", "held": "held", "text_tokenizer": "tokenizers/text.model",
                                       "image_tokenizer": "tokenizers/image", "dataset": "dataset",
                                       "audit": "audit", "image_run": "run-image", "run": "run",
                                       "video": "sample.mp4"}.items()}
    timings = {}

    def step(name):
        log(f"\n== {name} ==")
        timings[name] = time.time()

    def done(name):
        timings[name] = round(time.time() - timings[name], 1)

    step("synth")
    # short videos: each gives a few clips, and more videos (shape, colour, path) teach more than longer ones.
    # Square frames: the build centre-crops, and on the default landscape sizes the crop cut the ends off
    # every horizontal path, so left and right were learnt worse than up and down (docs/model.md). Paths in
    # the middle quarter across: in its minutes the sequential stage reads the axis of motion from where
    # frame 0 stands far sooner than from the caption's words (docs/model.md, "A middle band").
    manifest = write_synthetic_corpus(paths["corpus"], SynthConfig(videos=videos, seed=0, max_seconds=4.0,
                                                                    sizes=SQUARE_SIZES, cross_band=CROSS_BAND,
                                                                    dirty_captions=0.25, broken=2))
    held = write_synthetic_corpus(paths["held"], SynthConfig(videos=4, seed=1, max_seconds=8.0))
    done("synth")
    step("text tokenizer")
    train_text(str(manifest), str(paths["text_tokenizer"]), vocab_size=400, log=log, overwrite=True)   # our own
    done("text tokenizer")
    step("image tokenizer")
    # local codes (1x1 encoder kernel) at the recipe's lr: the default 3e-3 collapsed with them once
    train_image(str(manifest), str(paths["image_tokenizer"]), preset="tiny", max_frames=3000, lr=1.5e-3,
                steps=4000, max_minutes=2.0, overrides={"encoder_kernel": 1, "padding": "replicate"}, log=log,
                overwrite=True)
    done("image tokenizer")
    step("build")
    if paths["dataset"].exists():   # a rerun of the demo (its marker is there) starts its dataset afresh
        import shutil
        shutil.rmtree(paths["dataset"])
    config = with_overrides(BuildConfig(), size=64, mode="both", inputs_per_shard=32, text_slot=40, tokenize_batch=32)
    info = build(str(manifest), str(paths["dataset"]), str(paths["image_tokenizer"]), str(paths["text_tokenizer"]),
                 config, log=log)
    log(json.dumps(info["funnel"], indent=1))
    done("build")
    step("verify")
    report = verify_dataset(paths["dataset"])
    log(f"verify: {'ok' if not report['problems'] else report['problems']}")
    done("verify")
    step("audit")
    audit(str(paths["dataset"]), str(paths["audit"]), text_tokenizer_path=str(paths["text_tokenizer"]), slot=40)
    done("audit")
    step("train")
    tokenizers = dict(image_tokenizer=str(paths["image_tokenizer"]), text_tokenizer=str(paths["text_tokenizer"]))
    first = train(str(paths["dataset"]), str(paths["image_run"]),
                  TrainConfig(stage="image", steps=5000, max_minutes=train_minutes / 3, batch_size=32, lr=2e-3,
                              warmup_steps=30, n_layer=2, **tokenizers),   # 2 layers: twice the steps of 4
                  overwrite=True)
    log(json.dumps(first, default=str))
    # the whole model trains, without the joint frame-0 loss: in minutes it costs steps and prompt following
    # (docs/model.md, "Generalisation on CPU"). No dropout: its masks were a fifth of a step here, and in
    # 3.7 minutes of 1,500 videos the stage is far from memorising (held-out loss 0.39 against 0.40 with it)
    result = train(str(paths["dataset"]), str(paths["run"]),
                   TrainConfig(stage="sequential", steps=6000, max_minutes=train_minutes * 2 / 3, batch_size=16,
                               lr=1e-3, warmup_steps=20, init_from=str(paths["image_run"]), freeze_base=False,
                               joint_image=False, dropout=0.0, **tokenizers), overwrite=True)
    log(json.dumps(result, default=str))
    done("train")
    step("sample")
    # a caption of a video the model never saw, with the recipe's sampler settings (guidance 2, temperature
    # 1.0, nucleus 0.9: docs/model.md), checked against that video's ground truth by eval-synth's detector
    import pandas as pd

    truth = pd.read_parquet(held).iloc[0]
    prompt = str(truth["caption"])
    log(f"prompt: {prompt!r} (a held-out video's caption: {truth['color']} {truth['shape']}, {truth['direction']})")
    # frame 0 from the image-stage run: the sequential stage trained the whole model on frames 1.. only,
    # and in its minutes the base channel drifted from frame 0 (docs/model.md, "Generalisation on CPU", the demo)
    sampler = dict(guidance=2.0, temperature=1.0, top_p=0.9, candidates=candidates, image_run=str(paths["image_run"]))
    sampled = sample(str(paths["run"]), prompt, str(paths["video"]), seed=0, **sampler)
    log(json.dumps(sampled, default=str))
    seen = detect(read_clip(sampled["out"], 64, sampled["frames"]))
    checks = {a: seen[a] == truth[a] for a in ("color", "shape", "direction")}
    log("sample check (pixel detector, as in `clipforge eval-synth`): " + ", ".join(
        f"{a} {seen[a]} ({'right' if ok else 'wanted ' + str(truth[a])})" for a, ok in checks.items()))
    done("sample")

    log("\n== outputs ==")
    for name in ("corpus", "text_tokenizer", "image_tokenizer", "dataset", "audit", "image_run", "run", "video"):
        log(f"{name:>16}: {paths[name]}")
    log(f"{'report':>16}: {paths['audit'] / 'report.html'}")
    log(f"{'seconds':>16}: {json.dumps(timings)}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sampler.items())
    log(f"\nanother prompt: clipforge sample {paths['run']} --prompt 'a red ball drifts to the left' --out other.mp4 "
        f"{flags}")
    return {k: str(v) for k, v in paths.items()} | {"timings": timings, "sample_check": checks}
