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
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.pipeline.storage.dataset import package_versions, write_wids_index
from clipforge.pipeline.storage.shards import INDEX_COLUMNS, read_index, read_ledger, shard_name, write_json_atomic
from clipforge.pipeline.storage.tarwriter import BLOCK, FastTarWriter
from clipforge.pipeline.storage.verify import safe_member, unsafe_name


@dataclass(frozen=True)
class ReshardConfig:
    samples_per_shard: int | None = 1000
    bytes_per_shard: int | None = None       # when set, shards close at this size instead
    shuffle_seed: int | None = None          # None keeps the input order
    filter: str | None = None                # a pandas query over the index, e.g. "rate >= 1 and caption_tokens <= 64"
    val_fraction: float = 0.0                # share of source videos held out for validation
    val_seed: int = 0


def _sample_ranges(tar_path: Path) -> dict[str, tuple[int, int]]:
    """key -> (start, length) of the sample's members (headers, data, padding) in the tar.

    A sample's members are contiguous in our shards, so a sample is one positioned read and its bytes
    go to the new shard verbatim. Plain USTAR headers are parsed directly (tarfile would cost ~40 µs a
    member); archives with extended headers go through tarfile. Unsafe members are refused either way.
    """
    ranges: dict[str, list[int]] = {}
    with open(tar_path, "rb") as f:
        pos = 0
        while True:
            header = f.read(BLOCK)
            if len(header) < BLOCK or header == b"\0" * BLOCK:
                break
            kind = header[156:157]
            if kind not in (b"0", b"\0"):
                if kind in (b"x", b"g", b"L", b"K"):
                    return _sample_ranges_tarfile(tar_path)
                raise ValueError(f"{tar_path.name}: member of type {kind!r} refused (links and devices are not read)")
            name = (header[345:500].rstrip(b"\0") + b"/" if header[345] else b"") + header[0:100].rstrip(b"\0")
            name_s = name.decode("utf-8", "replace")
            problem = unsafe_name(name_s)
            if problem:
                raise ValueError(f"{tar_path.name}: {problem}")
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            end = pos + BLOCK + size + (-size % BLOCK)
            key = name_s.rpartition("/")[2].partition(".")[0]
            span = ranges.get(key)
            if span is None:
                ranges[key] = [pos, end]
            elif span[1] == pos:
                span[1] = end
            else:
                raise ValueError(f"{tar_path.name}: members of {key!r} are not contiguous")
            f.seek(end)
            pos = end
    return {k: (a, b - a) for k, (a, b) in ranges.items()}


def _sample_ranges_tarfile(tar_path: Path) -> dict[str, tuple[int, int]]:
    ranges: dict[str, list[int]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            problem = safe_member(m)
            if problem:
                raise ValueError(f"{tar_path.name}: {problem}")
            key = m.name.rpartition("/")[2].partition(".")[0]
            end = m.offset_data + m.size + (-m.size % BLOCK)
            ranges.setdefault(key, [m.offset, end])[1] = end
    return {k: (a, b - a) for k, (a, b) in ranges.items()}


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


def reshard(inputs: list[str], out: str, config: ReshardConfig = ReshardConfig(), progress: bool = True) -> dict:
    from tqdm import tqdm

    out_dir = Path(out)
    if (out_dir / "dataset.json").exists():
        raise FileExistsError(f"{out} already holds a dataset")
    infos = []
    frames = []
    for n, path in enumerate(inputs):
        info_path = Path(path) / "dataset.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{path}: not a clipforge dataset (no dataset.json)")
        infos.append(json.loads(info_path.read_text()))
        idx = read_index(path)
        idx["src_dataset"] = n
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
    videos = index["video_id"].astype(str)
    held_out = {v for v in videos.unique() if _in_validation(v, config.val_fraction, config.val_seed)}
    is_val = videos.isin(held_out).to_numpy()
    splits = {"train": index[~is_val], "val": index[is_val]}

    for sub in ("shards", "index", "ledger"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    sources = _Sources(inputs)
    keymap, written = [], {}
    bar = tqdm(total=kept, desc="reshard", unit="sample", disable=not progress)
    for split, part in splits.items():
        stats = []
        for shard_no, chunk in enumerate(_chunks(part, config)):
            name = shard_name(split, shard_no)
            stats.append(_write_shard(out_dir, name, chunk, sources))
            keymap.append(pd.DataFrame({"key": chunk["key"].to_numpy(),
                                        "old_dataset": [str(inputs[d]) for d in chunk["src_dataset"]],
                                        "old_shard": chunk["shard"].to_numpy(), "split": split, "shard": name}))
            bar.update(len(chunk))
        write_wids_index(out_dir, stats, split)
        written[split] = stats
    bar.close()
    sources.close()
    ledgers = [read_ledger(p) for p in inputs]   # failures of the builds stay on record
    ledger = pd.concat(ledgers, ignore_index=True) if ledgers else pd.DataFrame()
    if len(ledger):
        ledger.to_parquet(out_dir / "ledger" / "inherited.parquet", index=False)
    keymap_df = pd.concat(keymap, ignore_index=True) if keymap else \
        pd.DataFrame(columns=["key", "old_dataset", "old_shard", "split", "shard"])
    keymap_df.to_parquet(out_dir / "keymap.parquet", index=False)

    counts = {s: sum(x["samples"] for x in st) for s, st in written.items()}
    if sum(counts.values()) != kept:
        raise RuntimeError(f"reshard wrote {sum(counts.values())} samples but {kept} were selected")
    info = dict(infos[0])
    info.update(
        reshard={"inputs": [str(p) for p in inputs], "config": asdict(config), "samples_in": total_in,
                 "samples_selected": kept, "samples_filtered_out": total_in - kept, "splits": counts},
        packages=package_versions(),
        shards=[{"name": s["shard"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                for st in written.values() for s in st],
        funnel={"samples": kept, "splits": counts},
    )
    write_json_atomic(out_dir / "dataset.json", info)
    return {"out": str(out_dir), "samples_in": total_in, "samples_out": kept, "splits": counts,
            "shards": {s: len(st) for s, st in written.items()}}


class _Sources:
    """Source tars, opened once; byte ranges from the index, or from a header scan when the index has
    no sizes or disagrees with the tar."""

    def __init__(self, inputs: list[str]):
        self.inputs = inputs
        self.files: dict[tuple[int, str], int] = {}
        self.scanned: dict[tuple[int, str], dict] = {}

    def fd(self, dataset: int, shard: str) -> int:
        key = (dataset, shard)
        if key not in self.files:
            self.files[key] = os.open(self.path(dataset, shard), os.O_RDONLY)
        return self.files[key]

    def path(self, dataset: int, shard: str) -> Path:
        return Path(self.inputs[dataset]) / "shards" / f"{shard}.tar"

    def scan(self, dataset: int, shard: str) -> dict:
        key = (dataset, shard)
        if key not in self.scanned:
            self.scanned[key] = _sample_ranges(self.path(dataset, shard))
        return self.scanned[key]

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def _read_samples(sources: _Sources, dataset: int, shard: str, start: int, keys: list, sizes: list) -> bytes:
    """Bytes of consecutive samples starting at `start`; each sample must begin with its own header."""
    blob = os.pread(sources.fd(dataset, shard), sum(sizes), start)
    offset = 0
    for key, size in zip(keys, sizes):
        if blob[offset:offset + len(key) + 1] != f"{key}.".encode():
            break
        offset += size
    else:
        if offset == len(blob):
            return blob
    ranges = sources.scan(dataset, shard)   # the index does not describe this tar: trust the headers
    return b"".join(os.pread(sources.fd(dataset, shard), ranges[k][1], ranges[k][0]) for k in keys)


def _write_shard(out_dir: Path, name: str, chunk: pd.DataFrame, sources: _Sources) -> dict:
    """Copy the chunk's samples verbatim into a new shard; runs of samples that sit back to back in one
    source tar (an unshuffled re-cut or merge) are copied with a single read."""
    tar_path = out_dir / "shards" / f"{name}.tar"
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    sizes = []
    run = None   # [dataset, shard, start, end, keys, sizes]
    with open(tmp, "wb") as stream:
        writer = FastTarWriter(stream)
        for dataset, shard, key, start, size in zip(chunk["src_dataset"].tolist(), chunk["shard"].tolist(),
                                                    chunk["key"].tolist(), chunk["src_offset"].tolist(),
                                                    chunk["bytes"].tolist()):
            if not size:   # no recorded size: find the range from the headers
                start, size = sources.scan(dataset, shard)[key]
            sizes.append(size)
            if run and run[0] == dataset and run[1] == shard and run[3] == start:
                run[3] += size
                run[4].append(key)
                run[5].append(size)
                continue
            if run:
                writer.write_raw(_read_samples(sources, run[0], run[1], run[2], run[4], run[5]))
            run = [dataset, shard, start, start + size, [key], [size]]
        if run:
            writer.write_raw(_read_samples(sources, run[0], run[1], run[2], run[4], run[5]))
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    index = chunk.drop(columns=["src_dataset", "src_offset"]).assign(shard=name, bytes=sizes)
    table = pa.Table.from_pandas(index[list(INDEX_COLUMNS)], schema=pa.schema(list(INDEX_COLUMNS.items())),
                                 preserve_index=False)
    pq.write_table(table, out_dir / "index" / f"{name}.parquet")
    os.replace(tmp, tar_path)
    st = {"shard": name, "samples": len(chunk), "bytes": writer.written, "sha256": writer.sha256, "errors_by_reason": {}}
    write_json_atomic(out_dir / "shards" / f"{name}.json", st)
    return st


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
