"""`verify` finds what it promises to find. (That splits never leak a source video: tests/test_reshard.py.)"""
from __future__ import annotations

import numpy as np
import pandas as pd

from clipforge.pipeline.schema import normalise_source, video_id_for
from clipforge.pipeline.storage.shards import read_records
from clipforge.jobs.verify import verify_dataset

LAYOUT = {"frames": 5, "frame_size": 64, "tokens_h": 8, "tokens_w": 8, "text_slot": 24, "image_vocab": 64}
TOKENIZERS = {"image": {"id": "vq", "sha256": "a" * 64}, "text": {"id": "spm", "sha256": "b" * 64}}


def _row(row_index: int, key: str, shape=(5, 8, 8), code: int = 3) -> dict:
    return {"row_index": row_index, "clip_index": 0, "key": key, "video_id": f"v{row_index}", "row_id": f"r{row_index}",
            "source": f"/v/{row_index}.mp4", "caption": "a red circle", "mode": "sequential", "rate": 1.0,
            "span": 4.0, "frame_indices": [0, 1, 2, 3, 4], "timestamps": [0.0, 1.0, 2.0, 3.0, 4.0],
            "decoder": "pyav", "tokenizers": TOKENIZERS, "vtok": np.full(shape, code, np.uint16),
            "ttok": np.arange(4, dtype=np.int32)}


def commit_shards(root, writer_rows: list[list[dict]], layout: dict, info: dict | None = None,
                  inputs_per_shard: int = 2) -> list[dict]:
    """A dataset made by hand: each list of rows written as one shard attempt and committed by a driver
    holding the lease, as the build does; `info` (merged into a minimal dataset.json) when given."""
    from clipforge.pipeline.storage.commits import CommitLog, RunLease
    from clipforge.pipeline.storage.dataset import DatasetInfo
    from clipforge.pipeline.storage.shards import ShardWriter

    writer = ShardWriter(root, layout)
    records = [writer.write(i, rows, inputs=inputs_per_shard) for i, rows in enumerate(writer_rows)]
    with RunLease(root) as lease:
        log = CommitLog(root)
        log.start_epoch(lease.epoch)
        log.commit(records, lease)
    if info is not None:
        DatasetInfo({"format": "clipforge-dataset", "layout": layout, **info}).write(root)
    return records


def _dataset(root, shards: list[list[dict]], inputs_per_shard: int = 2, inputs_total: int | None = None):
    records = commit_shards(root, shards, LAYOUT, inputs_per_shard=inputs_per_shard)
    total = inputs_total if inputs_total is not None else inputs_per_shard * len(shards)
    commit_shards(root, [], LAYOUT, {"complete": True, "tokenizers": TOKENIZERS,
                                     "funnel": {"inputs": total, "samples": sum(r["samples"] for r in records)}})
    return root


def test_a_sound_dataset_has_no_problems(tmp_path):
    ds = _dataset(tmp_path / "ok", [[_row(0, "a"), _row(1, "b")], [_row(2, "c"), _row(3, "d")]])
    assert verify_dataset(ds)["problems"] == []


def test_duplicate_keys_across_shards(tmp_path):
    ds = _dataset(tmp_path / "dup", [[_row(0, "a"), _row(1, "b")], [_row(2, "a"), _row(3, "d")]])
    problems = verify_dataset(ds)["problems"]
    assert any("more than once" in p for p in problems), problems


def test_wrong_shape_and_codes_outside_the_codebook(tmp_path):
    ds = _dataset(tmp_path / "shape", [[_row(0, "a", shape=(4, 8, 8)), _row(1, "b", code=64)]])
    problems = verify_dataset(ds)["problems"]
    assert any("vtok shape (4, 8, 8)" in p for p in problems), problems
    assert any("outside codebook 64" in p for p in problems), problems


def test_broken_accounting(tmp_path):
    # the dataset claims 5 inputs, but its shards account for 4
    ds = _dataset(tmp_path / "acct", [[_row(0, "a"), _row(1, "b")], [_row(2, "c"), _row(3, "d")]], inputs_total=5)
    problems = verify_dataset(ds)["problems"]
    assert any("5 inputs but 4 accounted" in p for p in problems), problems


def test_a_part_that_differs_from_its_record(tmp_path):
    ds = _dataset(tmp_path / "bytes", [[_row(0, "a"), _row(1, "b")]])
    record = read_records(ds)[0]
    index_part = ds / record["files"]["index"]["name"]
    df = pd.read_parquet(index_part)
    df.loc[0, "caption"] = "changed"
    df.to_parquet(index_part)
    problems = verify_dataset(ds)["problems"]
    assert any("index part" in p and "differs from its record" in p for p in problems), problems


def test_video_id_is_the_same_for_every_spelling_of_one_source(tmp_path):
    video = tmp_path / "clips" / "a.mp4"
    assert video_id_for(str(video)) == video_id_for(str(tmp_path / "clips" / ".." / "clips" / "a.mp4"))
    assert video_id_for("S3://Bucket/x/../a.mp4") == video_id_for("s3://bucket/a.mp4")
    assert video_id_for("s3://bucket/a.mp4") != video_id_for("s3://bucket/b.mp4")
    assert normalise_source(f"file://{video}") == str(video)
