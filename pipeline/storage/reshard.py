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
import json
import tarfile
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.pipeline.storage.dataset import package_versions, write_wids_index
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.shards import (INDEX_COLUMNS, LEDGER_COLUMNS, commit_shard, parquet_bytes, read_index,
                                               read_ledger, read_records, shard_name, write_json)
from clipforge.pipeline.storage.tarwriter import BLOCK, FastTarWriter, read_ustar_header
from clipforge.pipeline.storage.verify import safe_member, unsafe_name


@dataclass(frozen=True)
class ReshardConfig:
    samples_per_shard: int | None = 1000
    bytes_per_shard: int | None = None       # when set, shards close at this size instead
    shuffle_seed: int | None = None          # None keeps the input order
    filter: str | None = None                # a pandas query over the index, e.g. "rate >= 1 and caption_tokens <= 64"
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
            raise ValueError(f"{source.name}: no valid tar header at byte {pos} (corrupt or not a tar)")
        name_s, key, size, kind = member
        if kind not in (b"0", b"\0"):
            if kind in (b"x", b"g", b"L", b"K"):
                return _sample_ranges_tarfile(source)
            raise ValueError(f"{source.name}: member of type {kind!r} refused (links and devices are not read)")
        problem = unsafe_name(name_s)
        if problem:
            raise ValueError(f"{source.name}: {problem}")
        end = pos + BLOCK + size + (-size % BLOCK)
        span = ranges.get(key)
        if span is None:
            ranges[key] = [pos, end]
        elif span[1] == pos:
            span[1] = end
        else:
            raise ValueError(f"{source.name}: members of {key!r} are not contiguous")
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
                raise ValueError(f"{source.name}: {problem}")
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


def _in_validation(video_id: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{video_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _check_compatible(infos: list[dict]) -> None:
    first = infos[0]
    for other in infos[1:]:
        for field in ("layout", "tokenizers"):
            a = {k: v for k, v in first[field].items() if k != "path"} if field == "layout" else \
                {k: v["sha256"] for k, v in first[field].items()}
            b = {k: v for k, v in other[field].items() if k != "path"} if field == "layout" else \
                {k: v["sha256"] for k, v in other[field].items()}
            if a != b:
                raise ValueError(f"cannot merge datasets with different {field}: {a} vs {b}")


def reshard(inputs: list[str], out: str, config: ReshardConfig = ReshardConfig(), progress: bool = True,
            address: str | None = None, endpoint: str | None = None) -> dict:
    """Reshard `inputs` into `out` (local paths or URLs). With `address`, each output shard is written by
    a Ray task on that cluster; the driver holds the index (a few hundred bytes a sample), never sample data."""
    from tqdm import tqdm

    dest = Location(out, endpoint)
    if dest.exists("dataset.json"):
        raise FileExistsError(f"{out} already holds a dataset")
    sources = [Location(p, endpoint) for p in inputs]
    infos, frames = [], []
    for n, src in enumerate(sources):
        if not src.exists("dataset.json"):
            raise FileNotFoundError(f"{src.url}: not a clipforge dataset (no dataset.json)")
        infos.append(json.loads(src.read_text("dataset.json")))
        tar_of = {r["shard"]: r["files"]["tar"]["name"] for r in read_records(src, None)}
        idx = read_index(src)
        idx["src_dataset"] = n
        idx["src_tar"] = idx["shard"].map(tar_of)
        # the index lists each shard's samples in tar order with their sizes: offsets come for free
        sizes = idx["bytes"].fillna(0).astype("int64")
        idx["src_offset"] = sizes.groupby(idx["shard"]).cumsum() - sizes
        frames.append(idx)
    _check_compatible(infos)
    index = pd.concat(frames, ignore_index=True)
    total_in = len(index)
    if index["key"].duplicated().any():
        dup = index.loc[index["key"].duplicated(), "key"].iloc[0]
        raise ValueError(f"key {dup!r} appears in more than one input sample: merging would duplicate it")
    if config.filter:
        try:
            index = index.query(config.filter, engine="python")
        except Exception as err:   # noqa: BLE001 — pandas raises many types for a bad expression
            raise ValueError(f"bad --filter {config.filter!r}: {err}") from None
    kept = len(index)
    if config.shuffle_seed is not None:
        index = index.iloc[np.random.default_rng(config.shuffle_seed).permutation(len(index))]
    # grouped by source video (a hash of its normalised location): a video never lands on both sides
    videos = index["video_id"].astype(str)
    held_out = {v for v in videos.unique() if _in_validation(v, config.val_fraction, config.val_seed)}
    is_val = videos.isin(held_out).to_numpy()
    splits = {"train": index[~is_val], "val": index[is_val]}

    input_urls = [s.url for s in sources]
    jobs = [(split, shard_no, chunk) for split, part in splits.items()
            for shard_no, chunk in enumerate(_chunks(part, config))]
    bar = tqdm(total=kept, desc="reshard", unit="sample", disable=not progress)
    records: dict[str, list] = {"train": [], "val": []}
    if address is not None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(write_reshard_shard).options(num_cpus=1)
        refs = [task.remote(dest, shard_name(split, no), _slim(chunk), input_urls, endpoint) for split, no, chunk in jobs]
        for (split, _, chunk), ref in zip(jobs, refs):
            records[split].append(ray.get(ref))
            bar.update(len(chunk))
    else:
        for split, no, chunk in jobs:
            records[split].append(write_reshard_shard(dest, shard_name(split, no), _slim(chunk), input_urls, endpoint))
            bar.update(len(chunk))
    bar.close()
    for split, recs in records.items():
        write_wids_index(dest, recs, split)
    keymap = [pd.DataFrame({"key": chunk["key"].to_numpy(),
                            "old_dataset": [input_urls[d] for d in chunk["src_dataset"]],
                            "old_shard": chunk["shard"].to_numpy(), "split": split, "shard": shard_name(split, no)})
              for split, no, chunk in jobs]
    keymap_df = pd.concat(keymap, ignore_index=True) if keymap else \
        pd.DataFrame(columns=["key", "old_dataset", "old_shard", "split", "shard"])
    buf = io.BytesIO()
    keymap_df.to_parquet(buf, index=False)
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
    info = dict(infos[0])
    info.pop("fingerprint", None)
    info.pop("run", None)
    info.update(
        complete=True,
        reshard={"inputs": input_urls, "config": asdict(config), "samples_in": total_in,
                 "samples_selected": kept, "samples_filtered_out": total_in - kept, "splits": counts},
        packages=package_versions(),
        shards=[{"name": r["shard"], "tar": r["files"]["tar"]["name"], "samples": r["samples"], "bytes": r["bytes"],
                 "sha256": r["sha256"]} for recs in records.values() for r in recs],
        funnel={"samples": kept, "splits": counts},
    )
    write_json(dest, "dataset.json", info)
    return {"out": dest.url, "samples_in": total_in, "samples_out": kept, "splits": counts,
            "shards": {s: len(recs) for s, recs in records.items()}}


def _slim(chunk: pd.DataFrame) -> pd.DataFrame:
    return chunk[list(INDEX_COLUMNS) + ["src_dataset", "src_tar", "src_offset"]].reset_index(drop=True)


def write_reshard_shard(dest: Location, name: str, chunk: pd.DataFrame, inputs: list[str],
                        endpoint: str | None = None) -> dict:
    """Copy the chunk's samples verbatim into one new shard and commit it. Runs of samples that sit back
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
    return commit_shard(dest, name, buffer.getvalue(), index_buf.getvalue(), parquet_bytes([], LEDGER_COLUMNS), fields)


def _chunks(part: pd.DataFrame, config: ReshardConfig):
    if not len(part):
        return
    if config.bytes_per_shard:
        sizes = part["bytes"].fillna(0).to_numpy()
        start, acc = 0, 0
        for i, size in enumerate(sizes):
            if acc and acc + size > config.bytes_per_shard:
                yield part.iloc[start:i]
                start, acc = i, 0
            acc += size
        yield part.iloc[start:]
        return
    step = max(1, config.samples_per_shard or 1000)
    for i in range(0, len(part), step):
        yield part.iloc[i:i + step]
