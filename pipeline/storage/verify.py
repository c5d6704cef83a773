"""`clipforge verify DATASET`: check a built dataset end to end, reading every byte of every shard.

Tars are read with the standard library's `tarfile` and every member name is checked before anything is
used: absolute paths, `..`, links and devices are refused, and nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq

from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.samples import REQUIRED_MEMBERS, decode_sample
from clipforge.pipeline.storage.commits import sha256_bytes


def unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe (absolute, `..`, backslashes), or None."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return f"{name}: unsafe path"
    return None


def safe_member(member: tarfile.TarInfo) -> str | None:
    """Why a member is unsafe to read, or None when it is a plain file with a plain relative name."""
    if not member.isfile():
        return f"{member.name}: not a regular file (links and devices are refused)"
    return unsafe_name(member.name)


def iter_tar_samples(source):
    """Yield raw samples {"__key__", member suffix: bytes} from one tar (a path, or a readable binary
    file object), refusing unsafe members."""
    current, key = None, None
    opened = tarfile.open(source, "r:") if isinstance(source, (str, Path)) else tarfile.open(fileobj=source, mode="r:")
    with opened as tar:
        for member in tar:
            problem = safe_member(member)
            if problem:
                raise ValueError(problem)
            base = PurePosixPath(member.name).name
            k, _, suffix = base.partition(".")
            if k != key:
                if current is not None:
                    yield current
                current, key = {"__key__": k}, k
            current[suffix] = tar.extractfile(member).read()
    if current is not None:
        yield current


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def verify_shard(out: Location, record: dict, layout: dict, tokenizer_sha: dict, max_problems: int = 50) -> dict:
    """Check one committed shard: every part's bytes against the record, every sample's members, shape,
    code range and tokenizer hashes, and the count against the record and its index part.
    Returns {"samples", "key_hashes" (uint64 array), "problems"}."""
    problems: list[str] = []
    name = record["shard"]
    expected_shape = (layout["frames"], layout["tokens_h"], layout["tokens_w"])
    vocab = layout.get("image_vocab")
    blobs = {}
    for part, f in record["files"].items():
        try:
            blob = out.read_bytes(f["name"])
        except (FileNotFoundError, OSError):
            problems.append(f"{name}: {part} part {f['name']} is missing (its record names it)")
            continue
        if len(blob) != f["bytes"] or sha256_bytes(blob) != f["sha256"]:
            problems.append(f"{name}: {part} part {f['name']}: sha256 or size differs from its record")
        blobs[part] = blob
    hashes: list[int] = []
    n = 0
    if "tar" in blobs:
        try:
            for raw in iter_tar_samples(io.BytesIO(blobs["tar"])):
                n += 1
                hashes.append(key_hash(raw["__key__"]))
                missing = [m for m in REQUIRED_MEMBERS if m not in raw]
                if missing:
                    problems.append(f"{name}:{raw['__key__']}: incomplete sample, lacks {missing}")
                    continue
                s = decode_sample(raw)
                if tuple(s["vtok"].shape) != expected_shape:
                    problems.append(f"{name}:{s['key']}: vtok shape {tuple(s['vtok'].shape)} != layout {expected_shape}")
                if vocab is not None and s["vtok"].size and int(s["vtok"].max()) >= vocab:
                    problems.append(f"{name}:{s['key']}: image code {int(s['vtok'].max())} outside codebook {vocab}")
                hashes_in = {k: v.get("sha256") for k, v in (s["meta"].get("tokenizers") or {}).items()}
                if hashes_in != tokenizer_sha:
                    problems.append(f"{name}:{s['key']}: tokenizer hashes differ from dataset.json")
        except (tarfile.TarError, ValueError, OSError) as err:
            problems.append(f"{name}: unreadable tar: {err}")
        if n != record["samples"]:
            problems.append(f"{name}: {n} samples but its record says {record['samples']}")
    if "index" in blobs:
        idx_n = pq.read_table(io.BytesIO(blobs["index"])).num_rows
        if idx_n != n:
            problems.append(f"{name}: {n} samples but its index part lists {idx_n}")
    if "ledger" in blobs and record.get("inputs") is not None and "inputs_failed" in record:
        if record.get("inputs_with_samples", 0) + record["inputs_failed"] != record["inputs"]:
            problems.append(f"{name}: {record['inputs']} inputs but {record.get('inputs_with_samples', 0)} with "
                            f"samples and {record['inputs_failed']} failed")
    return {"samples": n, "key_hashes": np.asarray(hashes, dtype=np.uint64), "problems": problems[:max_problems]}
