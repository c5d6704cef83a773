"""Does a shard task stay small? The extra RSS of one shard task's 64 manifest rows, each number from a
fresh process: the slice shipped as Arrow IPC bytes in the task's descriptor (`iter_shard_slices` on the
driver, then read back + `manifest_rows` in the task) against the old way (the task reads the manifest's
row group with `ParquetFile.read_row_group` and slices 64 rows), on a 1,048,576-row manifest in one row
group. Goal: < 50 MB. Prints one JSON object.

    .venv/bin/python bench/task_memory.py [--dir /tmp]
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
import subprocess
import tempfile
import time

PER_SHARD = 64
MANIFEST_ROWS = 1 << 20


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    try:   # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_prepare(work: str) -> dict:
    """Fresh process: the manifest (one row group) and the first 64-row slice as Arrow IPC bytes, the size
    of what the driver ships."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.pipeline.manifest import iter_shard_slices

    path = os.path.join(work, "manifest.parquet")
    n = MANIFEST_ROWS
    table = pa.table({"video": [f"/data/videos/clip{i:08d}.mp4" for i in range(n)],
                      "caption": [f"a red circle moves slowly left across a grey field, take {i:07d}" for i in range(n)],
                      "id": [f"id{i:08d}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=n)
    del table
    groups = pq.ParquetFile(path).metadata.num_row_groups
    pa.default_memory_pool().release_unused()
    before, peak_reset = rss_mb(), reset_peak()
    t = time.perf_counter()
    slices = iter_shard_slices(path, PER_SHARD)
    shard, start, stop, df = next(slices)
    slices.close()
    first_slice_s = time.perf_counter() - t
    driver_peak = round(rss_mb("VmHWM") - before, 1) if peak_reset else None
    blob = arrow_bytes(df)
    with open(os.path.join(work, f"slice-{start}.arrow"), "wb") as f:
        f.write(blob)
    return {"path": path, "rows": n, "row_groups": groups, "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "slice_rows": len(df), "slice_bytes": len(blob), "driver_first_slice_s": round(first_slice_s, 2),
            "driver_first_slice_extra_peak_rss_mb": driver_peak}


def arrow_bytes(df) -> bytes:
    """A slice as an Arrow IPC stream (no pickle)."""
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_arrow_bytes(blob: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(blob).read_all().to_pandas()


def _warm_imports() -> None:
    """Load what any task has loaded (pandas, pyarrow strings, manifest_rows) so that only the slice counts."""
    import pandas as pd
    import pyarrow.parquet  # noqa: F401

    from clipforge.pipeline.manifest import manifest_rows

    df = pd.DataFrame({"video": ["/a.mp4", "/b.mp4"], "caption": ["x", "y"], "id": ["a", "b"]})
    list(manifest_rows(from_arrow_bytes(arrow_bytes(df)), 0))


def rss_task(slice_file: str) -> dict:
    """Fresh process: a task reads its slice back and makes its rows."""
    import gc

    from clipforge.pipeline.manifest import manifest_rows

    _warm_imports()
    gc.collect()
    before, peak_reset = rss_mb(), reset_peak()
    with open(slice_file, "rb") as f:
        start = int(os.path.basename(slice_file)[len("slice-"):-len(".arrow")])
        rows = list(manifest_rows(from_arrow_bytes(f.read()), start))
    after = rss_mb()
    return {"rows": len(rows), "rss_before_mb": round(before, 1), "extra_rss_mb": round(after - before, 2),
            "extra_peak_rss_mb": round(rss_mb("VmHWM") - before, 2) if peak_reset else None}


def rss_old(path: str) -> dict:
    """Fresh process: the old task read its manifest row group (kept cached) and sliced its 64 rows."""
    import gc

    import pyarrow.parquet as pq

    from clipforge.pipeline.manifest import manifest_rows

    _warm_imports()
    gc.collect()
    before, peak_reset = rss_mb(), reset_peak()
    table = pq.ParquetFile(path).read_row_group(0)
    df = table.slice(0, PER_SHARD).to_pandas()
    rows = list(manifest_rows(df, 0))
    after = rss_mb()
    del table
    return {"rows": len(rows), "rss_before_mb": round(before, 1), "extra_rss_mb": round(after - before, 2),
            "extra_peak_rss_mb": round(rss_mb("VmHWM") - before, 2) if peak_reset else None}


def _child(flag: str, value: str) -> dict:
    res = subprocess.run([sys.executable, __file__, flag, value], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{flag} {value} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def task_slice_rss(work: str) -> dict:
    root = tempfile.mkdtemp(prefix="clipforge-bench-rss-", dir=work)
    try:
        t = time.monotonic()
        prep = _child("--rss-prepare", root)
        new = _child("--rss-task", os.path.join(root, "slice-0.arrow"))   # the first slice starts at row 0
        old = _child("--rss-old", prep["path"])
        prep.pop("path")
        return {"manifest": prep, "extra_rss_mb": new["extra_rss_mb"], "extra_peak_rss_mb": new["extra_peak_rss_mb"],
                "old_row_group_read_extra_rss_mb": old["extra_rss_mb"],
                "old_row_group_read_extra_peak_rss_mb": old["extra_peak_rss_mb"],
                "task_rss_before_mb": new["rss_before_mb"], "meets_goal_50mb": new["extra_rss_mb"] < 50,
                "goal": "extra RSS of a task's 64-row slice < 50 MB", "wall_s": round(time.monotonic() - t, 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary manifest is made")
    parser.add_argument("--rss-prepare", help=argparse.SUPPRESS)
    parser.add_argument("--rss-task", help=argparse.SUPPRESS)
    parser.add_argument("--rss-old", help=argparse.SUPPRESS)
    a = parser.parse_args()
    for flag, fn in (("rss_prepare", rss_prepare), ("rss_task", rss_task), ("rss_old", rss_old)):
        if getattr(a, flag):   # one measurement in this fresh process
            print(json.dumps(fn(getattr(a, flag))))
            return
    print(json.dumps({"task_slice_rss": task_slice_rss(a.dir)}, indent=1))


if __name__ == "__main__":
    main()
