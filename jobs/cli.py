"""The `clipforge` command: a thin layer that parses arguments and calls one job.

Every command accepts `--config FILE` (TOML or YAML) whose keys mirror its flags (dashes or
underscores); flags given on the command line win. Bad input exits non-zero with a one-line reason.
"""
from __future__ import annotations

import errno
import json
import sys

from clipforge.jobs.cli_args import build_parser
from clipforge.jobs.config_file import find_config_path, leaf_parser, load_config


# what a full disk, a quota, a read-only or too small filesystem say: the user's to fix, in one line
USER_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}


def given(a, *same, **names) -> dict:
    """{field: value} of the flags the user gave (not None): `same` are fields named as their flag's dest,
    `names` maps a field to its flag's dest."""
    pairs = {**{field: field for field in same}, **names}
    return {field: getattr(a, dest) for field, dest in pairs.items() if getattr(a, dest) is not None}


CLIP_FLAGS = ("size", "frames", "mode", "trim")                       # ClipConfig fields, same-named flags
SAMPLING_FLAGS = ("seed", "guidance", "temperature", "top_k", "top_p", "candidates")   # SamplingConfig's


def _cmd_synth(a):
    from clipforge.pipeline.video.synth import SynthConfig, parse_combinations, parse_sizes, write_synthetic_corpus

    config = SynthConfig(**given(a, "videos", "seed", "max_seconds", "broken", "cross_band", dirty_captions="dirty"),
                         **({"sizes": parse_sizes(a.sizes)} if a.sizes else {}),
                         leave_out=parse_combinations(a.leave_out or ""), only=parse_combinations(a.only or ""))
    path = write_synthetic_corpus(a.out, config)
    print(json.dumps({"manifest": str(path), "videos": config.videos, "broken": config.broken}))


def _cmd_clips(a):
    from clipforge.jobs.clips import plan_video

    result = plan_video(a.video, out=a.out, **given(a, *CLIP_FLAGS))
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
    from clipforge.jobs.cli_args import BUILD_FLAGS

    config = with_overrides(BuildConfig(), rates=_floats(a.rates), endpoint=a.endpoint,
                            **given(a, *CLIP_FLAGS, "max_span", "seed"),
                            **given(a, **{name: flag[2:].replace("-", "_") for flag, name, _, _ in BUILD_FLAGS}))
    info = build(a.manifest, a.out, a.image_tokenizer, a.text_tokenizer, config, address=a.address,
                 resume=a.resume, retry_failed=a.retry_failed, take_over=a.take_over, progress=not a.quiet)
    print(json.dumps({"out": a.out, "funnel": info["funnel"]}, indent=2))
    if info["funnel"]["inputs"] and not info["funnel"]["samples"]:   # success is checked, never assumed
        sys.exit(f"clipforge: error: no input produced a sample; see the funnel above and {a.out}/ledger")


def _cmd_reshard(a):
    from clipforge.jobs.reshard import ReshardConfig, reshard

    config = ReshardConfig(bytes_per_shard=a.bytes_per_shard, shuffle_seed=a.shuffle_seed, filter=a.filter,
                           **given(a, "samples_per_shard", "val_fraction", "val_seed"))
    print(json.dumps(reshard(a.inputs, a.output, config, progress=not a.quiet, address=a.address,
                             endpoint=a.endpoint, resume=a.resume, take_over=a.take_over), indent=2))


def _cmd_gc(a):
    from clipforge.pipeline.storage.commits import RunLease, collect_garbage
    from clipforge.pipeline.storage.dataset import DatasetInfo
    from clipforge.pipeline.chain import BuildConfig
    from clipforge.pipeline.storage.fs import Location

    dest = Location(a.dataset, a.endpoint)
    older_than = BuildConfig.gc_grace_s if a.older_than is None else a.older_than
    DatasetInfo.read(dest)   # a clipforge dataset, or a one-line refusal: never collect in a foreign folder
    with RunLease(dest, take_over=a.take_over, purpose="gc"):
        print(json.dumps(collect_garbage(dest, older_than, dry_run=a.dry_run), indent=2))


def _cmd_estimate(a):
    from clipforge.jobs.estimate import estimate
    from clipforge.pipeline.video.clips import ClipConfig

    clips = ClipConfig(**given(a, *CLIP_FLAGS))
    print(json.dumps(estimate(a.manifest, sample=a.sample, seed=a.seed, clips=clips,
                              image_tokenizer=a.image_tokenizer, text_tokenizer=a.text_tokenizer,
                              workers=a.workers, gpus=a.gpus, cost_per_core_hour=a.cost_per_core_hour,
                              cost_per_gpu_hour=a.cost_per_gpu_hour), indent=2))


def _cmd_verify(a):
    from clipforge.jobs.verify import verify_dataset

    if a.export:
        from clipforge.jobs.export import verify_export

        report = verify_export(a.dataset, a.export, endpoint=a.endpoint)
        print(json.dumps(report, indent=2, default=str))
        if report["problems"]:
            sys.exit(1)
        return
    report = verify_dataset(a.dataset, address=a.address, endpoint=a.endpoint)
    if not report.get("shards") and report["problems"] and "dataset.json" in report["problems"][0]:
        sys.exit(f"clipforge: error: {report['problems'][0]}")   # not a dataset at all: one line
    print(json.dumps(report, indent=2, default=str))
    if report["problems"]:
        sys.exit(1)


def _cmd_export_cogvideo(a):
    from clipforge.jobs.export import export_cogvideo

    print(json.dumps(export_cogvideo(a.dataset, a.out, text_len=a.text_len, overwrite=a.overwrite,
                                     endpoint=a.endpoint), indent=2))


def _cmd_train(a):
    import os

    from clipforge.jobs.cli_args import TRAIN_FLAGS
    from clipforge.model.config import TrainConfig
    from clipforge.model.train import train

    config = TrainConfig(**given(a, "phase", "init_from", "grid_rope", "joint_image", "keep_checkpoints",
                                 *(flag[2:].replace("-", "_") for flag, _, _ in TRAIN_FLAGS)),
                         **({"weights": list(_floats(a.weights))} if a.weights else {}),
                         **({"freeze_base": True} if a.freeze_base else {}),
                         **({"clip_modes": a.clip_modes.split(",")} if a.clip_modes else {}),
                         amp=not a.fp32, record_keys=a.record_keys)
    summary = train(a.dataset, a.out, config, resume=a.resume, overwrite=a.overwrite)
    if summary.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))


def _cmd_eval_synth(a):
    from clipforge.jobs.eval_synth import eval_synth

    result = eval_synth(a.run, a.held_manifest, out=a.out, limit=a.limit, image_run=a.image_run,
                        train_manifest=a.train_manifest, device=a.device, log=lambda msg: print(msg, file=sys.stderr),
                        **given(a, *SAMPLING_FLAGS))
    print(json.dumps(result["scores"], indent=2))


def _cmd_sample(a):
    from clipforge.model.sample import sample

    print(json.dumps(sample(a.run, a.prompt, a.out, frames_out=a.frames_out, fps=a.fps, interp_run=a.interp_run,
                            image_run=a.image_run, **given(a, *SAMPLING_FLAGS)),
                     default=str))


def _cmd_demo(a):
    from clipforge.jobs.demo import run_demo

    run_demo(a.out, videos=a.videos, train_minutes=a.train_minutes, candidates=a.candidates)


def _floats(text):
    return tuple(float(x) for x in text.split(",")) if text else None


HANDLERS = {"synth": _cmd_synth, "clips": _cmd_clips, "captions clean": _cmd_captions_clean, "audit": _cmd_audit,
            "tokenizer train-text": _cmd_train_text, "tokenizer train-image": _cmd_train_image,
            "tokenizer eval-image": _cmd_eval_image, "build": _cmd_build, "reshard": _cmd_reshard, "gc": _cmd_gc,
            "estimate": _cmd_estimate, "verify": _cmd_verify, "train": _cmd_train, "eval-synth": _cmd_eval_synth,
            "sample": _cmd_sample, "demo": _cmd_demo, "export cogvideo": _cmd_export_cogvideo}


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

    try:
        HANDLERS[args.command](args)
    except KeyboardInterrupt:
        parser.exit(130, "clipforge: interrupted\n")
    except OSError as err:
        if err.errno not in USER_ERRNOS and not isinstance(err, (FileNotFoundError, FileExistsError,
                                                                 PermissionError, IsADirectoryError,
                                                                 NotADirectoryError)):
            raise   # a bug or an unexpected system failure: keep the traceback
        where = f" ({err.filename})" if getattr(err, "filename", None) and str(err.filename) not in str(err) else ""
        parser.exit(2, f"clipforge: error: {' '.join(str(err).split())}{where}\n")
    except ClipforgeError as err:   # the user's to fix; anything else is a bug and keeps its traceback
        message = " ".join(str(err).split()) or type(err).__name__
        parser.exit(2, f"clipforge: error: {message}\n")


if __name__ == "__main__":
    main()
