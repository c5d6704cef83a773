"""Manifests: Parquet, CSV/TSV or JSON Lines with at least `video` and `caption`.

Optional `id`, `start`, `end` (seconds); any other column is carried into each sample's metadata.
Rows become plain dicts with the reserved keys of `clipforge.pipeline.schema`; a row that cannot be used becomes an
error row (`bad_manifest_row`) instead of stopping the job, so it reaches the ledger.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import pandas as pd

from clipforge.pipeline.schema import OK, make_key, mark_error, video_id_for
from clipforge.pipeline.storage.fs import is_url, open_url
from clipforge.pipeline.text.tables import iter_table, read_table, table_format

RESERVED = ("video", "caption", "id", "start", "end")


def read_manifest(path: str) -> pd.DataFrame:
    """The manifest at `path` (local path or URL), read by `clipforge.pipeline.text.tables.read_table` from its extension
    (.parquet, .csv, .tsv, .jsonl or .json), with `video` paths made absolute relative to it."""
    df = read_table(path)
    missing = [c for c in ("video", "caption") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
    base = Path(str(path)).parent
    if "://" not in str(path):   # relative video paths are relative to the manifest
        df["video"] = [_resolve(v, base) for v in df["video"]]
    return df.reset_index(drop=True)


def _resolve(video, base: Path):
    if not isinstance(video, str) or not video or "://" in video or Path(video).is_absolute():
        return video
    return str((base / video).resolve())


def manifest_rows(df: pd.DataFrame, first_index: int = 0) -> Iterator[dict]:
    """One row dict per manifest row, in manifest order; `first_index` is the first row's position in
    the whole manifest (a worker reading its slice passes the slice's start)."""
    extras = [c for c in df.columns if c not in RESERVED]
    seen: set[str] = set()
    for offset, rec in enumerate(df.to_dict("records")):
        row_index = first_index + offset
        source = rec.get("video")
        source = source if isinstance(source, str) else ""
        given = rec.get("id")
        has_id = given is not None and str(given) not in ("", "nan", "None")
        row_id = str(given) if has_id else f"r{row_index}"
        if row_id in seen:   # ids are checked unique over the whole manifest by the build; here too
            raise ValueError(f"manifest row {row_index}: id {row_id!r} is used by an earlier row")
        seen.add(row_id)
        video_id = video_id_for(source) if source else f"missing-{row_index}"
        row = {"row_index": row_index, "status": OK, "source": source, "row_id": row_id, "video_id": video_id,
               # keys come from the row, not the video: one video under several captions gives several samples
               "row_key": row_id if has_id else f"{video_id[:12]}-{row_id}",
               "caption": rec.get("caption"), "extra": {c: _plain(rec[c]) for c in extras},
               "start": _seconds(rec.get("start")), "end": _seconds(rec.get("end"))}
        row["key"] = make_key(row["row_key"], "input")   # replaced by the clip keys once decoded
        if not row["source"]:
            yield mark_error(row, "manifest", "bad_manifest_row", "the `video` column is empty")
        else:
            yield row


def manifest_digest(path: str) -> str:
    """sha256 of the manifest file's bytes (part of a build's fingerprint)."""
    import hashlib

    h = hashlib.sha256()
    with open_url(str(path)) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def is_parquet(path: str) -> bool:
    try:
        return table_format(path) == "parquet"
    except (ValueError, OSError):
        return False


def stage_manifest(path: str, dest, rows_per_group: int = 65536) -> None:
    """Copy any manifest into Parquet at `dest` (a writable binary stream), relative video paths made
    absolute, chunk by chunk: workers can then read their slice by row groups and the driver never
    holds the table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = None if is_url(str(path)) else Path(str(path)).parent
    writer, schema = None, None
    for chunk in iter_table(path, chunk_rows=rows_per_group):
        missing = [c for c in ("video", "caption") if c not in chunk.columns]
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        if base is not None:
            chunk["video"] = [_resolve(v, base) for v in chunk["video"]]
        table = pa.Table.from_pandas(chunk.reset_index(drop=True), preserve_index=False)
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(dest, schema)
        writer.write_table(table.cast(schema), row_group_size=rows_per_group)
    if writer is None:
        raise ValueError(f"{path}: the manifest has no rows")
    writer.close()


def parquet_rows(path: str) -> tuple[int, list[str]]:
    """(row count, column names) from a Parquet manifest's footer, without reading its rows."""
    import pyarrow.parquet as pq

    with open_url(str(path)) as f:
        meta = pq.ParquetFile(f).metadata
        return meta.num_rows, meta.schema.to_arrow_schema().names


def check_unique_ids(path: str) -> None:
    """Refuse a manifest whose `id` column repeats a value (keys are made from it)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with open_url(str(path)) as f:
        ids = pq.read_table(f, columns=["id"])["id"]
    ids = pc.drop_null(ids.cast("string"))
    counts = pc.value_counts(ids)
    dupes = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:3]
    if dupes:
        raise ValueError(f"{path}: the `id` column repeats values, e.g. {dupes}; ids must be unique (or drop the column)")


_slice_cache: dict = {}


def read_manifest_slice(path: str, start: int, stop: int) -> pd.DataFrame:
    """Rows [start, stop) of a Parquet manifest, reading only the row groups that hold them.

    A worker usually builds consecutive shards, so the last row group read is kept for the next call.
    Relative video paths are resolved against the manifest's folder, as `read_manifest` does.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces = []
    with open_url(str(path)) as f:
        pf = pq.ParquetFile(f)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                cached = _slice_cache.get((str(path), g))
                if cached is None:
                    cached = pf.read_row_group(g)
                    _slice_cache.clear()   # one row group per process is enough for consecutive shards
                    _slice_cache[(str(path), g)] = cached
                pieces.append(cached.slice(lo - first, hi - lo))
            first += n
            if first >= stop:
                break
    df = pa.concat_tables(pieces).to_pandas() if pieces else pd.DataFrame(columns=["video", "caption"])
    if not is_url(str(path)):
        base = Path(str(path)).parent
        df["video"] = [_resolve(v, base) for v in df["video"]]
    return df.reset_index(drop=True)


def _seconds(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _plain(value):
    """Values that survive JSON: numpy scalars become Python ones, NaN becomes None."""
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
