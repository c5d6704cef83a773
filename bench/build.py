"""Where does a build's time go? The whole build against its slowest stage alone, on the same videos.

Prints JSON with, on the same synthetic corpus (default 300 videos, 64 px, tiny tokenizer):
- `decode_alone`: `DecodeVideo` (isolated child, as in the build) over every input in one process;
- `tokenize_alone`: `TokenizeClips` over the decoded clips in one process;
- `build_local`: `clipforge build --runner local` (one process does everything, in shard tasks);
- `build_ray`: the Ray build on this machine, each shard task tokenizing in its own process;
- `build_ray_gpu_workers`: the Ray build with one declared GPU, so frames go to a tokenizer worker and
  each shard task keeps decoding while they are encoded (on a machine without CUDA the worker runs on
  CPU, sharing the cores with the decoders: the figure that matters comes from a GPU machine);
- per-stage seconds summed over shard tasks (manifest, captions, decode, transfer, tokenize, write)
  from the build's `progress.json`, and the ratios of each build's videos/s to its slowest stage's
  (decode alone times the CPU slots, or tokenize alone; goal ≥ 0.8), with the machine it ran on.

    .venv/bin/python bench/build.py [--videos 300] [--dir /tmp/clipforge-bench-build]
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize` for every script run from bench/:
# take the script's folder off the import path before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def prepare(work: Path, videos: int) -> tuple[Path, Path, Path]:
    from clipforge.pipeline.video.synth import COLORS, DIRECTIONS, SHAPES, SynthConfig, make_caption, render_frame, \
        write_synthetic_corpus
    from clipforge.tokenizer.image_train import train_image_tokenizer
    from clipforge.tokenizer.text import train_text_tokenizer

    manifest = work / "corpus" / "manifest.parquet"
    if not manifest.exists():
        # 10-second 320x240 videos: decoding one costs tens of milliseconds, so the build's fixed costs
        # (starting processes, loading tokenizers) do not hide its throughput as 96x64 ones did
        write_synthetic_corpus(work / "corpus", SynthConfig(videos=videos, seed=3, max_seconds=10.0,
                                                            sizes=((320, 240), (240, 320))))
    text = work / "text.model"
    if not text.exists():
        rng = np.random.default_rng(0)
        train_text_tokenizer([make_caption(c, s, d, rng) for c in COLORS for s in SHAPES for d in DIRECTIONS], text,
                             vocab_size=300)
    image = work / "vq"
    if not image.exists():
        rng = np.random.default_rng(0)
        frames = np.stack([render_frame("circle", rgb, (int(rng.integers(10, 54)), int(rng.integers(10, 54))), 10, 64,
                                        64, (20, 20, 30)) for rgb in list(COLORS.values()) * 4])
        train_image_tokenizer(frames, image, preset="tiny", steps=5, batch_size=8, log=None)
    return manifest, image, text


def stages_alone(manifest: Path, image: Path, text: Path, config) -> dict:
    from clipforge.pipeline.manifest import manifest_rows, read_manifest
    from clipforge.pipeline.schema import is_ok
    from clipforge.pipeline.chain import build_stages

    clean, decode, tokenize = build_stages(config, str(image), str(text))
    rows = list(clean(manifest_rows(read_manifest(str(manifest)))))
    decode([rows[0]]).__next__()   # the child's start-up is not decoding time
    t = time.perf_counter()
    clips = list(decode(iter(rows)))
    decode_s = time.perf_counter() - t
    decode.close()
    t = time.perf_counter()
    out = list(tokenize(iter(clips)))
    tokenize_s = time.perf_counter() - t
    return {"inputs": len(rows), "clips": sum(1 for c in clips if is_ok(c)), "samples": sum(1 for o in out if is_ok(o)),
            "decode_alone_s": round(decode_s, 3), "decode_alone_videos_per_s": round(len(rows) / decode_s, 2),
            "tokenize_alone_s": round(tokenize_s, 3), "tokenize_alone_videos_per_s": round(len(rows) / tokenize_s, 2)}


BENCH_MARKER = ".clipforge-bench-build"   # in --dir: the folder is this benchmark's, its datasets may be replaced


def bench_folder(work: Path) -> Path:
    """--dir, new or empty or one this benchmark made before (its marker); never a user's folder."""
    if work.exists() and any(work.iterdir()) and not (work / BENCH_MARKER).exists():
        raise SystemExit(f"{work} is not empty and not a folder bench/build.py made: pick another --dir")
    work.mkdir(parents=True, exist_ok=True)
    (work / BENCH_MARKER).write_text("made by bench/build.py: a rerun replaces its datasets here\n")
    return work


def run_build(manifest: Path, image: Path, text: Path, config, out: Path) -> dict:
    from clipforge.jobs.build import build

    if out.exists():   # only a dataset this benchmark built (in its own --dir) is replaced, never other files
        if not (out / "dataset.json").exists() or not (out.parent / BENCH_MARKER).exists():
            raise SystemExit(f"{out} exists and is not a dataset this benchmark built: pick another --dir")
        shutil.rmtree(out)
    t = time.perf_counter()
    info = build(str(manifest), str(out), str(image), str(text), config, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - t
    progress = json.loads((out / "progress.json").read_text())
    return {"seconds": round(seconds, 3), "videos_per_s": round(info["funnel"]["inputs"] / seconds, 2),
            "samples": info["funnel"]["samples"], "stage_seconds": progress["stage_seconds"],
            "processes": len(progress["workers"]["decode"]), "tokenizer_workers": progress["workers"]["tokenize"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--dir", default="/tmp/clipforge-bench-build-320")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    a = parser.parse_args()
    from clipforge.jobs.build import BuildConfig, with_overrides

    work = bench_folder(Path(a.dir))
    manifest, image, text = prepare(work, a.videos)
    config = with_overrides(BuildConfig(), size=64, text_slot=24, inputs_per_shard=16)
    alone = stages_alone(manifest, image, text, config)
    local = run_build(manifest, image, text, with_overrides(config, runner="local"), work / "ds-local")

    import platform

    import ray
    results = {}
    for name, gpus in (("build_ray", 0), ("build_ray_gpu_workers", 1)):
        t = time.perf_counter()
        ray.init(address="local", num_cpus=a.cpus, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False)   # never a test's cluster
        ray_start = time.perf_counter() - t
        results[name] = {**run_build(manifest, image, text, with_overrides(config, runner="ray"), work / f"ds-{name}"),
                         "ray_start_s": round(ray_start, 3)}
        ray.shutdown()
    decode_rate, tokenize_rate = alone["decode_alone_videos_per_s"], alone["tokenize_alone_videos_per_s"]
    # with every core decoding, the decode stage's ceiling is its one-process rate times the slots; on
    # one machine whose cores also tokenize, the ceiling of both together is their harmonic sum
    slowest = min(decode_rate * a.cpus, tokenize_rate * a.cpus)
    shared_cores = a.cpus / (1 / decode_rate + 1 / tokenize_rate)
    print(json.dumps({
        "videos": alone["inputs"], "cpus": a.cpus, "stages_alone_one_process": alone, "build_local": local,
        **results,
        "ceiling_videos_per_s": {"slowest_stage_on_all_cores": round(slowest, 3),
                                 "both_stages_sharing_the_cores": round(shared_cores, 3)},
        "ratio_local_to_one_core": round(local["videos_per_s"] / (1 / (1 / decode_rate + 1 / tokenize_rate)), 3),
        "ratio_ray_to_ceiling": {k: round(v["videos_per_s"] / shared_cores, 3) for k, v in results.items()},
        "goal": "each build >= 0.8x its ceiling",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "gpu": "none (declared GPUs run their worker on CPU)"},
        "load_average": os.getloadavg(),
    }, indent=1))


if __name__ == "__main__":
    main()
