"""Table files: read captions and manifests in bounded memory, and write them back.

Formats follow the file's extension: parquet (or a built dataset's directory), csv (delimiter sniffed),
tsv, jsonl, json and txt; see `iter_table`. A path with "://" is a URL (s3://, gs://, https://, ...),
opened by the one filesystem layer, `clipforge.pipeline.storage.fs.open_url`. `TableWriter` appends
DataFrame chunks to one local file of any of these formats but txt.
"""
from __future__ import annotations

import io
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.fs import open_url

CAPTION_COLUMNS = ("caption", "text", "sentence", "prompt", "prompt_en", "name", "title", "description",
                   "caption_raw")
_TEXT_COLUMNS = set(CAPTION_COLUMNS) | {"id", "key", "video", "video_id", "videoid", "vid_key", "url"}
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
            ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "txt"}


def _is_url(path) -> bool:
    return "://" in str(path)


def _open(path, errors: str = "strict"):
    """A UTF-8 text file for reading: a local path, or a URL."""
    if _is_url(path):
        return io.TextIOWrapper(open_url(str(path)), encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


@contextmanager
def _binary(path):
    """A local path as it is (pandas and pyarrow open it themselves), or a URL opened for reading."""
    if not _is_url(path):
        yield path
        return
    with open_url(str(path)) as f:
        yield f


def table_format(path, must_exist: bool = True) -> str:
    """The format of a table from its name: parquet, csv, tsv, jsonl, json, txt, or a dataset folder.
    A local input that does not exist is a ClipforgeError (`must_exist=False` for outputs)."""
    url = _is_url(path)
    path = str(path) if url else Path(path)
    if not url and path.is_dir():
        return "dataset"
    if url and Path(str(path)).suffix.lower() not in _FORMATS:
        from clipforge.pipeline.storage.fs import Location

        if Location(str(path)).exists("dataset.json"):   # a built dataset on object storage
            return "dataset"
    if must_exist and not url and not path.exists():   # say what is wrong, not what the name's extension looks like
        raise ClipforgeError(f"{path}: no such file or directory")
    suffix = Path(path).suffix
    fmt = _FORMATS.get(suffix.lower())
    if fmt is None:
        raise ClipforgeError(f"{path}: unsupported extension {suffix!r} "
                             f"(use one of {', '.join(sorted(_FORMATS))}, or a dataset directory)")
    return fmt


def caption_column(columns) -> str:
    """The caption column of a table: `caption`, else the first known alias (WebVid's `name`, ...)."""
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise ClipforgeError(f"no caption column (looked for {', '.join(CAPTION_COLUMNS)}; have {list(columns)})")


def _sniff_sep(path: Path) -> str:
    with _open(path, errors="replace") as f:
        header = f.readline()
    counts = {sep: header.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _dataset_files(path) -> list:
    """A built dataset's index parts named by its shards' commit records (never a stale attempt's), or
    a plain folder of Parquet files."""
    from clipforge.pipeline.storage.shards import read_records

    records = read_records(path, None)
    if _is_url(path):
        from clipforge.pipeline.storage.fs import Location

        files = [Location(str(path)).child_url(r["files"]["index"]["name"]) for r in records]
    else:
        files = [path / r["files"]["index"]["name"] for r in records] or sorted((path / "index").glob("*.parquet")) \
            or sorted(path.glob("*.parquet"))   # a dataset without records, or a plain folder of Parquet files
    if not files:
        raise ClipforgeError(f"{path}: a directory without index/*.parquet (not a built dataset)")
    return files


def iter_table(path, chunk_rows: int = 200_000, all_text: bool = False,
               columns: Iterable[str] | None = None) -> Iterator[pd.DataFrame]:
    """`read_chunks` (below), with an unreadable file said in one line that names it."""
    import pyarrow as pa

    try:
        yield from read_chunks(path, chunk_rows, all_text, columns)
    except pd.errors.EmptyDataError:
        raise ClipforgeError(f"{path}: the file is empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pa.ArrowInvalid) as err:
        raise ClipforgeError(f"{path}: cannot be read as a table ({' '.join(str(err).split())[:200]})") from None


def read_chunks(path, chunk_rows: int = 200_000, all_text: bool = False,
                columns: Iterable[str] | None = None) -> Iterator[pd.DataFrame]:
    """Read a table in chunks of at most `chunk_rows` rows (bounded memory on any size).

    parquet (or a dataset directory: its index/*.parquet), csv (delimiter sniffed from the header:
    ``,`` ``;`` tab ``|``), tsv, jsonl, json (a list of records; a dict of record lists such as
    MSR-VTT's "sentences"; or mmaction2's {video: [captions]}), txt (one caption per non-blank line).
    Caption-like columns are read as text, so "NaN", "null" or "1.00" stay captions. With `all_text`,
    every csv/tsv column is read as text, unchanged (for rewriting a manifest faithfully). With
    `columns`, only those of the named columns that exist are returned (parquet and csv skip the rest).
    """
    import pyarrow.parquet as pq

    path = str(path) if _is_url(path) else Path(path)
    fmt = table_format(path)
    wanted = None if columns is None else list(columns)
    if wanted is not None and fmt not in ("parquet", "dataset", "csv", "tsv"):
        for df in iter_table(path, chunk_rows, all_text):
            yield df[[c for c in df.columns if c in wanted]]
        return
    if fmt in ("parquet", "dataset"):
        for file in ([path] if fmt == "parquet" else _dataset_files(path)):
            with _binary(file) as src:
                pf = pq.ParquetFile(src)
                names = None if wanted is None else [c for c in pf.schema_arrow.names if c in wanted]
                for batch in pf.iter_batches(batch_size=chunk_rows, columns=names):
                    yield batch.to_pandas()
    elif fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else _sniff_sep(path)
        if all_text:
            kw = dict(dtype=str, keep_default_na=False, na_filter=False)
        else:
            with _binary(path) as src:
                header = pd.read_csv(src, sep=sep, nrows=0).columns
            kw = dict(dtype={c: str for c in header if c in _TEXT_COLUMNS}, keep_default_na=False,
                      na_values=[""])
        if wanted is not None:
            kw["usecols"] = lambda c: c in wanted
        with _binary(path) as src:
            yield from pd.read_csv(src, sep=sep, chunksize=chunk_rows, **kw)
    elif fmt == "jsonl":
        yield from _jsonl_chunks(path, chunk_rows)
    elif fmt == "json":
        json_lines = False
        with _open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":
                    raise
                json_lines = True  # more than one JSON value: JSON Lines under a .json name
        if json_lines:
            yield from _jsonl_chunks(path, chunk_rows)
            return
        records = _json_records(data, path)
        for start in range(0, len(records), chunk_rows):
            yield pd.DataFrame.from_records(records[start:start + chunk_rows])
    else:  # txt
        lines: list = []
        with _open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    lines.append(line)
                if len(lines) >= chunk_rows:
                    yield pd.DataFrame({"caption": lines})
                    lines = []
        if lines:
            yield pd.DataFrame({"caption": lines})


def _jsonl_chunks(path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    records: list = []
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ClipforgeError(f"{path}:{number}: not JSON ({err.msg})") from None
            if len(records) >= chunk_rows:
                yield pd.DataFrame.from_records(records)
                records = []
    if records:
        yield pd.DataFrame.from_records(records)


def _json_records(data, path) -> list:
    if isinstance(data, list):
        return [r if isinstance(r, dict) else {"caption": r} for r in data]
    if isinstance(data, dict):
        for value in data.values():  # {"videos": [...], "sentences": [{"caption": ...}]}
            if isinstance(value, list) and value and isinstance(value[0], dict) and \
                    any(c in value[0] for c in CAPTION_COLUMNS):
                return value
        if all(isinstance(v, list) for v in data.values()):  # {video: [caption, ...]}
            return [{"video": k, "caption": c} for k, v in data.items() for c in v]
    raise ClipforgeError(f"{path}: JSON must be a list of records or a dict of caption lists")


def read_table(path) -> pd.DataFrame:
    """A whole table (parquet/csv/tsv/jsonl/json/txt, or a dataset's index) as one DataFrame. An empty
    parquet file keeps its columns; other empty tables have just `caption`."""
    chunks = list(iter_table(path, chunk_rows=1_000_000))
    if chunks:
        return pd.concat(chunks, ignore_index=True)
    if table_format(path) == "parquet":
        import pyarrow.parquet as pq
        with _binary(path) as src:
            return pq.ParquetFile(src).schema_arrow.empty_table().to_pandas()
    return pd.DataFrame({"caption": []})


# ------------------------------------------------------------------------------------------ writer
class TableWriter:
    """Appends DataFrame chunks to one parquet/csv/tsv/jsonl/json file."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.file = self.pq_writer = self.schema = None
        self.started = self.closed = False

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            if self.schema is None:
                table = pa.Table.from_pandas(df, preserve_index=False)
                # a column that is all-null in the first chunk would fix a null type for the file
                self.schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                         for f in table.schema]).remove_metadata()
                self.pq_writer = pq.ParquetWriter(self.path, self.schema)
            self.pq_writer.write_table(pa.Table.from_pandas(df, schema=self.schema, preserve_index=False))
        elif self.fmt in ("csv", "tsv"):
            df.to_csv(self.path, sep="\t" if self.fmt == "tsv" else ",", index=False, header=not self.started,
                      mode="a" if self.started else "w", encoding="utf-8")
        else:
            if self.file is None:
                self.file = open(self.path, "w", encoding="utf-8")
                self.file.write("[" if self.fmt == "json" else "")
            for rec in df.to_dict("records"):
                line = json.dumps({k: _json_value(v) for k, v in rec.items()}, ensure_ascii=False)
                if self.fmt == "json":
                    self.file.write(("\n" if not self.started else ",\n") + line)
                else:
                    self.file.write(line + "\n")
                self.started = True
        self.started = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pq_writer is not None:
            self.pq_writer.close()
        if self.file is not None:
            self.file.write("\n]\n" if self.fmt == "json" else "")
            self.file.close()


def _json_value(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is pd.NA or v is None:
        return None
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return v.tolist()
    return v
