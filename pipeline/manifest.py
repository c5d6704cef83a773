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

from clipforge.pipeline.schema import OK, mark_error, video_id_for
from clipforge.pipeline.text.tables import read_table

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
    """One row dict per manifest row, in manifest order."""
    extras = [c for c in df.columns if c not in RESERVED]
    seen: set[str] = set()
    for offset, rec in enumerate(df.to_dict("records")):
        row_index = first_index + offset
        source = rec.get("video")
        row = {"row_index": row_index, "status": OK, "source": source if isinstance(source, str) else "",
               "caption": rec.get("caption"), "extra": {c: _plain(rec[c]) for c in extras},
               "start": _seconds(rec.get("start")), "end": _seconds(rec.get("end"))}
        video_id = video_id_for(row["source"] or f"row{row_index}", rec.get("id"))
        if video_id in seen:   # the same video twice (other caption or times): keep keys unique
            video_id = f"{video_id}-r{row_index}"
        seen.add(video_id)
        row["video_id"] = video_id
        row["key"] = f"{row['video_id']}_row{row_index}"   # replaced by the clip key once decoded
        if not row["source"]:
            yield mark_error(row, "manifest", "bad_manifest_row", "the `video` column is empty")
        else:
            yield row


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
