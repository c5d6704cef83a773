"""Decode + sample throughput per core against `ffmpeg -threads 1` and a naive PyAV decode, same files.

    python bench/decode.py [--videos DIR] [--mode sequential|interpolation|both] [--size 160]

Files: every video under --videos (default: ../shared/data/videos when present, else a synthetic corpus
written here). Files that none of the three can decode are left out of the comparison (listed).
All three run single-threaded in this process or one child, so files/s is per core.

Amplification is frames decoded ÷ frames emitted. The PyAV path counts the frames it decodes exactly;
decord does not expose its count, so for decord the GOP minimum is reported (the frames from the key
frame before each planned frame, shared inside a GOP) next to the measured PyAV-path figure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipforge.pipeline.video.clips import ClipConfig  # noqa: E402
from clipforge.pipeline.video.admit import DecodeFailure  # noqa: E402
from clipforge.pipeline.video.decode import (ClockMismatch, PyAVReader, decode_video,  # noqa: E402
                                             demux_timeline, probe)

VIDEO_EXT = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".ogg", ".mpg", ".mpeg", ".flv"}


def gop_minimum(reader: PyAVReader, wanted: list[int]) -> int:
    """Frames a decoder must decode to produce `wanted`: from each target's key frame, shared per GOP."""
    import bisect
    decoded, position = 0, -1
    for target in sorted(set(wanted)):
        key = reader.key_index[max(0, bisect.bisect_right(reader.key_index, target) - 1)]
        start = position + 1 if key <= position else key
        decoded += target - start + 1
        position = target
    return decoded


def ours(files, config):
    out = {"files": 0, "seconds": 0.0, "frames_emitted": 0, "decoders": {}, "clocks": {}, "failed": []}
    for f in files:
        t = time.perf_counter()
        try:
            res = decode_video(str(f), config, f.stem)
        except DecodeFailure as err:
            out["failed"].append(f"{f.name}: {err.reason}")
            continue
        out["seconds"] += time.perf_counter() - t
        out["files"] += 1
        out["frames_emitted"] += sum(len(c["frames"]) for c in res["clips"])
        out["decoders"][res["decoder"]] = out["decoders"].get(res["decoder"], 0) + 1
        out["clocks"][res["clock"]] = out["clocks"].get(res["clock"], 0) + 1
    return out


def amplification(files, config):
    """Exact counts through the PyAV path, and the GOP minimum for the same plans."""
    from clipforge.pipeline.video.clips import plan_clips, resize_for_short_side
    decoded = minimum = emitted = 0
    for f in files:
        try:
            facts = probe(str(f))
            w, h = resize_for_short_side(facts["width"], facts["height"], facts["sar"], facts["rotation"], config.size)
            timeline = demux_timeline(str(f), facts["stream_index"], facts["fps"], facts["duration"])
            reader = PyAVReader(str(f), facts["stream_index"], w, h, timeline)
            plans = plan_clips(timeline.pts, timeline.frame_end, config, key=f.stem, source_fps=facts["fps"])
            wanted = sorted({i for p in plans for i in p.frame_indices})
            if not wanted:
                continue
            reader.read(wanted)
        except (DecodeFailure, ClockMismatch):   # files off the demux clock are left out of this figure
            continue
        decoded += reader.frames_decoded
        minimum += gop_minimum(reader, wanted)
        emitted += sum(len(p.frame_indices) for p in plans)
    return {"frames_decoded": decoded, "gop_minimum": minimum, "frames_emitted": emitted,
            "amplification": round(decoded / max(1, emitted), 3),
            "gop_minimum_amplification": round(minimum / max(1, emitted), 3),
            "ratio_to_minimum": round(decoded / max(1, minimum), 3)}


def ffmpeg_full(files):
    if not shutil.which("ffmpeg"):
        return None
    out = {"files": 0, "seconds": 0.0, "failed": []}
    for f in files:
        t = time.perf_counter()
        res = subprocess.run(["ffmpeg", "-v", "error", "-threads", "1", "-i", str(f), "-map", "0:v:0", "-f", "null", "-"],
                             capture_output=True)
        dt = time.perf_counter() - t
        if res.returncode:
            out["failed"].append(f.name)
            continue
        out["files"] += 1
        out["seconds"] += dt
    return out


def pyav_everything(files, size):
    import av
    out = {"files": 0, "seconds": 0.0, "frames": 0, "failed": []}
    for f in files:
        t = time.perf_counter()
        try:
            with av.open(str(f)) as c:
                s = c.streams.video[0]
                s.thread_count = 1
                for frame in c.decode(s):
                    frame.to_ndarray(format="rgb24")
                    out["frames"] += 1
        except Exception:   # noqa: BLE001
            out["failed"].append(f.name)
            continue
        out["files"] += 1
        out["seconds"] += time.perf_counter() - t
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos")
    ap.add_argument("--mode", default="sequential")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=1, help="passes over the files (timings summed)")
    args = ap.parse_args()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
    root = Path(args.videos) if args.videos else (shared if shared.exists() else None)
    if root is None:
        from clipforge.pipeline.video.synth import SynthConfig, write_synthetic_corpus
        root = Path(tempfile.mkdtemp()) / "corpus"
        write_synthetic_corpus(root, SynthConfig(videos=24, max_seconds=20))
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXT and p.stat().st_size > 0)
    config = ClipConfig(mode=args.mode, size=args.size)
    # the comparison uses the files every contender could decode
    ff = ffmpeg_full(files)
    ours_first = ours(files, config)
    bad = {s.split(":")[0] for s in ours_first["failed"]} | set(ff["failed"] if ff else [])
    common = [f for f in files if f.name not in bad]
    runs = {"ours": [], "ffmpeg": [], "pyav": []}
    for _ in range(args.repeat):
        runs["ours"].append(ours(common, config))
        if ff is not None:
            runs["ffmpeg"].append(ffmpeg_full(common))
        runs["pyav"].append(pyav_everything(common, args.size))

    def rate(rs):
        if not rs:
            return None
        secs = sum(r["seconds"] for r in rs)
        return {"files": rs[0]["files"], "seconds": round(secs, 3), "files_per_s_per_core": round(sum(r["files"] for r in rs) / secs, 3)}

    result = {
        "files": len(common), "left_out": sorted(bad), "mode": args.mode, "size": args.size,
        "ours": rate(runs["ours"]) | {"frames_emitted": runs["ours"][0]["frames_emitted"], "decoders": runs["ours"][0]["decoders"]},
        "ffmpeg_threads1_full_decode": rate(runs["ffmpeg"]),
        "pyav_decode_everything": rate(runs["pyav"]),
        "amplification_pyav_path": amplification(common, config),
    }
    if result["ffmpeg_threads1_full_decode"]:
        result["ours_vs_ffmpeg"] = round(result["ours"]["files_per_s_per_core"] / result["ffmpeg_threads1_full_decode"]["files_per_s_per_core"], 3)
    result["ours_vs_pyav"] = round(result["ours"]["files_per_s_per_core"] / result["pyav_decode_everything"]["files_per_s_per_core"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
