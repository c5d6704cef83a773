"""Does a build's metadata stay cheap on an object store as shards grow? (A shard task's memory:
bench/task_memory.py.)

Prints one JSON object:
- `metadata`: on a filesystem that adds `--latency-ms` (default 20) to every request (a
  `pyarrow.fs.PyFileSystem` over a local temp dir; a listing costs one request per 1000 entries, as
  S3's list pages do; requests from different threads overlap, as on a network), a dataset as a build
  leaves it after a crash with N committed shards (dataset.json, a released lease, commit segments of
  1000 records, 3 empty parts per shard) is resumed and completed:
  - `resume_startup_s`: `RunLease(take_over=True).acquire()` + `DatasetInfo.exists/read` +
    `CommitLog.start_epoch` + the set of done shards;
  - `completion_s`: `funnel_from_records` + `DatasetInfo.write` + `write_wids_index` +
    `collect_garbage(older_than_s=900)` with the driver's accepted set (nothing is garbage: it only lists);
  - with the requests each made, and a baseline in the same run: the previous design's one JSON record
    per shard read serially (300 reads timed, extrapolated to N), `baseline_serial_record_reads_s`.
  The Location is made with `Location(tmpdir)` and its `.fs` replaced; `.local` is set to False so that
  writes and the lease take the object-store path (through the slow fs) rather than plain os calls.
  Goal: resume + completion <= 60 s at 100k shards.
- `machine`: platform, cpus, python.

    .venv/bin/python bench/scale.py [--shards 10000,100000] [--latency-ms 20] [--dir /tmp] [--budget-s 330]

A size that would not finish within `--budget-s` (estimated from the smaller ones) is skipped and named.
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
import math
import platform
import shutil
import tempfile
import threading
import time
from collections import Counter

import pyarrow.fs as pafs

SPLIT = "train"
PER_SHARD = 64
SEGMENT_RECORDS = 1000
BASELINE_READS = 300


# -- a filesystem with a network's latency -----------------------------------------------------------
class LatencyHandler(pafs.FileSystemHandler):
    """LocalFileSystem, `latency_s` slower per request. A listing costs one request per 1000 entries (S3
    list pages); `get_file_info` of k paths costs k requests (HEADs). The sleep is outside any lock, so
    requests from different threads overlap. Writes create their parent folders (stores have none)."""

    def __init__(self, latency_s: float):
        self.base = pafs.LocalFileSystem()
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.calls: Counter = Counter()

    def _request(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.calls[kind] += n
        time.sleep(self.latency_s * n)

    def take_counts(self) -> dict:
        with self.lock:
            calls, self.calls = dict(self.calls), Counter()
        return {"total": sum(calls.values()), **dict(sorted(calls.items()))}

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "latency-local"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        self._request("head", len(paths))
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        infos = self.base.get_file_info(selector)
        self._request("list_page", max(1, math.ceil(len(infos) / 1000)))
        return infos

    def create_dir(self, path, recursive):
        self._request("create_dir")
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._request("delete")
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._request("delete")
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refused: delete_root_dir_contents")

    def delete_file(self, path):
        self._request("delete")
        self.base.delete_file(path)

    def move(self, src, dest):
        self._request("move")
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self._request("copy")
        self.base.copy_file(src, dest)

    def open_input_stream(self, path):
        self._request("get")
        return self.base.open_input_stream(path)

    def open_input_file(self, path):
        self._request("get")
        return self.base.open_input_file(path)

    def open_output_stream(self, path, metadata=None):
        self._request("put")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return self.base.open_output_stream(path)

    def open_append_stream(self, path, metadata=None):
        self._request("put")
        return self.base.open_append_stream(path)


def slow_location(path: str, handler: LatencyHandler):
    from clipforge.pipeline.storage.fs import Location

    loc = Location(path)
    loc.fs = pafs.PyFileSystem(handler)
    loc.local = False   # an object store: writes and the lease go through `fs`, not os calls
    return loc


# -- a dataset as a crashed build leaves it ----------------------------------------------------------
def fingerprint() -> dict:
    layout = {"frames": 5, "frame_size": 160, "tokens_h": 20, "tokens_w": 20, "text_slot": 64, "image_vocab": 20000}
    return {"format_version": 3, "manifest": "/data/manifest.parquet", "manifest_sha256": "0" * 64,
            "inputs": 0, "layout": layout, "tokenizers": {"image": {"id": "vq-bench", "sha256": "1" * 64},
                                                          "text": {"id": "sp-bench", "sha256": "2" * 64}},
            "config": {"inputs_per_shard": PER_SHARD}, "code": {"clipforge": "bench"}}


def record(index: int, fp_sha: str) -> dict:
    """A record shaped as `ShardCommitter.write` + `BuildShard` return it (parts empty)."""
    from clipforge.pipeline.storage.commits import RECORD_FORMAT, new_attempt, shard_name, sha256_bytes

    name, attempt, empty = shard_name(SPLIT, index), new_attempt(), sha256_bytes(b"")
    files = {"tar": {"name": f"shards/{name}.{attempt}.tar", "bytes": 0, "sha256": empty},
             "index": {"name": f"index/{name}.{attempt}.parquet", "bytes": 0, "sha256": empty},
             "ledger": {"name": f"ledger/{name}.{attempt}.parquet", "bytes": 0, "sha256": empty}}
    return {"format": RECORD_FORMAT, "shard": name, "attempt": attempt, "fingerprint": fp_sha, "files": files,
            "samples": 60, "bytes": 0, "sha256": empty, "inputs": PER_SHARD, "inputs_with_samples": 60,
            "inputs_failed": 4, "clip_failures": 0,
            "errors_by_reason": {"decode_error": 3, "missing": 1}, "errors_by_stage": {"decode": 3, "fetch": 1},
            "errors_by_stage_reason": {"decode/decode_error": 3, "fetch/missing": 1}, "transient_errors": 1,
            "decoders": {"pyav": 60}, "videos_decoded": 60, "clips": 60, "roundtrip_psnr": [31.25],
            "encode_settings": {"dtype": "bf16", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
            "rows": [index * PER_SHARD, (index + 1) * PER_SHARD]}


def synthesize(path: str, shards: int) -> dict:
    """dataset.json, a released lease of epoch 1, `shards` records in segments of 1000 (through the real
    CommitLog/RunLease on a plain local Location) and 3 empty part files per shard (os calls)."""
    from clipforge.pipeline.storage.commits import CommitLog, RunLease
    from clipforge.pipeline.storage.dataset import DatasetInfo
    from clipforge.pipeline.storage.fs import Location

    t0 = time.perf_counter()
    fast = Location(path)
    fp = fingerprint()
    fp["inputs"] = shards * PER_SHARD
    info = DatasetInfo.started(fp, "2024-01-01T00:00:00Z")
    info.write(fast)
    lease = RunLease(fast)
    epoch = lease.acquire()
    log = CommitLog(fast)
    log.start_epoch(epoch)
    records = []
    for i in range(shards):
        r = record(i, info.fingerprint_sha256)
        records.append(r)
        log.add(r)
        if len(log.buffer) >= SEGMENT_RECORDS:
            log.flush()
    log.flush()
    lease.release()   # the dead run's lease
    t1 = time.perf_counter()
    for folder in ("shards", "index", "ledger"):
        os.makedirs(os.path.join(path, folder), exist_ok=True)
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    for r in records:
        for part in r["files"].values():
            os.close(os.open(os.path.join(path, part["name"]), flags, 0o644))
    t2 = time.perf_counter()
    commits_bytes = sum(os.path.getsize(os.path.join(path, "commits", n)) for n in os.listdir(os.path.join(path, "commits")))
    return {"records_and_segments_s": round(t1 - t0, 2), "part_files_s": round(t2 - t1, 2),
            "segments": log.seq, "commit_log_mb": round(commits_bytes / 2**20, 1)}


def resume_and_complete(path: str, handler: LatencyHandler, shards: int) -> dict:
    """What `build --resume` does with the dataset's metadata, timed on the slow Location."""
    from clipforge.pipeline.storage.commits import CommitLog, RunLease, collect_garbage, shard_number
    from clipforge.pipeline.storage.dataset import DatasetInfo, funnel_from_records, write_wids_index

    loc = slow_location(path, handler)
    handler.take_counts()
    steps: dict[str, float] = {}

    def step(name, t):
        now = time.perf_counter()
        steps[name] = round(now - t, 3)
        return now

    t0 = t = time.perf_counter()
    lease = RunLease(loc, take_over=True)
    epoch = lease.acquire()
    try:
        t = step("lease_acquire_s", t)   # includes the lease's settle_s (1 s) on an object store
        assert DatasetInfo.exists(loc)
        info = DatasetInfo.read(loc)
        t = step("dataset_info_read_s", t)
        log = CommitLog(loc)
        accepted = log.start_epoch(epoch)
        t = step("start_epoch_s", t)
        done = {shard_number(n) for n in accepted if n.startswith(f"{SPLIT}-")}
        t = step("done_set_s", t)
        resume_s = t - t0
        resume_requests = handler.take_counts()
        assert len(done) == shards, (len(done), shards)

        t1 = t
        records = [r for name, r in sorted(log.effective.items()) if name.startswith(f"{SPLIT}-")]
        funnel = funnel_from_records(records, info.fingerprint["inputs"])
        t = step("funnel_s", t)
        info.data.update({"complete": True, "funnel": funnel,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        info.write(loc)
        t = step("dataset_info_write_s", t)
        write_wids_index(loc, records, SPLIT)
        t = step("wids_index_s", t)
        gc = collect_garbage(loc, older_than_s=900, accepted=log.effective)   # as the driver does
        t = step("collect_garbage_s", t)
        completion_s = t - t1
        completion_requests = handler.take_counts()
        assert funnel["accounted"] and funnel["shards"] == shards and gc["removed"] == 0, (funnel, gc)
    finally:
        lease.release()
    handler.take_counts()
    return {"epoch": epoch, "resume_startup_s": round(resume_s, 2), "completion_s": round(completion_s, 2),
            "total_s": round(resume_s + completion_s, 2), "steps": steps,
            "resume_requests": resume_requests, "completion_requests": completion_requests}


def baseline_reads(root: str, handler: LatencyHandler) -> float:
    """Seconds per record of the previous design: one `shards/<name>.json` GET per shard, one by one."""
    path = os.path.join(root, "legacy")
    os.makedirs(os.path.join(path, "shards"))
    fp_sha = "3" * 64
    for i in range(BASELINE_READS):
        r = {**record(i, fp_sha), "format": "clipforge-shard-record-v2"}
        with open(os.path.join(path, "shards", f"{r['shard']}.json"), "w") as f:
            json.dump(r, f)
    loc = slow_location(path, handler)
    t = time.perf_counter()
    for i in range(BASELINE_READS):
        json.loads(loc.read_text(f"shards/{SPLIT}-{i:06d}.json"))
    per_read = (time.perf_counter() - t) / BASELINE_READS
    handler.take_counts()
    shutil.rmtree(path)
    return per_read


def metadata(sizes: list[int], latency_ms: float, work: str, deadline: float) -> dict:
    handler = LatencyHandler(latency_ms / 1000)
    root = tempfile.mkdtemp(prefix="clipforge-bench-scale-", dir=work)
    try:
        per_read = baseline_reads(root, handler)
        runs, skipped, last = [], [], None
        for n in sizes:
            if last is not None:   # setup, listing and parsing grow about linearly with shards
                estimate = last[1] * n / last[0] * 1.2
                if time.monotonic() + estimate > deadline:
                    skipped.append({"shards": n, "reason": f"estimated {estimate:.0f} s from the {last[0]}-shard "
                                                           f"run; over the --budget-s left"})
                    continue
            t = time.monotonic()
            path = os.path.join(root, f"ds-{n}")
            setup = synthesize(path, n)
            res = resume_and_complete(path, handler, n)
            t_rm = time.perf_counter()
            shutil.rmtree(path)
            setup["cleanup_s"] = round(time.perf_counter() - t_rm, 2)
            runs.append({"shards": n, **res, "meets_goal_60s": res["total_s"] <= 60,
                         "baseline_serial_record_reads_s": round(per_read * n, 1),
                         "speedup_vs_baseline": round(per_read * n / res["total_s"], 1), "setup": setup,
                         "wall_s": round(time.monotonic() - t, 1)})
            last = (n, time.monotonic() - t)
        return {"latency_ms": latency_ms, "list_page_entries": 1000, "location_local": False,
                "baseline_per_record_read_s": round(per_read, 4), "runs": runs, "skipped": skipped,
                "goal": "resume_startup_s + completion_s <= 60 s at 100k shards"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def machine() -> dict:
    import pandas
    import pyarrow

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "pyarrow": pyarrow.__version__, "pandas": pandas.__version__,
            "loadavg_at_start": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", default="10000,100000")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where temporary datasets are made")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip sizes estimated to end past this")
    a = parser.parse_args()
    t0 = time.monotonic()
    info = machine()
    sizes = sorted(int(s) for s in a.shards.split(","))
    out = {"metadata": metadata(sizes, a.latency_ms, a.dir, t0 + a.budget_s), "machine": info,
           "wall_s": round(time.monotonic() - t0, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
