"""Shard commits: a shard's tar, index part, ledger part and stats appear together or not at all.

The build splits the manifest into fixed groups of input rows; group N becomes `train-N` whatever the
number of workers or their timing, and its samples are written in (row, clip) order with a fixed tar
mtime, so the same inputs give byte-identical shards. Everything is written beside its final name and
renamed into place; the stats JSON is renamed last and is the completion marker that `--resume` checks
(together with the tar's sha256).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.pipeline.storage.samples import encode_sample
from clipforge.pipeline.storage.tarwriter import FastTarWriter
from clipforge.pipeline.schema import TRANSIENT, is_ok

INDEX_COLUMNS = {
    "key": pa.string(), "shard": pa.string(), "video_id": pa.string(), "source": pa.string(),
    "row_index": pa.int64(), "clip_index": pa.int64(), "caption": pa.string(), "caption_raw": pa.string(),
    "caption_tokens": pa.int64(), "caption_cut": pa.bool_(), "mode": pa.string(), "rate": pa.float64(),
    "span": pa.float64(), "t_start": pa.float64(), "t_end": pa.float64(), "frames": pa.int64(),
    "decoder": pa.string(), "bytes": pa.int64(),
}
LEDGER_COLUMNS = {
    "row_index": pa.int64(), "video_id": pa.string(), "source": pa.string(), "key": pa.string(),
    "shard": pa.string(), "stage": pa.string(), "reason": pa.string(), "message": pa.string(),
    "attempts": pa.int64(), "transient": pa.bool_(),
}
# metadata kept out of KEY.json: arrays live in their own members, bookkeeping is the index's job
_NOT_META = {"frames", "vtok", "ttok", "status", "reason", "error", "stage"}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_meta(row: dict, layout: dict) -> dict:
    meta = {k: v for k, v in row.items() if k not in _NOT_META}
    meta["layout"] = layout
    return meta


class ShardCommitter:
    """Writes one shard from all the rows of its input group, atomically."""

    def __init__(self, out_dir: str | os.PathLike, layout: dict, split: str = "train"):
        self.root = Path(out_dir)
        self.layout, self.split = layout, split
        for sub in ("shards", "index", "ledger"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def paths(self, index: int) -> dict[str, Path]:
        name = shard_name(self.split, index)
        return {"tar": self.root / "shards" / f"{name}.tar", "stats": self.root / "shards" / f"{name}.json",
                "index": self.root / "index" / f"{name}.parquet", "ledger": self.root / "ledger" / f"{name}.parquet"}

    def committed(self, index: int) -> bool:
        """A shard counts as done when its stats marker exists and the tar still has the recorded sha256."""
        p = self.paths(index)
        if not (p["stats"].exists() and p["tar"].exists() and p["index"].exists() and p["ledger"].exists()):
            return False
        try:
            stats = json.loads(p["stats"].read_text())
        except (OSError, ValueError):
            return False
        return stats.get("sha256") == sha256_file(p["tar"])

    def write(self, index: int, rows: Iterable[dict], inputs: int, attempts: dict | None = None) -> dict:
        """Commit shard `index` from `rows` (ok and error rows of its `inputs` manifest rows)."""
        name = shard_name(self.split, index)
        p = self.paths(index)
        rows = sorted(rows, key=lambda r: (r.get("row_index", -1), r.get("clip_index", -1), r.get("key", "")))
        tmp = {k: v.with_name(v.name + ".tmp") for k, v in p.items()}
        index_rows, ledger_rows, ok_inputs = [], [], set()
        with open(tmp["tar"], "wb") as stream:
            writer = FastTarWriter(stream)
            for row in rows:
                if not is_ok(row):
                    ledger_rows.append(_ledger_row(row, name, (attempts or {}).get(row.get("row_index"), 1)))
                    continue
                sample = encode_sample(row["key"], sample_meta(row, self.layout), str(row.get("caption") or ""),
                                       row["vtok"], row["ttok"])
                size = writer.write(sample)
                index_rows.append(_index_row(row, name, size))
                ok_inputs.add(row.get("row_index"))
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        _write_parquet(index_rows, INDEX_COLUMNS, tmp["index"])
        _write_parquet(ledger_rows, LEDGER_COLUMNS, tmp["ledger"])
        failed_inputs = {r["row_index"] for r in ledger_rows} - ok_inputs
        stats = {
            "shard": name, "samples": len(index_rows), "bytes": writer.written,
            "sha256": writer.sha256, "inputs": inputs, "inputs_with_samples": len(ok_inputs),
            "inputs_failed": len(failed_inputs), "clip_failures": len(ledger_rows) - len(failed_inputs),
            "errors_by_reason": dict(sorted(Counter(r["reason"] for r in ledger_rows).items())),
            "errors_by_stage": dict(sorted(Counter(r["stage"] for r in ledger_rows).items())),
            "transient_errors": sum(r["transient"] for r in ledger_rows),
            "decoders": dict(sorted(Counter(r["decoder"] for r in index_rows).items())),
        }
        tmp["stats"].write_text(json.dumps(stats, indent=1, sort_keys=True))
        for part in ("tar", "index", "ledger", "stats"):   # the stats marker goes last
            os.replace(tmp[part], p[part])
        return stats


def _index_row(row: dict, shard: str, size: int) -> dict:
    ts = row.get("timestamps") or [None]
    return {"key": row["key"], "shard": shard, "video_id": row.get("video_id"), "source": row.get("source"),
            "row_index": row.get("row_index"), "clip_index": row.get("clip_index"),
            "caption": row.get("caption"), "caption_raw": row.get("caption_raw"),
            "caption_tokens": row.get("caption_tokens"), "caption_cut": row.get("caption_cut"),
            "mode": row.get("mode"), "rate": row.get("rate"), "span": row.get("span"),
            "t_start": ts[0], "t_end": ts[-1], "frames": len(row.get("frame_indices") or []),
            "decoder": row.get("decoder"), "bytes": size}


def _ledger_row(row: dict, shard: str, attempts: int) -> dict:
    return {"row_index": row.get("row_index"), "video_id": row.get("video_id"), "source": row.get("source"),
            "key": row.get("key"), "shard": shard, "stage": row.get("stage"), "reason": row.get("reason"),
            "message": row.get("error"), "attempts": attempts, "transient": row.get("reason") in TRANSIENT}


def _write_parquet(rows: list[dict], columns: dict, path: Path) -> None:
    arrays = [pa.array([r.get(name) for r in rows], type=kind) for name, kind in columns.items()]
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(list(columns.items()))), path)


def read_index(dataset: str | os.PathLike) -> pd.DataFrame:
    files = sorted((Path(dataset) / "index").glob("*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in INDEX_COLUMNS})
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_ledger(dataset: str | os.PathLike) -> pd.DataFrame:
    files = sorted((Path(dataset) / "ledger").glob("*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER_COLUMNS})
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_stats(dataset: str | os.PathLike, split: str | None = "train") -> list[dict]:
    """Per-shard stats of one split, or of every split when `split` is None."""
    pattern = f"{split}-*.json" if split else "*-*.json"
    return [json.loads(p.read_text()) for p in sorted((Path(dataset) / "shards").glob(pattern))]


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
