"""Does the build's driver stay small as the corpus grows, and how fast does one process commit shards?

Prints JSON:
- `driver`: peak RSS of a whole `build()` (in-process runner, so the driver also runs the shards) with
  light stand-in stages (no video: each input becomes one sample of random codes) at 10k, 100k and 1M
  manifest rows, each in a fresh process; `growth_mb_10k_to_1m` against the goal of < 300 MB.
- `commit`: samples/s of `ShardCommitter.write` (tar + index + ledger + record) in one process, with
  a baseline in the same run: writing the same tar bytes with a plain file write.

    .venv/bin/python bench/scale.py [--rows 10000,100000,1000000] [--dir /tmp/clipforge-bench-scale]
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
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def stand_in_stages(plan):
    """Each input becomes one sample of random codes: the driver and commit path without video."""
    layout = plan.layout
    shape = (layout["frames"], layout["tokens_h"], layout["tokens_w"])

    def make_samples(rows):
        for row in rows:
            rng = np.random.default_rng(row["row_index"])
            yield {**row, "key": f"{row['row_key']}_seq00", "clip_index": 0, "clips_total": 1, "mode": "sequential",
                   "rate": 1.0, "span": 4.0, "frame_indices": [0, 1, 2, 3, 4], "timestamps": [0.0, 1.0, 2.0, 3.0, 4.0],
                   "decoder": "none", "caption_raw": row.get("caption"),
                   "vtok": rng.integers(0, layout["image_vocab"], shape).astype(np.uint16),
                   "ttok": rng.integers(0, 300, 12).astype(np.int32),
                   "tokenizers": plan.tokenizer_ids}
    return [("stand_in", make_samples)]


def tokenizers(work: Path) -> tuple[Path, Path]:
    from clipforge.tokenizer.image_train import train_image_tokenizer
    from clipforge.tokenizer.text import train_text_tokenizer

    image, text = work / "vq", work / "text.model"
    if not image.exists():
        rng = np.random.default_rng(0)
        train_image_tokenizer(rng.integers(0, 255, (32, 64, 64, 3), dtype=np.uint8), image, preset="tiny", steps=1,
                              batch_size=8, log=None)
    if not text.exists():
        train_text_tokenizer([f"a red circle moves left {i}" for i in range(400)], text, vocab_size=100)
    return image, text


def manifest(work: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / f"manifest-{rows}.parquet"
    if not path.exists():
        writer = None
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            table = pa.table({"video": [f"/nonexistent/video{i}.mp4" for i in range(start, start + n)],
                              "caption": [f"a red circle moves left, take {i}" for i in range(start, start + n)]})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=65536)
        writer.close()
    return path


def driver_run(work: Path, rows: int) -> dict:
    """Runs in a fresh process: one build, then its own peak RSS."""
    from clipforge.jobs.build import BuildConfig, build, with_overrides

    image, text = tokenizers(work)
    out = work / f"ds-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    config = with_overrides(BuildConfig(), size=64, runner="local", text_slot=24)
    t = time.perf_counter()
    info = build(str(manifest(work, rows)), str(out), str(image), str(text), config, progress=False,
                 log=lambda *_: None, stage_factory=stand_in_stages)
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "samples": info["funnel"]["samples"], "seconds": round(seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def commit_rate(work: Path, shards: int = 40, per_shard: int = 64) -> dict:
    from clipforge.pipeline.storage.fs import Location
    from clipforge.pipeline.storage.shards import ShardCommitter

    layout = {"frames": 5, "frame_size": 160, "tokens_h": 20, "tokens_w": 20, "text_slot": 64, "image_vocab": 20000}
    rng = np.random.default_rng(0)
    rows = [[{"row_index": s * per_shard + i, "clip_index": 0, "key": f"v{s}_{i}_seq00", "video_id": f"v{s}_{i}",
              "row_id": f"r{s * per_shard + i}", "source": "/x.mp4", "caption": "a red circle moves left",
              "mode": "sequential", "rate": 1.0, "span": 4.0, "frame_indices": [0, 1, 2, 3, 4],
              "timestamps": [0.0, 1.0, 2.0, 3.0, 4.0], "decoder": "pyav",
              "vtok": rng.integers(0, 20000, (5, 20, 20)).astype(np.uint16),
              "ttok": rng.integers(0, 8000, 20).astype(np.int32)} for i in range(per_shard)] for s in range(shards)]
    out = work / "commit"
    shutil.rmtree(out, ignore_errors=True)
    committer = ShardCommitter(Location(out), layout)
    t = time.perf_counter()
    total_bytes = 0
    for s, shard_rows in enumerate(rows):
        total_bytes += committer.write(s, shard_rows, inputs=per_shard)["bytes"]
    ours = time.perf_counter() - t
    blob = os.urandom(total_bytes // shards)
    t = time.perf_counter()
    for s in range(shards):   # baseline: the same bytes, one plain write + fsync per shard
        with open(out / f"plain-{s}.tar", "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    plain = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    samples = shards * per_shard
    return {"samples": samples, "bytes_per_sample": total_bytes // samples,
            "samples_per_s": round(samples / ours, 1), "plain_write_samples_per_s": round(samples / plain, 1),
            "ratio_to_plain_write": round(plain / ours, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--dir", default="/tmp/clipforge-bench-scale")
    parser.add_argument("--driver-run", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if a.driver_run:
        print(json.dumps(driver_run(work, a.driver_run)))
        return
    tokenizers(work)
    runs = []
    for rows in [int(r) for r in a.rows.split(",")]:
        res = subprocess.run([sys.executable, __file__, "--dir", str(work), "--driver-run", str(rows)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    growth = runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"] if len(runs) > 1 else None
    print(json.dumps({"driver": runs, "growth_mb_first_to_last": growth,
                      "goal": "growth from 10k to 1M rows < 300 MB", "commit": commit_rate(work)}, indent=1))


if __name__ == "__main__":
    main()
