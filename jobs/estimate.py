"""`clipforge estimate MANIFEST`: a pilot run on a seeded sample, then time and cost for the whole corpus.

The pilot runs the build's own stages in this process (captions → decode → tokenize), one video at a
time, so the per-video CPU seconds it measures are what one decode worker spends; the estimate then
divides by the workers the user says they will have.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

from clipforge.pipeline.chain import BuildConfig, build_stages
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.manifest import manifest_rows, read_manifest
from clipforge.pipeline.schema import is_ok


def estimate(manifest: str, sample: int = 50, seed: int = 0, clips: ClipConfig = ClipConfig(),
             image_tokenizer: str | None = None, text_tokenizer: str | None = None, workers: int = 64,
             gpus: int = 0, cost_per_core_hour: float = 0.04, cost_per_gpu_hour: float = 2.0,
             bytes_per_sample: float | None = None, config: BuildConfig | None = None) -> dict:
    """`config` is the build's (its clip settings replaced by `clips`): the pilot runs its stages."""
    config = replace(config or BuildConfig(), clips=clips)
    stages = build_stages(config, image_tokenizer, text_tokenizer)
    clean, decode = stages[0], stages[1]
    tokenize = stages[2] if len(stages) > 2 else None
    df = read_manifest(manifest)
    pilot = df.sample(n=min(sample, len(df)), random_state=seed) if len(df) > sample else df
    rows = list(clean(manifest_rows(pilot.reset_index(drop=True))))
    reasons: Counter = Counter()
    clip_rows, t0 = [], time.perf_counter()
    try:
        for row in rows:
            for out in decode([row]):
                (clip_rows.append(out) if is_ok(out) else reasons.update([out["reason"]]))
    finally:
        decode.close()
    decode_s = time.perf_counter() - t0
    tokenize_s = None
    if tokenize is not None and clip_rows:
        t1 = time.perf_counter()
        tokenized = list(tokenize(iter(clip_rows)))
        tokenize_s = time.perf_counter() - t1
        if bytes_per_sample is None and tokenized:
            ok = [r for r in tokenized if is_ok(r)]
            bytes_per_sample = sum(r["vtok"].nbytes + r["ttok"].nbytes for r in ok) / max(1, len(ok)) + 2048
    n, total = len(rows), len(df)
    clips_per_video = len(clip_rows) / max(1, n)
    decode_core_s = decode_s / max(1, n) * total
    tok_s = (tokenize_s / max(1, len(clip_rows)) * clips_per_video * total) if tokenize_s is not None else None
    wall_decode_h = decode_core_s / max(1, workers) / 3600
    # tokenization runs beside decoding: on GPUs it overlaps, on CPUs it needs its own cores
    wall_tok_h = (tok_s / 3600 / max(1, gpus)) if (tok_s is not None and gpus) else \
                 ((tok_s / 3600 / max(1, workers)) if tok_s is not None else 0.0)
    wall_h = max(wall_decode_h, wall_tok_h) if gpus else wall_decode_h + wall_tok_h
    samples = clips_per_video * total
    return {
        "manifest": str(manifest), "inputs": total, "pilot_inputs": n,
        "pilot": {"decode_seconds": round(decode_s, 3), "tokenize_seconds": tokenize_s,
                  "clips": len(clip_rows), "failures": dict(reasons)},
        "per_video_decode_seconds": round(decode_s / max(1, n), 4),
        "failure_rate": round(sum(reasons.values()) / max(1, n), 4),
        "expected_samples": int(round(samples)),
        "expected_bytes": int(samples * bytes_per_sample) if bytes_per_sample else None,
        "core_hours": round((decode_core_s + (0 if gpus else (tok_s or 0))) / 3600, 6),
        "gpu_hours": round(wall_tok_h * max(1, gpus), 3) if gpus else 0.0,
        "wall_hours": round(wall_h, 6), "workers": workers, "gpus": gpus,
        "cost": round(wall_h * workers * cost_per_core_hour + wall_h * gpus * cost_per_gpu_hour, 2),
        "assumptions": {"cost_per_core_hour": cost_per_core_hour, "cost_per_gpu_hour": cost_per_gpu_hour,
                        "note": "linear in inputs; the pilot is a seeded random sample of the manifest"},
    }
