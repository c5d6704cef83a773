"""The `clipforge` command: a thin layer that parses arguments and calls one job.

Every command accepts `--config FILE` (TOML or YAML) whose keys mirror its flags (dashes or
underscores); flags given on the command line win. Bad input exits non-zero with a one-line reason.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys

from clipforge.jobs.config_file import find_config_path, leaf_parser, load_config


# what a full disk, a quota, a read-only or too small filesystem say: the user's to fix, in one line
USER_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}


def _cmd_synth(a):
    from clipforge.pipeline.video.synth import SynthConfig, parse_combinations, parse_sizes, write_synthetic_corpus

    sizes = {"sizes": parse_sizes(a.sizes)} if a.sizes else {}
    config = SynthConfig(videos=a.videos, seed=a.seed, max_seconds=a.max_seconds, dirty_captions=a.dirty,
                         broken=a.broken, leave_out=parse_combinations(a.leave_out or ""),
                         only=parse_combinations(a.only or ""), cross_band=a.cross_band, **sizes)
    path = write_synthetic_corpus(a.out, config)
    print(json.dumps({"manifest": str(path), "videos": a.videos, "broken": a.broken}))


def _cmd_clips(a):
    from clipforge.jobs.clips import plan_video

    result = plan_video(a.video, out=a.out, size=a.size, frames=a.frames, mode=a.mode, trim=a.trim)
    print(json.dumps(result, indent=2))
    if result["failure"]:
        sys.exit(1)


def _cmd_captions_clean(a):
    from clipforge.pipeline.text.captions import clean_manifest

    print(json.dumps(clean_manifest(a.input, a.output), indent=2, default=str))


def _cmd_audit(a):
    from clipforge.pipeline.text.audit import audit

    summary = audit(a.input, a.out, text_tokenizer_path=a.text_tokenizer, slot=a.text_slot)
    print(json.dumps({"out": a.out, "captions": summary.get("captions", summary.get("rows"))}, default=str))


def _cmd_train_text(a):
    from clipforge.jobs.tokenizers import train_text

    train_text(a.input, a.out, vocab_size=a.vocab_size, overwrite=a.overwrite)


def _cmd_train_image(a):
    from clipforge.jobs.tokenizers import train_image

    result = train_image(a.input, a.out, preset=a.preset, steps=a.steps, batch_size=a.batch_size,
                         max_frames=a.max_frames, seed=a.seed, device=a.device, max_minutes=a.max_minutes,
                         resume=a.resume, lr=a.lr, overwrite=a.overwrite,
                         overrides={k: v for k, v in (("encoder_kernel", a.encoder_kernel), ("padding", a.padding))
                                    if v is not None})
    print(json.dumps(result, default=str))


def _cmd_eval_image(a):
    from clipforge.jobs.tokenizers import eval_image

    print(json.dumps(eval_image(a.checkpoint, a.input, a.out, max_frames=a.max_frames, device=a.device,
                                dtype=a.dtype, seed=a.seed), default=str))


def _cmd_build(a):
    from clipforge.jobs.build import BuildConfig, build, with_overrides

    config = with_overrides(BuildConfig(), size=a.size, frames=a.frames, mode=a.mode, trim=a.trim,
                            max_span=a.max_span, rates=_floats(a.rates), seed=a.seed,
                            inputs_per_shard=a.inputs_per_shard, text_slot=a.text_slot,
                            decode_timeout_s=a.decode_timeout, shard_tasks=a.shard_tasks,
                            shard_timeout_s=a.shard_timeout, commit_every_s=a.commit_every,
                            tokenize_batch=a.tokenize_batch, tokenize_workers=a.tokenize_workers,
                            tokenize_gpus=a.tokenize_gpus, tokenize_dtype=a.tokenize_dtype, runner=a.runner,
                            endpoint=a.endpoint)
    info = build(a.manifest, a.out, a.image_tokenizer, a.text_tokenizer, config, address=a.address,
                 resume=a.resume, retry_failed=a.retry_failed, take_over=a.take_over, progress=not a.quiet)
    print(json.dumps({"out": a.out, "funnel": info["funnel"]}, indent=2))
    if info["funnel"]["inputs"] and not info["funnel"]["samples"]:   # success is checked, never assumed
        sys.exit(f"clipforge: error: no input produced a sample; see the funnel above and {a.out}/ledger")


def _cmd_reshard(a):
    from clipforge.jobs.reshard import ReshardConfig, reshard

    config = ReshardConfig(samples_per_shard=a.samples_per_shard, bytes_per_shard=a.bytes_per_shard,
                           shuffle_seed=a.shuffle_seed, filter=a.filter, val_fraction=a.val_fraction,
                           val_seed=a.val_seed)
    print(json.dumps(reshard(a.inputs, a.output, config, progress=not a.quiet, address=a.address,
                             endpoint=a.endpoint, resume=a.resume, take_over=a.take_over), indent=2))


def _cmd_gc(a):
    from clipforge.pipeline.storage.commits import RunLease, collect_garbage
    from clipforge.pipeline.storage.dataset import DatasetInfo
    from clipforge.pipeline.storage.fs import Location

    dest = Location(a.dataset, a.endpoint)
    DatasetInfo.read(dest)   # a clipforge dataset, or a one-line refusal: never collect in a foreign folder
    with RunLease(dest, take_over=a.take_over, purpose="gc"):
        print(json.dumps(collect_garbage(dest, a.older_than, dry_run=a.dry_run), indent=2))


def _cmd_estimate(a):
    from clipforge.jobs.estimate import estimate
    from clipforge.pipeline.video.clips import ClipConfig

    clips = ClipConfig(size=a.size, frames=a.frames, mode=a.mode, trim=a.trim)
    print(json.dumps(estimate(a.manifest, sample=a.sample, seed=a.seed, clips=clips,
                              image_tokenizer=a.image_tokenizer, text_tokenizer=a.text_tokenizer,
                              workers=a.workers, gpus=a.gpus, cost_per_core_hour=a.cost_per_core_hour,
                              cost_per_gpu_hour=a.cost_per_gpu_hour), indent=2))


def _cmd_verify(a):
    from clipforge.jobs.verify import verify_dataset

    report = verify_dataset(a.dataset, address=a.address, endpoint=a.endpoint)
    if not report.get("shards") and report["problems"] and "dataset.json" in report["problems"][0]:
        sys.exit(f"clipforge: error: {report['problems'][0]}")   # not a dataset at all: one line
    print(json.dumps(report, indent=2, default=str))
    if report["problems"]:
        sys.exit(1)


def _cmd_train(a):
    import os

    from clipforge.model.train import TrainConfig, train

    given = {"lr": a.lr, "grad_accum": a.grad_accum, "global_batch": a.global_batch, "dropout": a.dropout,
             "weight_decay": a.weight_decay, "cond_drop": a.cond_drop, "log_interval": a.log_interval,
             "eval_interval": a.eval_interval, "ckpt_interval": a.ckpt_interval, "warmup_steps": a.warmup_steps,
             "freeze_base": False if a.train_base else None,
             "joint_image": a.joint_image}
    config = TrainConfig(stage=a.stage, steps=a.steps, max_minutes=a.max_minutes, batch_size=a.batch_size,
                         seed=a.seed, device=a.device, init_from=a.init_from, num_workers=a.num_workers, amp=not a.fp32,
                         record_keys=a.record_keys, image_tokenizer=a.image_tokenizer, text_tokenizer=a.text_tokenizer,
                         clip_modes=a.clip_modes.split(",") if a.clip_modes else None,
                         **{k: v for k, v in given.items() if v is not None},
                         **_model_overrides(a))
    summary = train(a.dataset, a.out, config, resume=a.resume, overwrite=a.overwrite)
    if summary.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))


def _cmd_eval_synth(a):
    from clipforge.jobs.eval_synth import eval_synth

    result = eval_synth(a.run, a.held_manifest, out=a.out, limit=a.limit, seed=a.seed, guidance=a.guidance,
                        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, candidates=a.candidates,
                        image_run=a.image_run, train_manifest=a.train_manifest,
                        device=a.device,
                        log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps(result["scores"], indent=2))


def _cmd_sample(a):
    from clipforge.model.sample import sample

    print(json.dumps(sample(a.run, a.prompt, a.out, seed=a.seed, guidance=a.guidance, temperature=a.temperature,
                            top_k=a.top_k, top_p=a.top_p, candidates=a.candidates, frames_out=a.frames_out, fps=a.fps,
                            interp_run=a.interp_run, image_run=a.image_run),
                     default=str))


def _cmd_demo(a):
    from clipforge.jobs.demo import run_demo

    run_demo(a.out, videos=a.videos, train_minutes=a.train_minutes, candidates=a.candidates)


def _floats(text):
    return tuple(float(x) for x in text.split(",")) if text else None


def _model_overrides(a) -> dict:
    given = {"n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head, "grid_rope": a.grid_rope}
    return {k: v for k, v in given.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipforge", description="Build tokenized text-to-video corpora "
                                "(CogVideo method) from raw videos and captions, and train on them.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name, fn, help_, parent=sub):
        s = parent.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", help="TOML or YAML file whose keys mirror this command's flags")
        s.set_defaults(fn=fn)
        return s

    s = cmd("synth", _cmd_synth, "write a synthetic corpus of real video files and OUT/manifest.parquet")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--videos", type=int, default=24, help="number of good videos (default 24)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-seconds", type=float, default=20.0, help="longest video, seconds (default 20)")
    s.add_argument("--dirty", type=float, default=0.0, help="fraction of captions made dirty (mojibake, HTML, URLs)")
    s.add_argument("--broken", type=int, default=0, help="extra broken rows (empty, truncated, not a video, missing)")
    s.add_argument("--leave-out", metavar="COMBOS",
                   help="comma-separated COLOR-SHAPE-DIRECTION combinations no video shows (e.g. red-square-left), "
                        "so a held-out corpus can test combinations never seen in training")
    s.add_argument("--only", metavar="COMBOS",
                   help="comma-separated COLOR-SHAPE-DIRECTION combinations: every video shows one of them "
                        "(a held-out corpus of exactly the combinations a training corpus left out)")
    s.add_argument("--sizes", metavar="WxH,...",
                   help="comma-separated frame sizes drawn from, e.g. 64x64,96x96 (default: five sizes, mostly "
                        "landscape; square ones keep whole paths through a centre-cropping build)")
    s.add_argument("--cross-band", type=float, default=1.0, metavar="F",
                   help="paths run within the middle fraction F of the frame across their direction (default 1: "
                        "anywhere the shape fits; the demo's 0.25 lets a shape's position tell its axis)")

    s = cmd("clips", _cmd_clips, "print the clip plan of one video as JSON; with --out, write its frames")
    s.add_argument("video", metavar="VIDEO")
    s.add_argument("--out", help="write each clip's frames as .npy and a contact-sheet PNG here")
    _add_clip_flags(s)

    cap = sub.add_parser("captions", help="caption tools", description="caption tools")
    capsub = cap.add_subparsers(dest="captions_command", metavar="ACTION", required=True)
    s = cmd("clean", _cmd_captions_clean, "clean a manifest's captions (keeps caption_raw, adds flags)", capsub)
    s.add_argument("input", metavar="IN")
    s.add_argument("output", metavar="OUT")

    s = cmd("audit", _cmd_audit, "caption-quality report of a manifest or a built dataset")
    s.add_argument("input", metavar="IN", help="a manifest file or a dataset directory")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--text-tokenizer", help="sentencepiece .model for token lengths")
    s.add_argument("--text-slot", type=int, default=64)

    tok = sub.add_parser("tokenizer", help="train and evaluate the tokenizers", description="tokenizers")
    toksub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    s = cmd("train-text", _cmd_train_text, "train the sentencepiece text tokenizer on cleaned captions", toksub)
    s.add_argument("input", metavar="IN", help="manifest")
    s.add_argument("--out", required=True, help="output .model file")
    s.add_argument("--vocab-size", type=int, default=8000)
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing tokenizer at --out (datasets built with it no longer match it)")
    s = cmd("train-image", _cmd_train_image, "train the VQ image tokenizer on frames sampled from a manifest", toksub)
    s.add_argument("input", metavar="IN", help="manifest")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--preset", choices=["tiny", "cogview2"], default="tiny")
    s.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's)")
    s.add_argument("--batch-size", type=int, help="frames per step (default: the preset's)")
    s.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    s.add_argument("--max-frames", type=int, default=4000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--max-minutes", type=float, help="wall-time budget of this run; stops, saves, resumable")
    s.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt (same settings)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing tokenizer in DIR (datasets built with it no longer match it)")
    s.add_argument("--encoder-kernel", type=int, choices=[1, 3],
                   help="1: each code is computed from its own patch only (default: the preset's, 3)")
    s.add_argument("--padding", choices=["zeros", "replicate"],
                   help="conv padding at the frame border; replicate: a flat frame is one code (default: zeros)")
    s = cmd("eval-image", _cmd_eval_image, "PSNR, SSIM, codebook usage and a round-trip contact sheet", toksub)
    s.add_argument("checkpoint", metavar="CKPT")
    s.add_argument("input", metavar="IN", help="manifest (frames the tokenizer never saw)")
    s.add_argument("--out", required=True, metavar="DIR", help="writes metrics.json and roundtrip.png")
    s.add_argument("--max-frames", type=int, default=512)
    s.add_argument("--seed", type=int, default=0, help="clip-sampling seed")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    s = cmd("build", _cmd_build, "the main job: a Ray pipeline from a manifest to token shards")
    s.add_argument("manifest", metavar="MANIFEST")
    s.add_argument("--out", required=True, metavar="DATASET")
    s.add_argument("--image-tokenizer", required=True, metavar="DIR")
    s.add_argument("--text-tokenizer", required=True, metavar="FILE")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    s.add_argument("--resume", action="store_true", help="keep committed shards, redo the rest")
    s.add_argument("--retry-failed", action="store_true", help="redo shards whose ledger has transient failures")
    s.add_argument("--inputs-per-shard", type=int)
    s.add_argument("--text-slot", type=int)
    s.add_argument("--decode-timeout", type=float, help="seconds per video before the decoder is killed")
    s.add_argument("--shard-tasks", type=int, help="shard tasks running at once (default: every free CPU)")
    s.add_argument("--shard-timeout", type=float,
                   help="seconds before a running shard task is cancelled and run again (default 3600)")
    s.add_argument("--take-over", action="store_true",
                   help="take the dataset's lease from a driver known to be dead, without waiting for it to expire")
    s.add_argument("--commit-every", type=float,
                   help="seconds between writes of the commit log (default 2; a crash redoes at most these)")
    s.add_argument("--tokenize-batch", type=int, help="clips per image-tokenizer call")
    s.add_argument("--tokenize-workers", type=int, help="GPU tokenizer workers (default: one per GPU share)")
    s.add_argument("--tokenize-gpus", type=float, help="GPU share of one tokenizer worker, e.g. 0.5 (default 1)")
    s.add_argument("--tokenize-dtype", choices=["float32", "bfloat16"],
                   help="encoder precision (recorded in dataset.json: bf16 can flip nearest-code ties)")
    s.add_argument("--endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    s.add_argument("--runner", choices=["ray", "local"])
    s.add_argument("--quiet", action="store_true")
    _add_clip_flags(s, defaults=False)

    s = cmd("reshard", _cmd_reshard, "merge/split/shuffle/filter datasets and split off a validation set")
    s.add_argument("inputs", nargs="+", metavar="IN", help="one or more datasets")
    s.add_argument("output", metavar="OUT")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--bytes-per-shard", type=int, help="close shards at this size instead")
    s.add_argument("--shuffle-seed", type=int, help="shuffle with this seed (default: keep the order)")
    s.add_argument("--filter", help='keep the samples this comparison of index columns selects, e.g. '
                   '"rate >= 1 and caption_tokens <= 64" (comparisons, in, and/or/not, parentheses only)')
    s.add_argument("--val-fraction", type=float, default=0.0, help="share of source videos held out")
    s.add_argument("--val-seed", type=int, default=0)
    s.add_argument("--address", help="Ray cluster address: write the output shards as Ray tasks there")
    s.add_argument("--endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    s.add_argument("--resume", action="store_true", help="continue a reshard that stopped part way")
    s.add_argument("--take-over", action="store_true", help="take the output's lease from a dead driver")
    s.add_argument("--quiet", action="store_true")

    s = cmd("gc", _cmd_gc, "remove attempt parts no committed record names, and nothing else")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--older-than", type=float, default=900.0,
                   help="only parts older than this many seconds (default 900: an attempt may still be writing)")
    s.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    s.add_argument("--take-over", action="store_true", help="take the dataset's lease from a dead driver")
    s.add_argument("--endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")

    s = cmd("estimate", _cmd_estimate, "pilot run on a sample, then time and cost for the full corpus")
    s.add_argument("manifest", metavar="MANIFEST")
    s.add_argument("--sample", type=int, default=50, help="pilot inputs (default 50)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-tokenizer", metavar="DIR", help="also time tokenization")
    s.add_argument("--text-tokenizer", metavar="FILE")
    s.add_argument("--workers", type=int, default=64, help="decode workers (CPU cores) to plan for")
    s.add_argument("--gpus", type=int, default=0)
    s.add_argument("--cost-per-core-hour", type=float, default=0.04)
    s.add_argument("--cost-per-gpu-hour", type=float, default=2.0)
    _add_clip_flags(s)

    s = cmd("verify", _cmd_verify, "check a dataset end to end")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--address", help="Ray cluster address: check the shards as Ray tasks there")
    s.add_argument("--endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")

    s = cmd("train", _cmd_train, "train the bundled CogVideo-style model on shards")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--out", required=True, metavar="RUN")
    s.add_argument("--stage", choices=["image", "sequential", "interpolation"], default="sequential")
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--max-minutes", type=float, default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device")
    s.add_argument("--init-from", metavar="RUN", help="start from another run (e.g. the image stage)")
    s.add_argument("--n-layer", type=int)
    s.add_argument("--n-embd", type=int)
    s.add_argument("--n-head", type=int)
    s.add_argument("--dropout", type=float, help="residual and MLP dropout (default 0.1 for a fresh model, "
                   "the --init-from run's otherwise; given, it replaces that run's)")
    s.add_argument("--grid-rope", action=argparse.BooleanOptionalAction, default=None,
                   help="a fresh model with 2D rotary embeddings of the code grid (default: on; docs/model.md)")
    s.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 fresh, 2e-4 with --init-from)")
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--cond-drop", type=float, help="caption dropout for classifier-free guidance (default 0.1)")
    s.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    s.add_argument("--global-batch", type=int, help="samples per optimizer step over all ranks (sets --grad-accum)")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    s.add_argument("--clip-modes", help="comma-separated clip modes to train on (default: all)")
    s.add_argument("--train-base", action="store_true",
                   help="with --init-from an image-stage run: train the whole model, not only attention-plus "
                        "(the base channel then also keeps training on frame 0 alone, unless --no-joint-image)")
    s.add_argument("--joint-image", action=argparse.BooleanOptionalAction, default=None,
                   help="add the image-stage loss (text + frame 0, base channel) to every step (default: on "
                        "whenever the base trains). Off is faster and helped a 3-minute run from an image-stage "
                        "run, but over 17 minutes the base channel forgot frame 0 (docs/model.md)")
    s.add_argument("--image-tokenizer", metavar="DIR", help="the dataset's image tokenizer (default: as dataset.json names)")
    s.add_argument("--text-tokenizer", metavar="FILE", help="the dataset's text tokenizer (default: as dataset.json names)")
    s.add_argument("--log-interval", type=int)
    s.add_argument("--eval-interval", type=int)
    s.add_argument("--ckpt-interval", type=int)
    s.add_argument("--record-keys", action="store_true", help="write RUN/keys/rankR.txt: the samples each rank used")
    s.add_argument("--resume", action="store_true",
                   help="continue RUN from its latest checkpoint with the configuration saved there")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the training run already in RUN (default: refuse to touch it)")
    s.add_argument("--fp32", action="store_true",
                   help="train in float32 even where bf16 autocast would run (cuda, cpus with native bf16)")

    s = cmd("sample", _cmd_sample, "generate a video (mp4 or gif) from text")
    s.add_argument("run", metavar="RUN")
    s.add_argument("--prompt", required=True)
    s.add_argument("--out", required=True, metavar="FILE")
    _add_sampling_flags(s)
    s.add_argument("--frames-out", type=int, help="frames to produce: 5, or 9/17/33 with interpolation rounds")
    s.add_argument("--interp-run", metavar="RUN", help="a run trained with --stage interpolation, for --frames-out > 5")
    s.add_argument("--fps", type=float, help="frame rate of the written video (default: the sampled rate)")

    s = cmd("eval-synth", _cmd_eval_synth, "score samples of RUN for the held-out captions of a synthetic corpus "
            "(colour, shape, direction), seen vs unseen combinations; JSON and a contact sheet")
    s.add_argument("run", metavar="RUN")
    s.add_argument("held_manifest", metavar="HELD_MANIFEST", help="manifest.parquet of `clipforge synth` (held out)")
    s.add_argument("--out", metavar="DIR", help="where to write scores.json and contact_sheet.png (default RUN/eval-synth)")
    s.add_argument("--limit", type=int, help="score the first N captions only")
    s.add_argument("--train-manifest", help="manifest the run trained on (default: the one its dataset names)")
    _add_sampling_flags(s)
    s.add_argument("--device")

    s = cmd("demo", _cmd_demo, "the whole chain on a synthetic corpus, on this machine")
    s.add_argument("--out", default="demo-out", metavar="DIR")
    s.add_argument("--videos", type=int, default=1500)
    s.add_argument("--train-minutes", type=float, default=5.5, help="both training stages together (default 5.5)")
    s.add_argument("--candidates", type=int, default=4, help="videos drawn for the prompt, the best kept (default 4)")
    return p


def _add_sampling_flags(s):
    """`sample` and `eval-synth` draw codes the same way (CogVideo.generate)."""
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    s.add_argument("--temperature", type=float, default=1.05)
    s.add_argument("--top-k", type=int, default=64)
    s.add_argument("--top-p", type=float, help="nucleus sampling: keep the most probable codes holding this "
                                               "share of the probability (default: off)")
    s.add_argument("--candidates", type=int, default=1,
                   help="sample N videos per caption and keep the one the model says the caption explains best: "
                        "log p(video | caption) - log p(video | empty caption) (default 1)")
    s.add_argument("--image-run", metavar="RUN",
                   help="draw frame 0 with this run's image stage (the image-stage run RUN started from), "
                        "for a sequential run whose base channel drifted (docs/model.md)")


def _add_clip_flags(s, defaults: bool = True):
    d = (lambda v: v) if defaults else (lambda v: None)
    s.add_argument("--size", type=int, default=d(160), help="output frame size (default 160)")
    s.add_argument("--frames", type=int, default=d(5), help="frames per sample (default 5)")
    s.add_argument("--mode", choices=["sequential", "interpolation", "both"], default=d("sequential"))
    s.add_argument("--trim", type=float, default=d(0.0), help="seconds dropped at both ends")
    if not defaults:
        s.add_argument("--max-span", type=float, help="longest sample span, seconds (default 16)")
        s.add_argument("--rates", help="comma-separated frame rates (default 0.25,0.5,1,2,4,8)")
        s.add_argument("--seed", type=int)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_path = find_config_path(argv)
    if config_path:   # file values become the command's defaults, so command-line flags still win
        leaf = leaf_parser(parser, argv)
        try:
            values = load_config(config_path)
        except (OSError, ValueError) as err:
            parser.exit(2, f"clipforge: error: --config {config_path}: {' '.join(str(err).split())}\n")
        actions = {a.dest: a for a in leaf._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.exit(2, f"clipforge: error: --config {config_path}: unknown key(s) {', '.join(unknown)}\n")
        for dest in values:
            actions[dest].required = False
            if not actions[dest].option_strings:   # a positional given by the file becomes optional
                actions[dest].nargs = "?"
        leaf.set_defaults(**values)
    args = parser.parse_args(argv)
    from clipforge.pipeline.errors import ClipforgeError
    from clipforge.pipeline.storage.commits import LeaseHeld, LeaseLost

    try:
        args.fn(args)
    except KeyboardInterrupt:
        parser.exit(130, "clipforge: interrupted\n")
    except OSError as err:
        if err.errno not in USER_ERRNOS and not isinstance(err, (FileNotFoundError, FileExistsError,
                                                                 PermissionError, IsADirectoryError,
                                                                 NotADirectoryError)):
            raise   # a bug or an unexpected system failure: keep the traceback
        where = f" ({err.filename})" if getattr(err, "filename", None) and str(err.filename) not in str(err) else ""
        parser.exit(2, f"clipforge: error: {' '.join(str(err).split())}{where}\n")
    except (ClipforgeError, ValueError, LeaseHeld, LeaseLost) as err:   # a KeyError is a bug: traceback
        message = " ".join(str(err).split()) or type(err).__name__
        parser.exit(2, f"clipforge: error: {message}\n")


if __name__ == "__main__":
    main()
