"""`clipforge reshard IN... OUT`: merge, filter, shuffle, re-cut and split off a validation set.

Samples are copied byte for byte, tar headers included (no decode, no re-encode). The index lists each
shard's samples in tar order with their sizes, so a sample's byte range is known without reading the
tar; each copied sample is checked to begin with its own header, and a tar the index does not describe
is scanned instead. Each output shard is assembled by positioned reads in its new order (one read per
run of adjacent samples), so memory holds the index, never sample data. The validation split is drawn per source video
(hash of seed and video id), so no video lands on both sides. Counts are checked before returning.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.pipeline.storage.commits import write_attempt
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.shards import INDEX_COLUMNS, LEDGER_COLUMNS, parquet_bytes
from clipforge.pipeline.storage.tarwriter import BLOCK, FastTarWriter, read_ustar_header
from clipforge.pipeline.storage.verify import safe_member, unsafe_name
from clipforge.pipeline.errors import ClipforgeError


@dataclass(frozen=True)
class ReshardConfig:
    samples_per_shard: int | None = 1000
    bytes_per_shard: int | None = None       # when set, shards close at this size instead
    shuffle_seed: int | None = None          # None keeps the input order
    filter: str | None = None                # a comparison of index columns (pipeline/filters.py), e.g. "rate >= 1 and caption_tokens <= 64"
    val_fraction: float = 0.0                # share of source videos held out for validation
    val_seed: int = 0


def _sample_ranges(source: "SourceTar") -> dict[str, tuple[int, int]]:
    """key -> (start, length) of the sample's members (headers, data, padding) in the tar.

    A sample's members are contiguous in our shards, so a sample is one positioned read and its bytes
    go to the new shard verbatim. Plain USTAR headers are parsed directly (tarfile would cost ~40 µs a
    member); archives with extended headers go through tarfile. Unsafe members are refused either way.
    """
    ranges: dict[str, list[int]] = {}
    size_total = source.size()
    pos = 0
    while pos + BLOCK <= size_total:
        header = source.read_at(pos, BLOCK)
        if len(header) < BLOCK or header == b"\0" * BLOCK:
            break
        member = read_ustar_header(header)
        if member is None:
            raise ClipforgeError(f"{source.name}: no valid tar header at byte {pos} (corrupt or not a tar)")
        name_s, key, size, kind = member
        if kind not in (b"0", b"\0"):
            if kind in (b"x", b"g", b"L", b"K"):
                return _sample_ranges_tarfile(source)
            raise ClipforgeError(f"{source.name}: member of type {kind!r} refused (links and devices are not read)")
        problem = unsafe_name(name_s)
        if problem:
            raise ClipforgeError(f"{source.name}: {problem}")
        end = pos + BLOCK + size + (-size % BLOCK)
        span = ranges.get(key)
        if span is None:
            ranges[key] = [pos, end]
        elif span[1] == pos:
            span[1] = end
        else:
            raise ClipforgeError(f"{source.name}: members of {key!r} are not contiguous")
        pos = end
    return {k: (a, b - a) for k, (a, b) in ranges.items()}


def _sample_end(blob: bytes, offset: int, key: str) -> int | None:
    """End of the sample `key` whose first header sits at `offset` in `blob`: its plain USTAR members are
    walked until another key or the end of the blob. None when `offset` does not begin that sample or a
    member is not a plain file, so the caller falls back to scanning the whole tar."""
    pos, members = offset, 0
    while pos + BLOCK <= len(blob):
        member = read_ustar_header(blob[pos:pos + BLOCK])
        if member is None:   # an index offset that lands in member data
            break
        name, member_key, size, kind = member
        if kind not in (b"0", b"\0") or member_key != key or unsafe_name(name):
            break
        pos += BLOCK + size + (-size % BLOCK)
        members += 1
    return pos if members else None


def _sample_ranges_tarfile(source: "SourceTar") -> dict[str, tuple[int, int]]:
    ranges: dict[str, list[int]] = {}
    with tarfile.open(fileobj=io.BytesIO(source.read_at(0, source.size())), mode="r:") as tar:
        for m in tar:
            problem = safe_member(m)
            if problem:
                raise ClipforgeError(f"{source.name}: {problem}")
            key = m.name.rpartition("/")[2].partition(".")[0]
            end = m.offset_data + m.size + (-m.size % BLOCK)
            ranges.setdefault(key, [m.offset, end])[1] = end
    return {k: (a, b - a) for k, (a, b) in ranges.items()}


class SourceTar:
    """One input tar on any filesystem, opened once, read by position."""

    def __init__(self, location: Location, name: str):
        self.name = name
        self.file = location.open_input(name)

    def size(self) -> int:
        return self.file.size()

    def read_at(self, offset: int, nbytes: int) -> bytes:
        return self.file.read_at(nbytes, offset)

    def close(self) -> None:
        self.file.close()


def in_validation(video_id: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{video_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def write_reshard_shard(dest: Location, name: str, chunk: pd.DataFrame, inputs: list[str],
                        endpoint: str | None = None, fingerprint: str = "") -> dict:
    """Copy the chunk's samples verbatim into one new shard attempt and return its record (uncommitted). Runs of samples that sit back
    to back in one source tar (an unshuffled re-cut or merge) are copied with a single read; each copied
    sample must begin with its own header, else the source tar's headers are scanned and trusted."""
    locations = [Location(u, endpoint) for u in inputs]
    opened: dict[tuple, SourceTar] = {}
    scanned: dict[tuple, dict] = {}

    def source(dataset: int, tar: str) -> SourceTar:
        if (dataset, tar) not in opened:
            opened[(dataset, tar)] = SourceTar(locations[dataset], tar)
        return opened[(dataset, tar)]

    def ranges(dataset: int, tar: str) -> dict:
        if (dataset, tar) not in scanned:
            scanned[(dataset, tar)] = _sample_ranges(source(dataset, tar))
        return scanned[(dataset, tar)]

    def read_run(dataset, tar, start, keys, sizes) -> tuple[bytes, list[int]]:
        blob = source(dataset, tar).read_at(start, sum(sizes))
        offset = 0
        for key, size in zip(keys, sizes):
            if _sample_end(blob, offset, key) != offset + size:
                break
            offset += size
        else:
            if offset == len(blob):
                return blob, list(sizes)
        found = ranges(dataset, tar)   # the index does not describe this tar: trust the headers
        return (b"".join(source(dataset, tar).read_at(found[k][0], found[k][1]) for k in keys),
                [found[k][1] for k in keys])

    buffer = io.BytesIO()
    writer = FastTarWriter(buffer)
    sizes, run = [], None   # run: [dataset, tar, start, end, keys, sizes]

    def copy_run():
        blob, run_sizes = read_run(run[0], run[1], run[2], run[4], run[5])
        writer.write_raw(blob)
        sizes.extend(run_sizes)   # as copied: a wrong index is not carried into the new one

    try:
        for dataset, tar, key, start, size in zip(chunk["src_dataset"].tolist(), chunk["src_tar"].tolist(),
                                                  chunk["key"].tolist(), chunk["src_offset"].tolist(),
                                                  chunk["bytes"].tolist()):
            if not size:   # no recorded size: find the range from the headers
                start, size = ranges(dataset, tar)[key]
            if run and run[0] == dataset and run[1] == tar and run[3] == start:
                run[3] += size
                run[4].append(key)
                run[5].append(size)
                continue
            if run:
                copy_run()
            run = [dataset, tar, start, start + size, [key], [size]]
        if run:
            copy_run()
        writer.close()
    finally:
        for src in opened.values():
            src.close()
    index = chunk.drop(columns=["src_dataset", "src_offset", "src_tar"]).assign(shard=name, bytes=sizes)
    table = pa.Table.from_pandas(index[list(INDEX_COLUMNS)], schema=pa.schema(list(INDEX_COLUMNS.items())),
                                 preserve_index=False)
    index_buf = io.BytesIO()
    pq.write_table(table, index_buf)
    fields = {"samples": len(chunk), "bytes": writer.written, "sha256": writer.sha256, "errors_by_reason": {}}
    blobs = {"tar": buffer.getvalue(), "index": index_buf.getvalue(), "ledger": parquet_bytes([], LEDGER_COLUMNS)}
    return write_attempt(dest, name, blobs, fields, fingerprint)
