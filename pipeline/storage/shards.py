"""A shard's bytes and its readers: one attempt's tar, index part and ledger part, and the read side.

The build splits the manifest into fixed groups of input rows; group N becomes `train-N` whatever the
number of workers or their timing, and its samples are written in (row, clip) order with a fixed tar
mtime, so the same inputs give byte-identical tars. `ShardWriter` writes one attempt's parts under names
of its own and returns the shard's record; the driver commits it (`commits.py` says how, and why a late
or duplicated attempt can never change what readers see). Readers (`read_records`, `shard_urls`,
`read_index`, `read_ledger`) go through the commit log: only parts an accepted record names exist for them.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.schema import TRANSIENT, is_ok
from clipforge.pipeline.storage.commits import CommitLog, parallel_map, shard_name, write_attempt
from clipforge.pipeline.storage.dataset import DatasetInfo
from clipforge.pipeline.storage.redact import redact_url
from clipforge.pipeline.storage.fs import Location, as_location
from clipforge.pipeline.storage.samples import decode_sample, encode_sample, sample_metadata
from clipforge.pipeline.storage.tarwriter import FastTarWriter

INDEX_COLUMNS = {
    "key": pa.string(), "shard": pa.string(), "video_id": pa.string(), "row_id": pa.string(),
    "source": pa.string(), "row_index": pa.int64(), "clip_index": pa.int64(), "caption": pa.string(),
    "caption_raw": pa.string(), "caption_tokens": pa.int64(), "caption_cut": pa.bool_(), "mode": pa.string(),
    "rate": pa.float64(), "span": pa.float64(), "t_start": pa.float64(), "t_end": pa.float64(),
    "frames": pa.int64(), "decoder": pa.string(), "bytes": pa.int64(),
}
LEDGER_COLUMNS = {
    "row_index": pa.int64(), "video_id": pa.string(), "row_id": pa.string(), "source": pa.string(),
    "key": pa.string(), "shard": pa.string(), "stage": pa.string(), "reason": pa.string(),
    "message": pa.string(), "attempts": pa.int64(), "transient": pa.bool_(),
}
def parquet_bytes(rows: list[dict], columns: dict) -> bytes:
    arrays = [pa.array([r.get(name) for r in rows], type=kind) for name, kind in columns.items()]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(list(columns.items()))), buf)
    return buf.getvalue()


def unique_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows of one shard with replays removed, in (row, clip) order.

    A retried or duplicated task can deliver the same clip twice; a sample key must appear once. An ok
    row wins over an error row of the same key (the retry that succeeded), and among rows that are
    equally good the first in a fixed order wins, so the outcome does not depend on arrival order.
    A failed input (no clip) yields one ledger row per (stage, reason), not one per replay.
    """
    best: dict[tuple, dict] = {}
    for row in rows:
        ok = is_ok(row)
        if row.get("clip_index") is not None:   # a clip, ok or failed after decoding: one per key
            slot = ("clip", row.get("key"))
        else:                                    # an input that failed before it became clips
            slot = ("input", row.get("row_index"), row.get("stage"), row.get("reason"))
        held = best.get(slot)
        if held is None or (ok and not is_ok(held)):
            best[slot] = row
    inputs_ok = {r.get("row_index") for r in best.values() if is_ok(r)}
    out = [r for r in best.values()
           # an input that produced samples on one attempt is not also a failed input
           if is_ok(r) or r.get("clip_index") is not None or r.get("row_index") not in inputs_ok]
    return sorted(out, key=lambda r: (r.get("row_index", -1), -1 if r.get("clip_index") is None else r["clip_index"],
                                      r.get("key") or "", r.get("stage") or ""))


class ShardWriter:
    """Writes one attempt of a shard from all the rows of its input group; returns its record, which
    only the driver commits (`clipforge.pipeline.storage.commits.CommitLog`)."""

    def __init__(self, out: str | os.PathLike | Location, layout: dict, split: str = "train",
                 fingerprint: str = ""):
        self.out = as_location(out)
        self.layout, self.split, self.fingerprint = layout, split, fingerprint
        for sub in ("shards", "index", "ledger"):
            self.out.makedirs(sub)

    def write(self, index: int, rows: Iterable[dict], inputs: int, attempts: dict | None = None,
              extra: dict | None = None) -> dict:
        """Write shard `index` from `rows` (ok and error rows of its `inputs` manifest rows)."""
        name = shard_name(self.split, index)
        rows = unique_rows(rows)
        index_rows, ledger_rows, ok_inputs = [], [], set()
        tar_buffer = io.BytesIO()
        writer = FastTarWriter(tar_buffer)
        for row in rows:
            if not is_ok(row):
                ledger_rows.append(_ledger_row(row, name, (attempts or {}).get(row.get("row_index"), 1)))
                continue
            sample = encode_sample(row["key"], sample_metadata(row, self.layout), str(row.get("caption") or ""),
                                   row["vtok"], row["ttok"])
            size = writer.write(sample)
            index_rows.append(_index_row(row, name, size))
            ok_inputs.add(row.get("row_index"))
        writer.close()
        failed_inputs = {r["row_index"] for r in ledger_rows} - ok_inputs
        fields = {
            "samples": len(index_rows), "bytes": writer.written, "sha256": writer.sha256,
            "inputs": inputs, "inputs_with_samples": len(ok_inputs),
            "inputs_failed": len(failed_inputs), "clip_failures": len(ledger_rows) - len(failed_inputs),
            "errors_by_reason": dict(sorted(Counter(r["reason"] for r in ledger_rows).items())),
            "errors_by_stage": dict(sorted(Counter(r["stage"] for r in ledger_rows).items())),
            "errors_by_stage_reason": dict(sorted(Counter(f"{r['stage']}/{r['reason']}" for r in ledger_rows).items())),
            "transient_errors": sum(r["transient"] for r in ledger_rows),
            "decoders": dict(sorted(Counter(r["decoder"] for r in index_rows).items())),
            **(extra or {}),
        }
        blobs = {"tar": tar_buffer.getvalue(), "index": parquet_bytes(index_rows, INDEX_COLUMNS),
                 "ledger": parquet_bytes(ledger_rows, LEDGER_COLUMNS)}
        return write_attempt(self.out, name, blobs, fields, self.fingerprint)


def read_records(dataset: str | os.PathLike | Location, split: str | None = "train") -> list[dict]:
    """The accepted commit records of one split (or of all when `split` is None), in shard order.
    Only records of the run `dataset.json` describes count (when it has a fingerprint)."""
    out = as_location(dataset)
    fingerprint = None
    if DatasetInfo.exists(out):
        fingerprint = DatasetInfo.read(out, validate=False).fingerprint_sha256
    records = CommitLog(out).read(fingerprint).values()
    return [r for r in records if split is None or r["shard"].startswith(f"{split}-")]


def _read_parts(dataset, part: str, columns: dict, split: str | None) -> pd.DataFrame:
    out = as_location(dataset)
    blobs = parallel_map(lambda r: out.read_bytes(r["files"][part]["name"]), read_records(out, split))
    frames = [pq.read_table(io.BytesIO(b)).to_pandas() for b in blobs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(frames, ignore_index=True)


def read_ledger_part(out: Location, record: dict) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(out.read_bytes(record["files"]["ledger"]["name"]))).to_pandas()


def read_index(dataset, split: str | None = None) -> pd.DataFrame:
    """One row per sample, from the index parts that accepted records name."""
    return _read_parts(dataset, "index", INDEX_COLUMNS, split)


def read_ledger(dataset, split: str | None = None) -> pd.DataFrame:
    return _read_parts(dataset, "ledger", LEDGER_COLUMNS, split)


def shard_urls(dataset, split: str | None = "train") -> list[str]:
    """URLs (or local paths) of the committed tars, for webdataset and other readers."""
    out = as_location(dataset)
    return [out.child_url(r["files"]["tar"]["name"]) for r in read_records(out, split)]


def _redacted(source):
    """A stored URL never carries credentials or signatures (`redact.redact_url`)."""
    return redact_url(source) if isinstance(source, str) else source


def _scrubbed(message, source):
    if isinstance(message, str) and isinstance(source, str) and source and source in message:
        return message.replace(source, redact_url(source))
    return message


def _index_row(row: dict, shard: str, size: int) -> dict:
    ts = row.get("timestamps") or [None]
    return {"key": row["key"], "shard": shard, "video_id": row.get("video_id"), "row_id": row.get("row_id"),
            "source": _redacted(row.get("source")), "row_index": row.get("row_index"), "clip_index": row.get("clip_index"),
            "caption": row.get("caption"), "caption_raw": row.get("caption_raw"),
            "caption_tokens": row.get("caption_tokens"), "caption_cut": row.get("caption_cut"),
            "mode": row.get("mode"), "rate": row.get("rate"), "span": row.get("span"),
            "t_start": ts[0], "t_end": ts[-1], "frames": len(row.get("frame_indices") or []),
            "decoder": row.get("decoder"), "bytes": size}


def _ledger_row(row: dict, shard: str, attempts: int) -> dict:
    return {"row_index": row.get("row_index"), "video_id": row.get("video_id"), "row_id": row.get("row_id"),
            "source": _redacted(row.get("source")), "key": row.get("key"), "shard": shard, "stage": row.get("stage"),
            "reason": row.get("reason"), "message": _scrubbed(row.get("error"), row.get("source")), "attempts": attempts,
            "transient": row.get("reason") in TRANSIENT}


def dataset_samples(dataset, split: str | None = "train", endpoint: str | None = None, shuffle: int = 0):
    """Decoded samples of a dataset's committed shards (any filesystem), in commit order; `shuffle` > 0
    shuffles within a buffer of that many samples."""
    import webdataset as wds

    from clipforge.pipeline.storage.fs import register_webdataset_schemes

    register_webdataset_schemes(endpoint)
    urls = shard_urls(as_location(str(dataset), endpoint), split)
    if not urls:
        raise ClipforgeError(f"{dataset}: no committed {split or ''} shards".replace("  ", " "))
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if shuffle:
        pipeline = pipeline.shuffle(shuffle)
    return pipeline.map(decode_sample)
