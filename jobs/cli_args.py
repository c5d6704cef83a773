"""The `clipforge` command's arguments: one function per command, and nothing else.

Defaults live in one place, the configuration dataclasses (`BuildConfig`, `ClipConfig`, `TrainConfig`,
`SamplingConfig`, `ReshardConfig`, `SynthConfig`): a flag that fills one of their fields defaults to None
(meaning "not given") and its help shows the dataclass's value. `jobs/cli.py` fills the configs from the
flags that were given. Each command's parser records its handler's name in `command`.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from clipforge.model.config import SamplingConfig, TrainConfig
from clipforge.pipeline.chain import BuildConfig
from clipforge.pipeline.storage.reshard import ReshardConfig
from clipforge.pipeline.video.clips import MODES, ClipConfig
from clipforge.pipeline.video.synth import SynthConfig

ENDPOINT_HELP = "S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)"


def default_of(config_class, name: str):
    """The default of one field of a configuration dataclass."""
    for f in fields(config_class):
        if f.name == name:
            return f.default if f.default is not MISSING else f.default_factory()
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def with_default(help_: str, config_class, name: str) -> str:
    value = default_of(config_class, name)
    if isinstance(value, tuple):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{help_} (default: {value})" if help_ else f"default: {value}"


def command(sub, name: str, help_: str, handler: str | None = None) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_, description=help_)
    s.add_argument("--config", help="TOML or YAML file whose keys mirror this command's flags")
    s.set_defaults(command=handler or name)
    return s


def add_synth(sub) -> None:
    s = command(sub, "synth", "write a synthetic corpus of real video files and OUT/manifest.parquet")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--videos", type=int, help=with_default("number of good videos", SynthConfig, "videos"))
    s.add_argument("--seed", type=int, help=with_default("", SynthConfig, "seed"))
    s.add_argument("--max-seconds", type=float, help=with_default("longest video, seconds", SynthConfig, "max_seconds"))
    s.add_argument("--dirty", type=float, help=with_default("fraction of captions made dirty (mojibake, HTML, URLs)",
                                                            SynthConfig, "dirty_captions"))
    s.add_argument("--broken", type=int, help=with_default("extra broken rows (empty, truncated, not a video, "
                                                           "missing)", SynthConfig, "broken"))
    s.add_argument("--leave-out", metavar="COMBOS",
                   help="comma-separated COLOR-SHAPE-DIRECTION combinations no video shows (e.g. red-square-left), "
                        "so a held-out corpus can test combinations never seen in training")
    s.add_argument("--only", metavar="COMBOS",
                   help="comma-separated COLOR-SHAPE-DIRECTION combinations: every video shows one of them "
                        "(a held-out corpus of exactly the combinations a training corpus left out)")
    s.add_argument("--sizes", metavar="WxH,...",
                   help="comma-separated frame sizes drawn from, e.g. 64x64,96x96 (default: five sizes, mostly "
                        "landscape; square ones keep whole paths through a centre-cropping build)")
    s.add_argument("--cross-band", type=float, metavar="F",
                   help=with_default("paths run within the middle fraction F of the frame across their direction "
                                     "(1: anywhere the shape fits; the demo's 0.25 lets a shape's position tell its "
                                     "axis)", SynthConfig, "cross_band"))


def add_clip_flags(s, extended: bool = False) -> None:
    s.add_argument("--size", type=int, help=with_default("output frame size", ClipConfig, "size"))
    s.add_argument("--frames", type=int, help=with_default("frames per sample", ClipConfig, "frames"))
    s.add_argument("--mode", choices=MODES, help=with_default("", ClipConfig, "mode"))
    s.add_argument("--trim", type=float, help=with_default("seconds dropped at both ends", ClipConfig, "trim"))
    if extended:
        s.add_argument("--max-span", type=float, help=with_default("longest sample span, seconds", ClipConfig,
                                                                    "max_span"))
        s.add_argument("--rates", help=with_default("comma-separated frame rates", ClipConfig, "rates"))
        s.add_argument("--seed", type=int, help=with_default("clip-sampling seed", ClipConfig, "seed"))


def add_clips(sub) -> None:
    s = command(sub, "clips", "print the clip plan of one video as JSON; with --out, write its frames")
    s.add_argument("video", metavar="VIDEO")
    s.add_argument("--out", help="write each clip's frames as .npy and a contact-sheet PNG here")
    add_clip_flags(s)


def add_captions(sub) -> None:
    cap = sub.add_parser("captions", help="caption tools", description="caption tools")
    actions = cap.add_subparsers(dest="captions_command", metavar="ACTION", required=True)
    s = command(actions, "clean", "clean a manifest's captions (keeps caption_raw, adds flags)", "captions clean")
    s.add_argument("input", metavar="IN")
    s.add_argument("output", metavar="OUT")


def add_audit(sub) -> None:
    s = command(sub, "audit", "caption-quality report of a manifest or a built dataset")
    s.add_argument("input", metavar="IN", help="a manifest file or a dataset directory")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--text-tokenizer", help="sentencepiece .model (or icetk:PATH) for token lengths")
    s.add_argument("--text-slot", type=int, default=64, help="text tokens per sample (default: 64)")


def add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train and evaluate the tokenizers", description="tokenizers")
    actions = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    overwrite = "replace an existing tokenizer at --out (datasets built with it no longer match it)"
    s = command(actions, "train-text", "train the sentencepiece text tokenizer on cleaned captions",
                "tokenizer train-text")
    s.add_argument("input", metavar="IN", help="manifest")
    s.add_argument("--out", required=True, help="output .model file")
    s.add_argument("--vocab-size", type=int, default=8000, help="default: 8000")
    s.add_argument("--overwrite", action="store_true", help=overwrite)

    s = command(actions, "train-image", "train the VQ image tokenizer on frames sampled from a manifest",
                "tokenizer train-image")
    s.add_argument("input", metavar="IN", help="manifest")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--preset", choices=["tiny", "cogview2"], default="tiny")
    s.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's)")
    s.add_argument("--batch-size", type=int, help="frames per step (default: the preset's)")
    s.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    s.add_argument("--max-frames", type=int, default=4000, help="default: 4000")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--max-minutes", type=float, help="wall-time budget of this run; stops, saves, resumable")
    s.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt (same settings)")
    s.add_argument("--overwrite", action="store_true", help=overwrite)
    s.add_argument("--encoder-kernel", type=int, choices=[1, 3],
                   help="1: each code is computed from its own patch only (default: the preset's, 3)")
    s.add_argument("--padding", choices=["zeros", "replicate"],
                   help="conv padding at the frame border; replicate: a flat frame is one code (default: zeros)")

    s = command(actions, "eval-image", "PSNR, SSIM, codebook usage and a round-trip contact sheet",
                "tokenizer eval-image")
    s.add_argument("checkpoint", metavar="CKPT")
    s.add_argument("input", metavar="IN", help="manifest (frames the tokenizer never saw)")
    s.add_argument("--out", required=True, metavar="DIR", help="writes metrics.json and roundtrip.png")
    s.add_argument("--max-frames", type=int, default=512, help="default: 512")
    s.add_argument("--seed", type=int, default=0, help="clip-sampling seed")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def add_build(sub) -> None:
    s = command(sub, "build", "the main job: shard tasks from a manifest to committed token shards")
    s.add_argument("manifest", metavar="MANIFEST")
    s.add_argument("--out", required=True, metavar="DATASET")
    s.add_argument("--image-tokenizer", required=True, metavar="DIR",
                   help="a clipforge image tokenizer folder, or icetk:PATH (icetk's ice_image.pt; icetk:PATH#16 "
                        "for compression 16)")
    s.add_argument("--text-tokenizer", required=True, metavar="FILE",
                   help="a clipforge sentencepiece .model, or icetk:PATH (icetk's ice_text.model)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    s.add_argument("--resume", action="store_true", help="keep committed shards, redo the rest")
    s.add_argument("--retry-failed", action="store_true", help="redo shards whose ledger has transient failures")
    s.add_argument("--take-over", action="store_true",
                   help="take the dataset's lease from a driver known to be dead, without waiting for it to expire")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--endpoint", help=ENDPOINT_HELP)
    for flag, name, kind, help_ in BUILD_FLAGS:
        options = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        s.add_argument(flag, help=with_default(help_, BuildConfig, name), **options)
    add_clip_flags(s, extended=True)


# build flags that fill a BuildConfig field: (flag, field, type or choices, help); a flag's dest (and its
# key in a --config file) is its own name, which says the unit where the field's name does
BUILD_FLAGS = (
    ("--inputs-per-shard", "inputs_per_shard", int, "manifest rows per shard"),
    ("--text-slot", "text_slot", int, "text tokens per sample"),
    ("--decode-timeout", "decode_timeout_s", float, "seconds per video before the decoder is killed"),
    ("--shard-tasks", "shard_tasks", int, "shard tasks running at once (0: every free CPU)"),
    ("--shard-timeout", "shard_timeout_s", float, "seconds before a running shard task is cancelled and run again"),
    ("--commit-every", "commit_every_s", float, "seconds between writes of the commit log (a crash redoes at most "
                                                "these)"),
    ("--tokenize-batch", "tokenize_batch", int, "clips per image-tokenizer call"),
    ("--tokenize-workers", "tokenize_workers", int, "GPU tokenizer workers (0: one per GPU share)"),
    ("--tokenize-gpus", "tokenize_gpus", float, "GPU share of one tokenizer worker, e.g. 0.5"),
    ("--tokenize-dtype", "tokenize_dtype", ("float32", "bfloat16", "float16"),
     "encoder precision (recorded in dataset.json: bf16/fp16 can flip nearest-code ties; float16: icetk only, "
     "as its fp16=True)"),
    ("--runner", "runner", ("ray", "local"), "where shard tasks run"),
)


def add_reshard(sub) -> None:
    s = command(sub, "reshard", "merge/split/shuffle/filter datasets and split off a validation set")
    s.add_argument("inputs", nargs="+", metavar="IN", help="one or more datasets")
    s.add_argument("output", metavar="OUT")
    s.add_argument("--samples-per-shard", type=int, help=with_default("", ReshardConfig, "samples_per_shard"))
    s.add_argument("--bytes-per-shard", type=int, help="close shards at this size instead")
    s.add_argument("--shuffle-seed", type=int, help="shuffle with this seed (default: keep the order)")
    s.add_argument("--filter", help='keep the samples this comparison of index columns selects, e.g. '
                   '"rate >= 1 and caption_tokens <= 64" (comparisons, in, and/or/not, parentheses only)')
    s.add_argument("--val-fraction", type=float, help=with_default("share of source videos held out",
                                                                   ReshardConfig, "val_fraction"))
    s.add_argument("--val-seed", type=int, help=with_default("", ReshardConfig, "val_seed"))
    s.add_argument("--address", help="Ray cluster address: write the output shards as Ray tasks there")
    s.add_argument("--endpoint", help=ENDPOINT_HELP)
    s.add_argument("--resume", action="store_true", help="continue a reshard that stopped part way")
    s.add_argument("--take-over", action="store_true", help="take the output's lease from a dead driver")
    s.add_argument("--quiet", action="store_true")


def add_gc(sub) -> None:
    s = command(sub, "gc", "remove attempt parts no committed record names, and nothing else")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--older-than", type=float, help=with_default(
        "only parts older than this many seconds (an attempt may still be writing)", BuildConfig, "gc_grace_s"))
    s.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    s.add_argument("--take-over", action="store_true", help="take the dataset's lease from a dead driver")
    s.add_argument("--endpoint", help=ENDPOINT_HELP)


def add_estimate(sub) -> None:
    s = command(sub, "estimate", "pilot run on a sample, then time and cost for the full corpus")
    s.add_argument("manifest", metavar="MANIFEST")
    s.add_argument("--sample", type=int, default=50, help="pilot inputs (default: 50)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-tokenizer", metavar="DIR", help="also time tokenization")
    s.add_argument("--text-tokenizer", metavar="FILE")
    s.add_argument("--workers", type=int, default=64, help="decode workers (CPU cores) to plan for (default: 64)")
    s.add_argument("--gpus", type=int, default=0)
    s.add_argument("--cost-per-core-hour", type=float, default=0.04)
    s.add_argument("--cost-per-gpu-hour", type=float, default=2.0)
    add_clip_flags(s)


def add_verify(sub) -> None:
    s = command(sub, "verify", "check a dataset end to end")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--export", metavar="OUT.bin", help="check a CogVideo export of DATASET instead: every row rebuilt "
                                                      "from the dataset and compared")
    s.add_argument("--address", help="Ray cluster address: check the shards as Ray tasks there")
    s.add_argument("--endpoint", help=ENDPOINT_HELP)


# train flags that fill a TrainConfig field of the same name: (flag, type, help)
TRAIN_FLAGS = (
    ("--steps", int, "optimizer steps"),
    ("--max-minutes", float, "stop after this long, at the latest"),
    ("--batch-size", int, "samples per rank and micro-step (None: 32 in the image phase, 16 in the video phases)"),
    ("--seed", int, ""),
    ("--device", str, "cpu or cuda (None: cuda when available)"),
    ("--n-layer", int, "a fresh model's layers"),
    ("--n-embd", int, "a fresh model's width"),
    ("--n-head", int, "a fresh model's attention heads"),
    ("--dropout", float, "residual and MLP dropout (None: 0.1 in the image phase, 0 in the video phases)"),
    ("--lr", float, "peak learning rate (None: 2e-3 in the image phase, 1e-3 in the video phases)"),
    ("--warmup-steps", int, ""),
    ("--weight-decay", float, ""),
    ("--cond-drop", float, "caption dropout for classifier-free guidance"),
    ("--grad-accum", int, "micro-batches per optimizer step"),
    ("--global-batch", int, "samples per optimizer step over all ranks (sets --grad-accum)"),
    ("--num-workers", int, "DataLoader workers per rank"),
    ("--open-shards", int, "shards each reader draws samples from at once"),
    ("--holdout", float, "share of source videos held out for evaluation when there is no val split"),
    ("--eval-batches", int, ""),
    ("--log-interval", int, ""),
    ("--eval-interval", int, ""),
    ("--ckpt-interval", int, ""),
    ("--image-tokenizer", str, "the dataset's image tokenizer (None: as dataset.json names)"),
    ("--text-tokenizer", str, "the dataset's text tokenizer (None: as dataset.json names)"),
)


def add_train(sub) -> None:
    s = command(sub, "train", "train the bundled CogVideo-style model on shards")
    s.add_argument("dataset", nargs="+", metavar="DATASET",
                   help="a dataset (a folder, s3:// or gs://); several are mixed, see --weights")
    s.add_argument("--weights", help="comma-separated shares of the datasets' samples, e.g. 0.7,0.3 (default: equal)")
    s.add_argument("--keep-last", dest="keep_checkpoints", type=int, metavar="N",
                   help=with_default("checkpoints kept (0: all)", TrainConfig, "keep_checkpoints"))
    s.add_argument("--out", required=True, metavar="RUN")
    s.add_argument("--phase", "--stage", dest="phase", choices=["image", "sequential", "interpolation"],
                   help=with_default("training phase", TrainConfig, "phase"))
    s.add_argument("--init-from", metavar="RUN", help="start from another run (e.g. the image phase's)")
    for flag, kind, help_ in TRAIN_FLAGS:
        s.add_argument(flag, type=kind, help=with_default(help_, TrainConfig, flag[2:].replace("-", "_")))
    s.add_argument("--grid-rope", action=argparse.BooleanOptionalAction, default=None,
                   help=with_default("a fresh model with 2D rotary embeddings of the code grid", TrainConfig,
                                     "grid_rope"))
    s.add_argument("--clip-modes", help="comma-separated clip modes to train on (default: all)")
    base = s.add_mutually_exclusive_group()
    base.add_argument("--freeze-base", action="store_true",
                   help="with --init-from an image-phase run: train only attention-plus, the mix vectors and the "
                        "new position tables (CogVideo's choice for large pretrained weights; default: the whole "
                        "model trains, the measured best from a clipforge image-phase run)")
    base.add_argument("--train-base", action="store_true",
                   help="train the whole model (the default; kept for older recipes)")
    s.add_argument("--joint-image", action=argparse.BooleanOptionalAction, default=None,
                   help="add the image-phase loss (text + frame 0, base channel) to every step (default: on when "
                        "the base trains and no image-phase --init-from run draws frame 0; docs/model.md)")
    s.add_argument("--record-keys", action="store_true", help="write RUN/keys/rankR.txt: the samples each rank used")
    s.add_argument("--resume", action="store_true",
                   help="continue RUN from its latest checkpoint with the configuration saved there")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the training run already in RUN (default: refuse to touch it)")
    s.add_argument("--fp32", action="store_true",
                   help="train in float32 even where bf16 autocast would run (cuda, cpus with native bf16)")


def add_sampling_flags(s) -> None:
    """`sample` and `eval-synth` draw codes the same way (CogVideo.generate), with SamplingConfig's defaults."""
    s.add_argument("--seed", type=int, help=with_default("", SamplingConfig, "seed"))
    s.add_argument("--guidance", type=float, help=with_default("classifier-free guidance scale", SamplingConfig,
                                                               "guidance"))
    s.add_argument("--temperature", type=float, help=with_default("", SamplingConfig, "temperature"))
    s.add_argument("--top-k", type=int, help=with_default("", SamplingConfig, "top_k"))
    s.add_argument("--top-p", type=float, help=with_default("nucleus sampling: keep the most probable codes "
                                                            "holding this share of the probability",
                                                            SamplingConfig, "top_p"))
    s.add_argument("--candidates", type=int, help=with_default(
        "sample N videos per caption and keep the one the model says the caption explains best: "
        "log p(video | caption) - log p(video | empty caption)", SamplingConfig, "candidates"))
    s.add_argument("--image-run", metavar="RUN",
                   help="draw frame 0 with this run's image phase (default: the image-phase run RUN started "
                        "from with --init-from, if any; 'none': RUN's own base channel; docs/model.md)")


def add_sample(sub) -> None:
    s = command(sub, "sample", "generate a video (mp4 or gif) from text")
    s.add_argument("run", metavar="RUN")
    s.add_argument("--prompt", required=True)
    s.add_argument("--out", required=True, metavar="FILE")
    add_sampling_flags(s)
    s.add_argument("--frames-out", type=int, help="frames to produce: 5, or 9/17/33 with interpolation rounds")
    s.add_argument("--interp-run", metavar="RUN", help="a run trained with --phase interpolation, for --frames-out > 5")
    s.add_argument("--fps", type=float, help="frame rate of the written video (default: the sampled rate)")


def add_eval_synth(sub) -> None:
    s = command(sub, "eval-synth", "score samples of RUN for the held-out captions of a synthetic corpus "
                "(colour, shape, direction), seen vs unseen combinations; JSON and a contact sheet")
    s.add_argument("run", metavar="RUN")
    s.add_argument("held_manifest", metavar="HELD_MANIFEST", help="manifest.parquet of `clipforge synth` (held out)")
    s.add_argument("--out", metavar="DIR", help="where to write scores.json and contact_sheet.png (default RUN/eval-synth)")
    s.add_argument("--limit", type=int, help="score the first N captions only")
    s.add_argument("--train-manifest", help="manifest the run trained on (default: the one its dataset names)")
    add_sampling_flags(s)
    s.add_argument("--device")


def add_demo(sub) -> None:
    s = command(sub, "demo", "the whole chain on a synthetic corpus, on this machine")
    s.add_argument("--out", default="demo-out", metavar="DIR")
    s.add_argument("--videos", type=int, default=1500, help="default: 1500")
    s.add_argument("--train-minutes", type=float, default=5.5,
                   help="both training phases together (default: 5.5)")
    s.add_argument("--candidates", type=int, default=4, help="videos drawn for the prompt, the best kept (default: 4)")


def add_export(sub) -> None:
    exp = sub.add_parser("export", help="write a dataset in another trainer's format", description="exports")
    formats = exp.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    s = command(formats, "cogvideo", "CogVideo's training rows (cogdata's int32 .bin) from a dataset built with "
                "icetk tokenizers", "export cogvideo")
    s.add_argument("dataset", metavar="DATASET", help="a built dataset (local or object storage)")
    s.add_argument("out", metavar="OUT.bin", help="local file; OUT.bin.json beside it describes the rows")
    s.add_argument("--text-len", type=int, default=64, help="text tokens per row (default: 64, cogdata's)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT.bin")
    s.add_argument("--endpoint", help=ENDPOINT_HELP)


COMMANDS = (add_synth, add_clips, add_captions, add_audit, add_tokenizer, add_build, add_reshard, add_gc,
            add_estimate, add_verify, add_export, add_train, add_sample, add_eval_synth, add_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipforge", description="Build tokenized text-to-video corpora "
                                "(CogVideo method) from raw videos and captions, and train on them.")
    sub = p.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return p
