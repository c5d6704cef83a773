"""The build driver's streaming manifest readers: `count_rows`, `iter_shard_slices`, `check_unique_ids`, and
`manifest_rows` on malformed rows. Small real files, written with pandas/pyarrow."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.pipeline.manifest import (check_unique_ids, count_rows, iter_shard_slices, manifest_rows,
                                         read_manifest)

ROWS = 23


def _frame(n: int = ROWS) -> pd.DataFrame:
    return pd.DataFrame({
        # relative, absolute and URL paths: only the relative ones are resolved
        "video": [f"clips/v{i}.mp4" if i % 3 == 0 else f"/data/v{i}.mp4" if i % 3 == 1 else f"s3://b/v{i}.mp4"
                  for i in range(n)],
        "caption": [f"caption number {i}" for i in range(n)],
        "id": [f"id-{i}" for i in range(n)],
        "start": [float(i) for i in range(n)],
        "score": list(range(n)),
    })


def _write(df: pd.DataFrame, path: Path, row_group_size: int | None = None) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_size)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    return path


CASES = [("m.parquet", 4), ("m.parquet", None), ("m.csv", None), ("m.jsonl", None)]


@pytest.mark.parametrize("name,group", CASES, ids=["parquet-small-groups", "parquet-one-group", "csv", "jsonl"])
@pytest.mark.parametrize("rows_per_shard,chunk_rows", [(5, None), (5, 7), (1, 3), (64, None)])
def test_slices_equal_read_manifest(tmp_path, name, group, rows_per_shard, chunk_rows):
    path = _write(_frame(), tmp_path / name, group)
    if group:
        assert pq.ParquetFile(path).metadata.num_row_groups == 6
    whole = read_manifest(str(path))
    assert count_rows(str(path)) == (ROWS, list(whole.columns))
    got = list(iter_shard_slices(str(path), rows_per_shard, chunk_rows=chunk_rows))
    shards = -(-ROWS // rows_per_shard)
    assert [(k, a, b) for k, a, b, _ in got] == [(k, k * rows_per_shard, min(ROWS, (k + 1) * rows_per_shard))
                                                for k in range(shards)]
    for k, a, b, df in got:
        assert list(df.index) == list(range(b - a))
        pd.testing.assert_frame_equal(df, whole.iloc[a:b].reset_index(drop=True), check_dtype=False)
    videos = [v for *_, df in got for v in df["video"]]
    assert videos[:3] == [str((tmp_path / "clips" / "v0.mp4").resolve()),   # relative: made absolute
                          "/data/v1.mp4", "s3://b/v2.mp4"]


@pytest.mark.parametrize("name", ["m.parquet", "m.csv"])
def test_skip(tmp_path, name):
    path = _write(_frame(), tmp_path / name, 4)
    got = list(iter_shard_slices(str(path), 5, skip={0, 2, 4}, chunk_rows=6))
    assert [(k, a, b, len(df)) for k, a, b, df in got] == [(1, 5, 10, 5), (3, 15, 20, 5)]
    assert list(got[1][3]["id"]) == [f"id-{i}" for i in range(15, 20)]
    assert list(iter_shard_slices(str(path), 5, skip=set(range(5)))) == []


def test_slices_own_their_memory(tmp_path):
    """A slice must not keep the row group it was cut from alive (the driver may hold many)."""
    n = 50_000
    df = pd.DataFrame({"video": [f"s3://bucket/videos/{i:09d}.mp4" for i in range(n)],
                       "caption": ["a caption"] * n})
    path = _write(df, tmp_path / "big.parquet")
    _, _, _, first = next(iter_shard_slices(str(path), 8))
    arr = pa.array(first["caption"]) if not hasattr(first["caption"].array, "_pa_array") \
        else first["caption"].array._pa_array
    held = sum(b.size for c in getattr(arr, "chunks", [arr]) for b in c.buffers() if b is not None)
    assert held < 10_000, held


def test_missing_columns(tmp_path):
    path = _write(_frame().drop(columns=["caption"]), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="lacks column"):
        list(iter_shard_slices(str(path), 4))


@pytest.mark.parametrize("name", ["m.parquet", "m.csv", "m.jsonl"])
def test_duplicate_ids(tmp_path, name):
    df = _frame()
    df.loc[17, "id"] = "id-3"
    path = _write(df, tmp_path / name, 4)
    with pytest.raises(ValueError, match=r"the `id` column repeats values, e\.g\. \['id-3'\]; ids must be unique"):
        check_unique_ids(str(path))


@pytest.mark.parametrize("name", ["m.parquet", "m.csv", "m.jsonl"])
def test_rows_without_id_are_not_duplicates(tmp_path, name):
    df = _frame()
    df["id"] = df["id"].astype(object)
    df.loc[[2, 5], "id"] = None
    df.loc[[8, 11], "id"] = ""
    path = _write(df, tmp_path / name, 4)
    check_unique_ids(str(path))   # no error
    check_unique_ids(str(_write(_frame().drop(columns=["id"]), tmp_path / ("noid" + Path(name).suffix))))


def test_hash_collisions_are_not_duplicates(tmp_path, monkeypatch):
    import numpy as np

    from clipforge.pipeline import manifest

    path = _write(_frame(), tmp_path / "m.parquet", 4)
    monkeypatch.setattr(manifest, "_id_hashes", lambda ids: np.zeros(len(ids), dtype=np.uint64))
    check_unique_ids(str(path))   # every id collides, none repeats
    df = _frame()
    df.loc[20, "id"] = "id-1"
    with pytest.raises(ValueError, match=r"\['id-1'\]"):
        check_unique_ids(str(_write(df, tmp_path / "d.parquet", 4)))


@pytest.mark.parametrize("name", ["m.parquet", "m.csv", "m.jsonl"])
def test_malformed_rows_become_error_rows(tmp_path, name):
    df = _frame(6)
    df.loc[1, "video"] = "http://[::1/v.mp4"      # urlsplit: Invalid IPv6 URL
    df.loc[3, "video"] = "clips/a\x00b.mp4"        # a NUL byte (relative: resolving it would raise too)
    df.loc[4, "caption"] = None
    path = _write(df, tmp_path / name)
    rows = [r for _, a, _, s in iter_shard_slices(str(path), 4) for r in manifest_rows(s, first_index=a)]
    assert [r["row_index"] for r in rows] == list(range(6))
    bad = {r["row_index"]: r for r in rows if r["status"] == "error"}
    assert sorted(bad) == [1, 3]
    assert all(r["reason"] == "bad_manifest_row" and r["stage"] == "manifest" for r in bad.values())
    assert "Invalid IPv6 URL" in bad[1]["error"] and "NUL byte" in bad[3]["error"]
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == 6 and all("." not in k and "/" not in k for k in keys)
    assert rows[4]["status"] == "ok"   # a missing caption is the caption cleaner's to reject


def test_bad_rows_without_ids_get_keys_from_their_position():
    df = pd.DataFrame({"video": ["http://[::1/v.mp4", "/a\x00.mp4", "/ok.mp4"], "caption": ["a", "b", float("nan")]})
    rows = list(manifest_rows(df, first_index=10))
    assert [r["status"] for r in rows] == ["error", "error", "ok"]
    assert rows[0]["key"] != rows[1]["key"] and "10" in rows[0]["key"] and "11" in rows[1]["key"]
    assert rows[0]["row_id"] == "r10"
    # a repeated id is a row of its own in the ledger, inside a slice or from the manifest's earlier rows
    df = pd.DataFrame({"video": ["/a.mp4", "/b.mp4", "/c.mp4"], "caption": ["a", "b", "c"], "id": ["x", "x", "y"]})
    rows = list(manifest_rows(df, first_index=5, repeated_ids={7: "y"}))
    assert [(r["status"], r.get("reason")) for r in rows] == [("ok", None), ("error", "bad_manifest_row"),
                                                               ("error", "bad_manifest_row")]
    assert "used by an earlier row" in rows[1]["error"] and len({r["key"] for r in rows}) == 3


def test_repeated_ids_are_found_across_chunks_and_formats(tmp_path):
    from clipforge.pipeline.manifest import repeated_id_rows

    df = pd.DataFrame({"video": [f"/{i}.mp4" for i in range(8)], "caption": ["c"] * 8,
                       "id": ["a", "b", None, "a", "", "c", "b", "a"]})
    for name in ("m.parquet", "m.csv"):
        path = _write(df, tmp_path / name) if name.endswith("csv") else _write(df, tmp_path / name, 3)
        assert repeated_id_rows(str(path)) == {3: "a", 6: "b", 7: "a"}
