"""Manifests: Parquet, CSV/TSV or JSON Lines with at least `video` and `caption`.

(One file over 400 lines on purpose: every way a manifest row can be refused sits beside the reader
that meets it, so one file answers "what happens to a bad row".)

Optional `id`, `start`, `end` (seconds); any other column is carried into each sample's metadata.
Rows become plain dicts with the reserved keys of `clipforge.pipeline.schema`; a row that cannot be used becomes an
error row (`bad_manifest_row`) instead of stopping the job, so it reaches the ledger.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from clipforge.pipeline.schema import OK, make_key, mark_error, video_id_for
from clipforge.pipeline.storage.redact import redact_url
from clipforge.pipeline.storage.fs import is_url, open_url
from clipforge.pipeline.text.tables import iter_table, read_table, table_format
from clipforge.pipeline.errors import ClipforgeError

RESERVED = ("video", "caption", "id", "start", "end")
_CHUNK_ROWS = 1 << 16   # rows read at a time by the streaming readers


def read_manifest(path: str) -> pd.DataFrame:
    """The manifest at `path` (local path or URL), read by `clipforge.pipeline.text.tables.read_table` from its extension
    (.parquet, .csv, .tsv, .jsonl or .json), with `video` paths made absolute relative to it."""
    df = read_table(path)
    missing = [c for c in ("video", "caption") if c not in df.columns]
    if missing:
        raise ClipforgeError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
    base = Path(str(path)).parent
    if "://" not in str(path):   # relative video paths are relative to the manifest
        df["video"] = [_resolve(v, base) for v in df["video"]]
    return df.reset_index(drop=True)


def _resolve(video, base: Path):
    if not isinstance(video, str) or not video or "://" in video or "\x00" in video or Path(video).is_absolute():
        return video   # a NUL byte cannot name a file: `manifest_rows` turns the row into an error row
    try:
        return str((base / video).resolve())
    except (OSError, ValueError, UnicodeError):   # unresolvable (a surrogate, a loop): left for manifest_rows
        return video


_NO_ID = ("", "nan", "None")


def _row_id(given) -> str | None:
    """The manifest's own id of a row as a string, or None where the row has none (null, NaN, "", "nan",
    "None"). `manifest_rows` and `check_unique_ids` share it, so both agree on what an id is."""
    if given is None or given is pd.NA:
        return None
    text = str(given)
    return None if text in _NO_ID else text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeError:   # lone surrogates (a JSON "\\udc80" escape)
        return False


def _printable(value):
    """A string that any ledger can store: lone surrogates written as backslash escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


def manifest_rows(df: pd.DataFrame, first_index: int = 0, repeated_ids: dict[int, str] | None = None) -> Iterator[dict]:
    """One row dict per manifest row, in manifest order; `first_index` is the first row's position in
    the whole manifest (a worker reading its slice passes the slice's start).

    A row that cannot be used (empty or unparseable `video`, a NUL byte, text that is not UTF-8, ...)
    becomes a `bad_manifest_row` error row and never raises. So does a row whose id an earlier row has:
    inside `df`, or anywhere before it in the manifest (`repeated_ids`, from `repeated_id_rows`)."""
    extras = [c for c in df.columns if c not in RESERVED]
    seen: set[str] = set()
    for offset, rec in enumerate(df.to_dict("records")):
        row_index = first_index + offset
        try:
            row_id = _row_id(rec.get("id"))
        except Exception as err:   # noqa: BLE001 - an id whose str() fails
            yield _bad_row(rec, row_index, None, extras, f"the `id` value cannot be read as text ({err})")
            continue
        if row_id is not None:
            if row_id in seen or row_index in (repeated_ids or {}):   # the earlier row keeps the id's key
                yield _bad_row(rec, row_index, None, extras,
                               f"the id {_printable(row_id)[:200]!r} is used by an earlier row of the manifest")
                continue
            seen.add(row_id)
        try:
            row = _manifest_row(rec, row_index, row_id, extras)
        except _BadRow as err:
            yield _bad_row(rec, row_index, row_id, extras, str(err))
            continue
        except Exception as err:   # noqa: BLE001 - anything else odd in one row must not stop the job
            yield _bad_row(rec, row_index, row_id, extras, f"the row cannot be used ({type(err).__name__}: {err})")
            continue
        if not row["source"]:
            yield mark_error(row, "manifest", "bad_manifest_row", "the `video` column is empty")
        else:
            yield row


class _BadRow(ValueError):
    pass


def _manifest_row(rec: dict, row_index: int, row_id: str | None, extras: list) -> dict:
    source = rec.get("video")
    source = source if isinstance(source, str) else ""
    if row_id is not None and not _encodable(row_id):
        raise _BadRow("the `id` value is not valid UTF-8 text")
    if "\x00" in source:
        raise _BadRow(f"the `video` value {_printable(source)[:200]!r} contains a NUL byte")
    if not _encodable(source):
        raise _BadRow(f"the `video` value is not valid UTF-8 text: {_printable(source)[:200]}")
    if source:
        try:
            video_id = video_id_for(redact_url(source))   # one video, whatever credentials sign it
        except ValueError as err:   # urlsplit: "Invalid IPv6 URL", a bad port, ...
            raise _BadRow(f"the `video` value {source[:200]!r} is not a usable path or URL ({err})") from None
    else:
        video_id = f"missing-{row_index}"
    has_id = row_id is not None
    row_id = row_id if has_id else f"r{row_index}"
    row = {"row_index": row_index, "status": OK, "source": source, "row_id": row_id, "video_id": video_id,
           # keys come from the row, not the video: one video under several captions gives several samples
           "row_key": row_id if has_id else f"{video_id[:12]}-{row_id}",
           "caption": rec.get("caption"), "extra": {c: _plain(rec[c]) for c in extras},
           "start": _seconds(rec.get("start")), "end": _seconds(rec.get("end"))}
    row["key"] = make_key(row["row_key"], "input")   # replaced by the clip keys once decoded
    return row


def _bad_row(rec: dict, row_index: int, row_id: str | None, extras: list, message: str) -> dict:
    """The error row for a manifest row that cannot be used, built only from what is safe to keep; its
    key comes from the row's id where that is usable text, else from the row's position."""
    usable_id = row_id is not None and _encodable(row_id)
    row_key = row_id if usable_id else f"bad-r{row_index}"
    try:
        extra = {c: _printable(_plain(rec[c])) for c in extras}
    except Exception:   # noqa: BLE001
        extra = {}
    source = rec.get("video")
    caption = rec.get("caption")
    row = {"row_index": row_index, "status": OK, "source": _printable(source) if isinstance(source, str) else "",
           "row_id": row_id if usable_id else (_printable(row_id) if row_id is not None else f"r{row_index}"),
           "video_id": f"bad-{row_index}", "row_key": row_key,
           "caption": _printable(caption) if isinstance(caption, str) else None, "extra": extra,
           "start": None, "end": None, "key": make_key(row_key, "input")}
    return mark_error(row, "manifest", "bad_manifest_row", message)


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
            raise ClipforgeError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        if base is not None:
            chunk["video"] = [_resolve(v, base) for v in chunk["video"]]
        table = pa.Table.from_pandas(chunk.reset_index(drop=True), preserve_index=False)
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(dest, schema)
        writer.write_table(table.cast(schema), row_group_size=rows_per_group)
    if writer is None:
        raise ClipforgeError(f"{path}: the manifest has no rows")
    writer.close()


def parquet_rows(path: str) -> tuple[int, list[str]]:
    """(row count, column names) from a Parquet manifest's footer, without reading its rows."""
    import pyarrow.parquet as pq

    with open_url(str(path)) as f:
        meta = pq.ParquetFile(f).metadata
        return meta.num_rows, meta.schema.to_arrow_schema().names


def count_rows(path: str) -> tuple[int, list[str]]:
    """(row count, column names) of any manifest: a Parquet file's footer, or one streaming pass over
    the other formats (`iter_table` chunks; a .json list is still parsed whole, as `iter_table` does).
    Columns are in order of first appearance (JSON Lines records may differ in their keys)."""
    if is_parquet(path):
        return parquet_rows(path)
    rows, columns = 0, {}
    for chunk in iter_table(path, chunk_rows=_CHUNK_ROWS):
        rows += len(chunk)
        columns.update(dict.fromkeys(map(str, chunk.columns)))
    return rows, list(columns)



def _id_strings(values) -> np.ndarray:
    """The ids among a chunk of `id` values as an object array of str (rows without one left out)."""
    ids = (_row_id(v) for v in values)
    return np.array([i for i in ids if i is not None], dtype=object)


def _id_hashes(ids: np.ndarray) -> np.ndarray:
    if not len(ids):
        return np.empty(0, dtype=np.uint64)
    return pd.util.hash_array(ids, categorize=False)   # siphash of each str: stable across chunks


def _id_chunks(path: str) -> Iterator[np.ndarray]:
    for chunk in _raw_chunks(path, 1 << 18, columns=["id"]):
        if not isinstance(chunk, pd.DataFrame):
            chunk = chunk.to_pandas()   # through pandas, as `manifest_rows` sees the values
        if "id" in chunk.columns:
            yield _id_strings(chunk["id"].to_numpy(dtype=object))


def _repeated_hashes(path: str) -> np.ndarray:
    """The 8-byte hashes that more than one row's id has (sorted, unique): one streaming pass."""
    parts = [_id_hashes(ids) for ids in _id_chunks(path)]
    hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    del parts
    hashes.sort()
    return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])


def check_unique_ids(path: str) -> None:
    """Refuse a manifest whose `id` column repeats a value (keys are made from it). Any format.

    Streams the column twice at most, in bounded memory: 8-byte hashes of every id (sorted to find
    hashes seen twice), then, only if some hash repeats, the ids behind those hashes, to tell a true
    repeat from a hash collision. Rows without an id (null, "", "nan", "None") are not compared."""
    dupes = list(dict.fromkeys(repeated_id_rows(path).values()))[:3]
    if dupes:
        raise ClipforgeError(f"{path}: the `id` column repeats values, e.g. {dupes}; ids must be unique (or drop the column)")


def repeated_id_rows(path: str) -> dict[int, str]:
    """{row index: id} of every row whose `id` an earlier row already has (keys are made from ids, so
    those rows become `bad_manifest_row` ledger rows; the first row with an id keeps it). The same two
    bounded passes as `check_unique_ids`; the second one only when some hash repeats."""
    repeated = _repeated_hashes(path)
    if not len(repeated):
        return {}
    seen: set[str] = set()
    out: dict[int, str] = {}
    first = 0
    for chunk in _raw_chunks(path, 1 << 18, columns=["id"]):
        if not isinstance(chunk, pd.DataFrame):
            chunk = chunk.to_pandas()
        n = len(chunk)
        if "id" in chunk.columns:
            for offset, value in enumerate(chunk["id"].to_numpy(dtype=object)):
                row_id = _row_id(value)
                if row_id is None or not np.isin(_id_hashes(np.array([row_id], dtype=object)), repeated)[0]:
                    continue
                if row_id in seen:
                    out[first + offset] = row_id
                seen.add(row_id)
        first += n
    return out


def iter_shard_slices(path: str, rows_per_shard: int, skip: set[int] | frozenset = frozenset(),
                      chunk_rows: int | None = None) -> Iterator[tuple[int, int, int, pd.DataFrame]]:
    """(shard index, start, stop, rows) for every shard of `rows_per_shard` manifest rows, in order:
    shard k holds rows [k*rows_per_shard, min(rows, (k+1)*rows_per_shard)), with a fresh 0-based index.

    One streaming pass over the manifest (any format, local or URL; Parquet by `iter_batches`, which
    holds one row group at a time), so memory stays bounded on any manifest: each slice's columns are
    copied out of the chunk they came from and pin nothing else. Shards in `skip` are read past but
    not built (a chunk whose shards are all skipped is never converted to pandas). Relative `video`
    paths are made absolute against a local manifest's folder, as `read_manifest` does. `chunk_rows`
    (rows read at a time) defaults to about 64k, rounded to whole shards."""
    if rows_per_shard < 1:
        raise ClipforgeError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    step = chunk_rows or max(rows_per_shard, _CHUNK_ROWS // rows_per_shard * rows_per_shard)
    base = None if is_url(str(path)) else Path(str(path)).parent
    checked = False
    if is_parquet(path):
        _check_columns(path, parquet_rows(path)[1])
        checked = True
    pieces: list[pd.DataFrame] = []
    pos = 0   # manifest position of the current chunk's first row
    for chunk in _raw_chunks(path, step):
        if not checked:
            _check_columns(path, list(map(str, chunk.columns)))
            checked = True
        n, lo, df = len(chunk), 0, None
        while lo < n:
            k = (pos + lo) // rows_per_shard
            hi = min(n, (k + 1) * rows_per_shard - pos)
            if k not in skip:
                if df is None:
                    df = chunk if isinstance(chunk, pd.DataFrame) else chunk.to_pandas()
                    if base is not None and "video" in df.columns:   # once per chunk, not per shard
                        df["video"] = [_resolve(v, base) for v in df["video"]]
                # take() copies the rows out: a slice would keep the whole chunk's buffers alive
                pieces.append(df.take(np.arange(lo, hi)))
            if pos + hi == (k + 1) * rows_per_shard:
                if k not in skip:
                    yield k, k * rows_per_shard, pos + hi, _finish(pieces)
                pieces = []
            lo = hi
        pos += n
        chunk = df = None
    if pos % rows_per_shard and pos // rows_per_shard not in skip:
        k = pos // rows_per_shard
        yield k, k * rows_per_shard, pos, _finish(pieces)


def _check_columns(path: str, columns: list[str]) -> None:
    missing = [c for c in ("video", "caption") if c not in columns]
    if missing:
        raise ClipforgeError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(columns)})")


def _raw_chunks(path: str, rows: int, columns: list[str] | None = None):
    """pyarrow RecordBatches of a Parquet manifest (opened by `open_url`, so any URL it can read; one
    row group is held at a time), else `iter_table`'s DataFrame chunks; `columns`: only those of them
    that exist."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        with open_url(str(path)) as f:
            pf = pq.ParquetFile(f)
            names = None if columns is None else [c for c in pf.schema_arrow.names if c in columns]
            yield from pf.iter_batches(batch_size=rows, columns=names)
    else:
        yield from iter_table(path, chunk_rows=rows, columns=columns)


def _finish(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    return pieces[0].reset_index(drop=True) if len(pieces) == 1 else pd.concat(pieces, ignore_index=True)


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
