"""Shard writing and resharding speed, against plain tar copies of the same bytes in the same run.

    python bench/shards.py [--samples 20000] [--per-shard 1000]

Writing: `ShardCommitter.write` (tar + index + ledger + stats, fsync and atomic renames) on token
samples of CogVideo's size (5×20×20 uint16 codes, a ~20-token caption, full metadata), one process.
Resharding: `reshard` with a shuffle and a validation split, and an unshuffled re-cut, against (a) a
member-by-member `tarfile` copy of the same tars, (b) a raw byte copy (`shutil.copyfile`, from the page
cache, no hash, no fsync) and (c) a verified copy (read, sha256, write, fsync: what a reshard must do
at the least), all in this run.
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize` for every script run from bench/:
# take the script's folder off the import path before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipforge.pipeline.storage.dataset import write_wids_index  # noqa: E402
from clipforge.jobs.reshard import ReshardConfig, reshard  # noqa: E402
from clipforge.pipeline.storage.fs import Location  # noqa: E402
from clipforge.pipeline.storage.shards import ShardCommitter, read_records, shard_urls, write_json  # noqa: E402

LAYOUT = {"frames": 5, "frame_size": 160, "tokens_h": 20, "tokens_w": 20, "text_slot": 64, "image_vocab": 20000}


def make_rows(n: int, start: int, rng) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        rows.append({
            "key": f"video{i:08d}_seq00", "status": "ok", "row_index": i, "clip_index": 0, "clips_total": 1,
            "video_id": f"video{i:08d}", "source": f"s3://bucket/videos/{i:08d}.mp4",
            "caption": "a red circle moves to the left across a dark background",
            "caption_raw": "a red circle moves to the left across a dark background", "caption_flags": [],
            "mode": "sequential", "rate": 1.0, "span": 4.0, "frame_indices": [12, 37, 62, 87, 112],
            "timestamps": [0.5, 1.5, 2.5, 3.5, 4.5], "crop": [280.0, 0.0, 720.0, 720.0], "decoder": "decord",
            "source_info": {"width": 1280, "height": 720, "fps": 25.0, "frames": 150, "duration": 6.0, "rotation": 0},
            "tokenizers": {"image": {"id": "vq", "sha256": "0" * 64}, "text": {"id": "spm", "sha256": "1" * 64}},
            "caption_tokens": 14, "caption_cut": False,
            "vtok": rng.integers(0, 20000, size=(5, 20, 20), dtype=np.uint16),
            "ttok": rng.integers(0, 8000, size=14, dtype=np.int32),
        })
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="clipforge-bench-"))
    try:
        ds = tmp / "ds"
        committer = ShardCommitter(ds, LAYOUT)
        shards = [make_rows(args.per_shard, s * args.per_shard, rng) for s in range(args.samples // args.per_shard)]
        t = time.perf_counter()
        for s, rows in enumerate(shards):
            committer.write(s, rows, inputs=len(rows))
        write_s = time.perf_counter() - t
        stats = read_records(ds)
        total_bytes = sum(s["bytes"] for s in stats)
        write_json(Location(ds), "dataset.json", {"layout": LAYOUT, "tokenizers": shards[0][0]["tokenizers"],
                                                  "funnel": {"samples": args.samples}})
        write_wids_index(Location(ds), stats)

        t = time.perf_counter()
        report = reshard([str(ds)], str(tmp / "re"), ReshardConfig(samples_per_shard=args.per_shard * 2, shuffle_seed=1,
                                                                   val_fraction=0.05), progress=False)
        reshard_s = time.perf_counter() - t

        t = time.perf_counter()   # a re-cut without shuffling: runs of samples copy with one read
        reshard([str(ds)], str(tmp / "recut"), ReshardConfig(samples_per_shard=args.per_shard * 2), progress=False)
        recut_s = time.perf_counter() - t

        tars = [Path(u) for u in shard_urls(ds)]
        (tmp / "tarcopy").mkdir()
        t = time.perf_counter()
        for tar in tars:   # member-by-member copy: read each member, write it to a new tar
            with tarfile.open(tar) as src, tarfile.open(tmp / "tarcopy" / tar.name, "w") as dst:
                for m in src:
                    dst.addfile(m, src.extractfile(m))
        tarcopy_s = time.perf_counter() - t
        (tmp / "bytecopy").mkdir()
        t = time.perf_counter()
        for tar in tars:
            shutil.copyfile(tar, tmp / "bytecopy" / tar.name)
        bytecopy_s = time.perf_counter() - t

        (tmp / "verifiedcopy").mkdir()
        t = time.perf_counter()   # what any verified copy must do: copy, sha256, fsync
        for tar in tars:
            h = hashlib.sha256()
            with open(tar, "rb") as src, open(tmp / "verifiedcopy" / tar.name, "wb") as dst:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
        verified_s = time.perf_counter() - t

        mb = total_bytes / 1e6
        print(json.dumps({
            "samples": args.samples, "bytes": total_bytes, "bytes_per_sample": round(total_bytes / args.samples),
            "write": {"seconds": round(write_s, 3), "samples_per_s": round(args.samples / write_s),
                      "mb_per_s": round(mb / write_s, 1)},
            "reshard": {"seconds": round(reshard_s, 3), "samples_per_s": round(args.samples / reshard_s),
                        "mb_per_s": round(mb / reshard_s, 1), "splits": report["splits"]},
            "recut_unshuffled": {"seconds": round(recut_s, 3), "samples_per_s": round(args.samples / recut_s),
                                 "mb_per_s": round(mb / recut_s, 1)},
            "tarfile_member_copy": {"seconds": round(tarcopy_s, 3), "mb_per_s": round(mb / tarcopy_s, 1)},
            "raw_byte_copy": {"seconds": round(bytecopy_s, 3), "mb_per_s": round(mb / bytecopy_s, 1)},
            "verified_copy_sha256_fsync": {"seconds": round(verified_s, 3), "mb_per_s": round(mb / verified_s, 1)},
            "reshard_vs_tarfile_copy": round(tarcopy_s / reshard_s, 3),
            "reshard_vs_raw_copy": round(bytecopy_s / reshard_s, 3),
            "recut_vs_raw_copy": round(bytecopy_s / recut_s, 3),
            "reshard_vs_verified_copy": round(verified_s / reshard_s, 3),
            "recut_vs_verified_copy": round(verified_s / recut_s, 3),
        }, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
