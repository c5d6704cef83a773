"""`clipforge reshard IN... OUT`: merge, filter, shuffle, re-cut and split off a validation set.

The byte-level work (copying each sample's byte range verbatim into a new shard attempt) is
`clipforge.pipeline.storage.reshard.write_reshard_shard`. This job plans the output shards from the inputs'
indexes, runs one task per output shard through the one executor (in process, or as Ray tasks with
`--address`: retries, deadlines, progress), and commits them exactly as the build does: a lease on the
output, the first good attempt of each shard accepted into the commit log, garbage removed at the end.
A reshard that stopped part way is continued with `--resume` (the same inputs and settings, checked by
the run fingerprint); output shards already committed are not written again.
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict

import numpy as np
import pandas as pd

from clipforge.jobs.executor import run_tasks
from clipforge.pipeline.storage.commits import CommitLog, RunLease, collect_garbage, fingerprint_sha256, shard_name
from clipforge.pipeline.storage.dataset import (FORMAT_VERSION, DatasetError, DatasetInfo, package_versions,
                                                write_wids_index)
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.progress import ProgressTracker
from clipforge.pipeline.storage.reshard import ReshardConfig, chunks, in_validation, slim, write_reshard_shard
from clipforge.pipeline.storage.shards import read_index, read_ledger, read_records


def _comparable(info: DatasetInfo, field: str) -> dict:
    if field == "layout":
        return {k: v for k, v in (info.layout or {}).items() if k != "path"}
    return dict(info.tokenizer_hashes)


def check_compatible(infos: list[DatasetInfo]) -> None:
    first = infos[0]
    for other in infos[1:]:
        for field in ("layout", "tokenizers"):
            a, b = _comparable(first, field), _comparable(other, field)
            if a != b:
                raise ValueError(f"cannot merge datasets with different {field}: {a} vs {b}")


def _source_index(n: int, src: Location) -> pd.DataFrame:
    tar_of = {r["shard"]: r["files"]["tar"]["name"] for r in read_records(src, None)}
    idx = read_index(src)
    idx["src_dataset"] = n
    idx["src_tar"] = idx["shard"].map(tar_of)
    # the index lists each shard's samples in tar order with their sizes: offsets come for free
    sizes = idx["bytes"].fillna(0).astype("int64")
    idx["src_offset"] = sizes.groupby(idx["shard"]).cumsum() - sizes
    return idx


def plan_output(sources: list[Location], config: ReshardConfig) -> tuple[list, int, int]:
    """([(split, shard number, index chunk)], samples in, samples selected)."""
    index = pd.concat([_source_index(n, src) for n, src in enumerate(sources)], ignore_index=True)
    total_in = len(index)
    if index["key"].duplicated().any():
        dup = index.loc[index["key"].duplicated(), "key"].iloc[0]
        raise ValueError(f"key {dup!r} appears in more than one input sample: merging would duplicate it")
    if config.filter:
        try:
            index = index.query(config.filter, engine="python")
        except Exception as err:   # noqa: BLE001 — pandas raises many types for a bad expression
            raise ValueError(f"bad --filter {config.filter!r}: {err}") from None
    kept = len(index)
    if config.shuffle_seed is not None:
        index = index.iloc[np.random.default_rng(config.shuffle_seed).permutation(len(index))]
    # grouped by source video (a hash of its normalised location): a video never lands on both sides
    videos = index["video_id"].astype(str)
    held_out = {v for v in videos.unique() if in_validation(v, config.val_fraction, config.val_seed)}
    is_val = videos.isin(held_out).to_numpy()
    splits = {"train": index[~is_val], "val": index[is_val]}
    jobs = [(split, no, slim(chunk)) for split, part in splits.items() for no, chunk in enumerate(chunks(part, config))]
    return jobs, total_in, kept


def _reshard_task(context: tuple, job: dict) -> dict:
    dest_url, endpoint, input_urls, fingerprint = context
    return write_reshard_shard(Location(dest_url, endpoint), job["name"], job["chunk"], input_urls, endpoint,
                               fingerprint)


def reshard(inputs: list[str], out: str, config: ReshardConfig = ReshardConfig(), progress: bool = True,
            address: str | None = None, endpoint: str | None = None, resume: bool = False,
            take_over: bool = False) -> dict:
    """Reshard `inputs` into `out` (local paths or URLs). With `address`, each output shard is written by
    a Ray task on that cluster; the driver holds the index (a few hundred bytes a sample), never sample data."""
    dest = Location(out, endpoint)
    sources = [Location(p, endpoint) for p in inputs]
    infos = [DatasetInfo.read(src) for src in sources]
    check_compatible(infos)
    input_urls = [s.url for s in sources]
    fingerprint = {"format_version": FORMAT_VERSION, "datasets": input_urls, "layout": infos[0].layout,
                   "tokenizers": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                                  for k, v in infos[0].tokenizers.items()},
                   "config": asdict(config), "sources": [i.fingerprint_sha256 for i in infos]}
    lease = RunLease(dest, take_over=take_over, purpose="reshard")
    lease.acquire()
    try:
        commit_log = CommitLog(dest)
        if DatasetInfo.exists(dest):
            existing = DatasetInfo.read(dest)
            if existing.complete or not resume:
                raise FileExistsError(f"{out} already holds a dataset" + ("" if existing.complete else
                                                                            ": pass --resume to continue it"))
            existing.check_resume(fingerprint)
        else:
            if commit_log.read():
                raise DatasetError(f"{out} holds commit records but no dataset.json: reshard into a new folder")
            info = DatasetInfo.started(fingerprint, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            info.data["reshard"] = {"inputs": input_urls, "config": asdict(config)}
            info.write(dest)
        sha = fingerprint_sha256(fingerprint)
        accepted = commit_log.start_epoch(lease.epoch)
        jobs, total_in, kept = plan_output(sources, config)
        todo = [{"name": shard_name(split, no), "chunk": chunk} for split, no, chunk in jobs
                if shard_name(split, no) not in accepted]
        tracker = ProgressTracker(dest, sum(len(j["chunk"]) for j in todo), len(todo), progress, unit="sample")

        def on_result(job: dict, record: dict) -> None:
            if commit_log.add(record):
                tracker.add({"inputs": record["samples"], "samples": record["samples"]})
            commit_log.flush(lease, every_s=5.0)

        try:
            run_tasks(_reshard_task, (dest.url, endpoint, input_urls, sha), iter(todo), on_result=on_result,
                      on_failure=_raise, progress=tracker, runner="ray" if address is not None else "local",
                      address=address, name=lambda j: j["name"])
        finally:
            commit_log.flush(lease)
        tracker.close()
        collect_garbage(dest, 0.0 if address is None else 900.0, accepted=commit_log.effective)
        return _complete(dest, commit_log, sources, jobs, input_urls, config, total_in, kept)
    finally:
        lease.release()


def _raise(job: dict, err: BaseException):
    raise RuntimeError(f"reshard: output shard {job['name']} failed every attempt: {type(err).__name__}: {err}") from err


def _complete(dest: Location, commit_log: CommitLog, sources: list[Location], jobs: list, input_urls: list[str],
              config: ReshardConfig, total_in: int, kept: int) -> dict:
    records = {"train": [], "val": []}
    for name, record in sorted(commit_log.effective.items()):
        records[name.rsplit("-", 1)[0]].append(record)
    for split, recs in records.items():
        write_wids_index(dest, recs, split)
    keymap = [pd.DataFrame({"key": chunk["key"].to_numpy(),
                            "old_dataset": [input_urls[d] for d in chunk["src_dataset"]],
                            "old_shard": chunk["shard"].to_numpy(), "split": split, "shard": shard_name(split, no)})
              for split, no, chunk in jobs]
    keymap_df = pd.concat(keymap, ignore_index=True) if keymap else \
        pd.DataFrame(columns=["key", "old_dataset", "old_shard", "split", "shard"])
    buf = io.BytesIO()
    keymap_df.to_parquet(buf, index=False)
    dest.write_bytes("keymap.parquet", buf.getvalue())
    ledgers = [read_ledger(s) for s in sources]   # failures of the builds stay on record, apart
    ledger = pd.concat(ledgers, ignore_index=True) if ledgers else pd.DataFrame()
    if len(ledger):
        buf = io.BytesIO()
        ledger.to_parquet(buf, index=False)
        dest.write_bytes("ledger/inherited.parquet", buf.getvalue())
    counts = {s: sum(r["samples"] for r in recs) for s, recs in records.items()}
    if sum(counts.values()) != kept:
        raise RuntimeError(f"reshard wrote {sum(counts.values())} samples but {kept} were selected")
    info = DatasetInfo.read(dest)
    info.data.update(
        complete=True, packages=package_versions(),
        reshard={"inputs": input_urls, "config": asdict(config), "samples_in": total_in,
                 "samples_selected": kept, "samples_filtered_out": total_in - kept, "splits": counts},
        tokenizers=DatasetInfo.read(sources[0]).tokenizers,
        funnel={"samples": kept, "splits": counts},
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    info.write(dest)
    return {"out": dest.url, "samples_in": total_in, "samples_out": kept, "splits": counts,
            "shards": {s: len(recs) for s, recs in records.items()}}
