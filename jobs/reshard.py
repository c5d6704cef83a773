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
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipforge.jobs.executor import run_tasks
from clipforge.pipeline.filters import FilterError, RowFilter, parse_filter
from clipforge.pipeline.storage.commits import (CommitLog, RunLease, collect_garbage, fingerprint_sha256,
                                                parallel_map, shard_name)
from clipforge.pipeline.storage.dataset import (FORMAT_VERSION, DatasetError, DatasetInfo, check_output_folder,
                                                package_versions, write_wids_index)
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.progress import ProgressTracker
from clipforge.pipeline.storage.reshard import ReshardConfig, in_validation, write_reshard_shard
from clipforge.pipeline.storage.shards import INDEX_COLUMNS, read_ledger, read_records
from clipforge.pipeline.errors import ClipforgeError

INDEX_SCHEMA = pa.schema(list(INDEX_COLUMNS.items()))


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
                raise ClipforgeError(f"cannot merge datasets with different {field}: {a} vs {b}")


PART_BATCH = 1000   # index parts fetched at once (in parallel), so the driver never holds them all
PLAN_COLUMNS = ("src_dataset", "src_tar", "src_offset")


@dataclass
class OutputPlan:
    """What the reshard writes: per split, an Arrow table of the selected samples in output order (the
    index columns, the source dataset, the source tar as a number into `tars`, the sample's offset in
    it) and the boundaries of its output shards. The driver holds this, never sample bytes."""
    splits: dict[str, pa.Table]
    bounds: dict[str, list[tuple[int, int]]]
    tars: list[str]
    samples_in: int

    @property
    def selected(self) -> int:
        return sum(t.num_rows for t in self.splits.values())

    def shards(self) -> list[tuple[str, int, int, int]]:
        return [(split, no, start, stop) for split, bounds in self.bounds.items()
                for no, (start, stop) in enumerate(bounds)]

    def chunk(self, split: str, start: int, stop: int) -> pd.DataFrame:
        """One output shard's samples as the task takes them (pandas, with the source tar's name)."""
        part = self.splits[split].slice(start, stop - start)
        frame = part.drop_columns(["src_tar"]).to_pandas()
        frame["src_tar"] = [self.tars[i] for i in part["src_tar"].to_pylist()]
        return frame[list(INDEX_COLUMNS) + list(PLAN_COLUMNS)]


def _filtered(part: pa.Table, row_filter: RowFilter | None) -> pa.Table:
    if row_filter is None:
        return part
    return part.filter(pa.array(row_filter(part.select(list(INDEX_COLUMNS)).to_pandas())))


def _read_sources(sources: list[Location], row_filter: RowFilter | None) -> tuple[pa.Table, list[str], np.ndarray]:
    """(selected samples of every source as one Arrow table, tar names, uint64 hashes of every key read).
    Index parts are read a batch at a time and filtered as they come: memory holds the selection."""
    tables, tars, key_hashes = [], [], []
    for n, src in enumerate(sources):
        records = read_records(src, None)
        for first in range(0, len(records), PART_BATCH):
            batch = records[first:first + PART_BATCH]
            blobs = parallel_map(lambda r: src.read_bytes(r["files"]["index"]["name"]), batch)
            for record, blob in zip(batch, blobs):
                part = pq.read_table(io.BytesIO(blob)).select(list(INDEX_COLUMNS)).cast(INDEX_SCHEMA)
                if not part.num_rows:
                    continue
                key_hashes.append(pd.util.hash_array(np.asarray(part["key"].to_pylist(), dtype=object)))
                # the index lists a shard's samples in tar order with their sizes: offsets come for free
                sizes = pc.fill_null(part["bytes"], 0)
                part = part.append_column("src_dataset", pa.array(np.full(part.num_rows, n, np.int32)))
                part = part.append_column("src_tar", pa.array(np.full(part.num_rows, len(tars), np.int32)))
                part = part.append_column("src_offset", pc.subtract(pc.cumulative_sum(sizes), sizes))
                tars.append(record["files"]["tar"]["name"])
                tables.append(_filtered(part, row_filter))
    hashes = np.concatenate(key_hashes) if key_hashes else np.zeros(0, np.uint64)
    empty = pa.table({**{c: pa.array([], t) for c, t in INDEX_COLUMNS.items()},
                      "src_dataset": pa.array([], pa.int32()), "src_tar": pa.array([], pa.int32()),
                      "src_offset": pa.array([], pa.int64())})
    return (pa.concat_tables(tables) if tables else empty), tars, hashes


def _refuse_duplicate_keys(hashes: np.ndarray, index: pa.Table) -> None:
    """Keys are checked over every sample read, before the filter: inputs that share a key are refused."""
    ordered = np.sort(hashes)
    if len(ordered) and (ordered[1:] == ordered[:-1]).any():
        counts = pc.value_counts(index["key"])
        dup = next((c["values"] for c in counts.to_pylist() if c["counts"] > 1), None)
        raise ClipforgeError(f"key {dup!r} appears in more than one input sample: merging would duplicate it"
                         if dup is not None else "a key appears in more than one input sample: merging would "
                                                 "duplicate it")


def _bounds(table: pa.Table, config: ReshardConfig) -> list[tuple[int, int]]:
    n = table.num_rows
    if not n:
        return []
    if config.bytes_per_shard:
        sizes = pc.fill_null(table["bytes"], 0).to_numpy()
        bounds, start, acc = [], 0, 0
        for i, size in enumerate(sizes):
            if acc and acc + size > config.bytes_per_shard:
                bounds.append((start, i))
                start, acc = i, 0
            acc += size
        return bounds + [(start, n)]
    step = max(1, config.samples_per_shard or 1000)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _row_filter(expression: str | None) -> RowFilter | None:
    if not expression:
        return None
    try:
        return parse_filter(expression, list(INDEX_COLUMNS))
    except FilterError as err:
        raise FilterError(f"bad --filter {expression!r}: {err}") from None


def plan_output(sources: list[Location], config: ReshardConfig, row_filter: RowFilter | None = None) -> OutputPlan:
    index, tars, hashes = _read_sources(sources, row_filter)
    _refuse_duplicate_keys(hashes, index)
    if config.shuffle_seed is not None:
        index = index.take(pa.array(np.random.default_rng(config.shuffle_seed).permutation(index.num_rows)))
    # grouped by source video (a hash of its normalised location): a video never lands on both sides
    videos = pc.fill_null(index["video_id"], "None")
    held_out = [v for v in pc.unique(videos).to_pylist() if in_validation(v, config.val_fraction, config.val_seed)]
    is_val = pc.is_in(videos, value_set=pa.array(held_out, pa.string()))
    splits = {"train": index.filter(pc.invert(is_val)), "val": index.filter(is_val)}
    return OutputPlan(splits, {k: _bounds(t, config) for k, t in splits.items()}, tars, len(hashes))


def _reshard_task(context: tuple, job: dict) -> dict:
    dest_url, endpoint, input_urls, fingerprint = context
    return write_reshard_shard(Location(dest_url, endpoint), job["name"], job["chunk"], input_urls, endpoint,
                               fingerprint)


def reshard(inputs: list[str], out: str, config: ReshardConfig = ReshardConfig(), progress: bool = True,
            address: str | None = None, endpoint: str | None = None, resume: bool = False,
            take_over: bool = False) -> dict:
    """Reshard `inputs` into `out` (local paths or URLs). With `address`, each output shard is written by
    a Ray task on that cluster; the driver holds the index (a few hundred bytes a sample), never sample data."""
    row_filter = _row_filter(config.filter)   # first: a bad expression is refused before anything is read
    dest = Location(out, endpoint)
    sources = [Location(p, endpoint) for p in inputs]
    infos = [DatasetInfo.read(src) for src in sources]
    check_compatible(infos)
    input_urls = [s.url for s in sources]
    fingerprint = {"format_version": FORMAT_VERSION, "datasets": input_urls, "layout": infos[0].layout,
                   "tokenizers": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                                  for k, v in infos[0].tokenizers.items()},
                   "config": asdict(config), "sources": [i.fingerprint_sha256 for i in infos]}
    if DatasetInfo.exists(dest) and DatasetInfo.read(dest, validate=False).complete:
        raise FileExistsError(f"{out} already holds a dataset")
    check_output_folder(dest)
    plan = plan_output(sources, config, row_filter)   # reads only: a duplicate key writes nothing
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
        todo = [(split, no, start, stop) for split, no, start, stop in plan.shards()
                if shard_name(split, no) not in accepted]
        tracker = ProgressTracker(dest, sum(stop - start for _, _, start, stop in todo), len(todo), progress,
                                  unit="sample")
        tasks = ({"name": shard_name(split, no), "chunk": plan.chunk(split, start, stop)}   # made as submitted
                 for split, no, start, stop in todo)

        def on_result(job: dict, record: dict) -> None:
            if commit_log.add(record):
                tracker.add({"inputs": record["samples"], "samples": record["samples"]})
            commit_log.flush(lease, every_s=5.0)

        try:
            run_tasks(_reshard_task, (dest.url, endpoint, input_urls, sha), tasks, on_result=on_result,
                      on_failure=_raise, progress=tracker, runner="ray" if address is not None else "local",
                      address=address, name=lambda j: j["name"])
        finally:
            commit_log.flush(lease)
        tracker.close()
        collect_garbage(dest, 0.0 if address is None else 900.0, accepted=commit_log.effective)
        return _complete(dest, commit_log, sources, plan, input_urls, config)
    finally:
        lease.release()


def _raise(job: dict, err: BaseException):
    raise RuntimeError(f"reshard: output shard {job['name']} failed every attempt: {type(err).__name__}: {err}") from err


def _complete(dest: Location, commit_log: CommitLog, sources: list[Location], plan: OutputPlan,
              input_urls: list[str], config: ReshardConfig) -> dict:
    total_in, kept = plan.samples_in, plan.selected
    records = {"train": [], "val": []}
    for name, record in sorted(commit_log.effective.items()):
        records[name.rsplit("-", 1)[0]].append(record)
    for split, recs in records.items():
        write_wids_index(dest, recs, split)
    keymap = []
    for split, table in plan.splits.items():
        lengths = [stop - start for start, stop in plan.bounds[split]]
        names = np.repeat(np.asarray([shard_name(split, no) for no in range(len(lengths))], dtype=object), lengths)
        keymap.append(pa.table({"key": table["key"],
                                "old_dataset": pc.take(pa.array(input_urls), table["src_dataset"]),
                                "old_shard": table["shard"], "split": pa.array([split] * table.num_rows, pa.string()),
                                "shard": pa.array(names.tolist(), pa.string())}))
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables(keymap), buf)
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
