"""Peak memory of the build driver's manifest pass, against the old id check, in the same run.

    python bench/manifest.py [--rows 5400000] [--rows-per-shard 64]

Writes a Parquet manifest (video "s3://bucket/videos/000123456.mp4", a ~60-character caption, a unique
string id; pyarrow's default row groups of 1,048,576 rows) in a temporary folder, chunk by chunk. Then,
each in a fresh subprocess so that its peak RSS (getrusage ru_maxrss) is its own:
(a) the driver: `count_rows` + `check_unique_ids` + one full pass of `iter_shard_slices`, every slice
    built and dropped;
(b) the old id check, as `check_unique_ids` was before streaming: the whole `id` column read with
    pyarrow, then `pyarrow.compute.value_counts` and its `to_pylist()`.
Prints one JSON object; `import_rss_mb` is each child's RSS after its imports (the floor of both);
`vm_hwm_mb` (/proc VmHWM) cross-checks ru_maxrss.
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
import subprocess
import tempfile
import time
from pathlib import Path

GOAL_MB = 1000
WORDS = ("a red square moves slowly to the left across a plain grey background while "
         "the camera holds still").split()


def _rss_mb() -> float:
    """Current RSS from /proc (Linux), else the peak so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_mb()


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


def write_manifest(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    group = 1 << 20   # pyarrow's default row group; one write per group, so the groups are full
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("video", pa.string()), ("caption", pa.string()),
                                           ("id", pa.string())])) as writer:
        for start in range(0, rows, group):
            idx = range(start, min(rows, start + group))
            picks = rng.integers(0, len(WORDS), size=(len(idx), 4))
            captions = [f"clip {i:09d}: {WORDS[a]} {WORDS[b]} {WORDS[c]} {WORDS[d]} shape moving on grey"[:60]
                        for i, (a, b, c, d) in zip(idx, picks.tolist())]
            writer.write_table(pa.table({
                "video": [f"s3://bucket/videos/{i:09d}.mp4" for i in idx],
                "caption": captions,
                "id": [f"vid-{i:09d}-{(i * 2654435761) % 1000003:07d}" for i in idx],
            }))


def child_driver(path: str, rows_per_shard: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clipforge.pipeline.manifest import check_unique_ids, count_rows, iter_shard_slices

    base = _rss_mb()
    times = {}
    t0 = time.perf_counter()
    rows, columns = count_rows(path)
    times["count_rows_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    check_unique_ids(path)
    times["check_unique_ids_s"] = time.perf_counter() - t
    peak_after_ids = _peak_mb()
    t = time.perf_counter()
    shards = seen = 0
    for _k, start, stop, df in iter_shard_slices(path, rows_per_shard):
        assert len(df) == stop - start
        shards += 1
        seen += len(df)
        del df
    times["iter_shard_slices_s"] = time.perf_counter() - t
    assert seen == rows, (seen, rows)
    return {"rows": rows, "columns": columns, "shards": shards, "import_rss_mb": base,
            "peak_rss_after_id_check_mb": peak_after_ids, "peak_rss_mb": _peak_mb(), "vm_hwm_mb": _hwm_mb(),
            "seconds": time.perf_counter() - t0, **times}


def child_old(path: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    base = _rss_mb()
    t0 = time.perf_counter()
    with open(path, "rb") as f:   # the body of check_unique_ids before streaming
        ids = pq.read_table(f, columns=["id"])["id"]
    ids = pc.drop_null(ids.cast("string"))
    counts = pc.value_counts(ids)
    dupes = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:3]
    assert not dupes
    return {"import_rss_mb": base, "peak_rss_mb": _peak_mb(), "vm_hwm_mb": _hwm_mb(),
            "seconds": time.perf_counter() - t0}


def child_write(path: str, rows: int) -> dict:
    import pyarrow.parquet as pq

    t = time.perf_counter()
    write_manifest(Path(path), rows)
    meta = pq.ParquetFile(path).metadata
    return {"seconds": time.perf_counter() - t,
            "row_groups": [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]}


def _hwm_mb() -> float | None:
    """VmHWM: this process's own peak RSS (Linux), a cross-check of ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5_400_000)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, path = a.child[0], a.child[1]
        out = child_driver(path, a.rows_per_shard) if kind == "driver" else \
            child_write(path, a.rows) if kind == "write" else child_old(path)
        print(json.dumps(out))
        return
    # Linux carries a parent's peak RSS into its children's ru_maxrss (the exec'd-over memory's high
    # water mark is kept), so this process writes nothing and imports neither pandas nor pyarrow: the
    # manifest is written by a child of its own, and every child starts from this process's few MB.
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        path = Path(tmp) / "manifest.parquet"
        written = _run_child("write", str(path), "--rows", str(a.rows))
        driver = _run_child("driver", str(path), "--rows-per-shard", str(a.rows_per_shard))
        old = _run_child("old", str(path))
        size_mb = path.stat().st_size / 2**20
    groups = written["row_groups"]
    print(json.dumps({
        "rows": driver["rows"], "rows_per_shard": a.rows_per_shard, "shards": driver["shards"],
        "row_groups": len(groups), "largest_row_group": max(groups), "manifest_mb": round(size_mb, 1),
        "driver_peak_rss_mb": round(driver["peak_rss_mb"], 1),
        "driver_peak_rss_after_id_check_mb": round(driver["peak_rss_after_id_check_mb"], 1),
        "old_id_check_peak_rss_mb": round(old["peak_rss_mb"], 1),
        "vm_hwm_mb": {"driver": driver["vm_hwm_mb"] and round(driver["vm_hwm_mb"], 1),
                      "old": old["vm_hwm_mb"] and round(old["vm_hwm_mb"], 1)},
        "import_rss_mb": {"driver": round(driver["import_rss_mb"], 1), "old": round(old["import_rss_mb"], 1)},
        "parent_peak_rss_mb": round(_peak_mb(), 1),
        "seconds": round(driver["seconds"], 2),
        "seconds_by_step": {k: round(driver[k], 2) for k in ("count_rows_s", "check_unique_ids_s",
                                                            "iter_shard_slices_s")},
        "old_id_check_seconds": round(old["seconds"], 2), "write_seconds": round(written["seconds"], 1),
        "goal_mb": GOAL_MB,
    }))


if __name__ == "__main__":
    main()
