"""`clipforge verify DATASET`: check a built dataset end to end, reading every byte of every shard.

Tars are read with the standard library's `tarfile` and every member name is checked before anything is
used: absolute paths, `..`, links and devices are refused, and nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq

from clipforge.pipeline.storage.fs import Location, as_location
from clipforge.pipeline.storage.samples import REQUIRED_MEMBERS, decode_sample
from clipforge.pipeline.storage.shards import read_records, sha256_bytes


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


def verify_dataset(dataset, split: str | None = None, max_problems: int = 50, address: str | None = None,
                   endpoint: str | None = None) -> dict:
    """Check a dataset end to end, reading every byte of every committed part. With `address`, the
    shards are checked by Ray tasks on that cluster (the driver only gathers key hashes and problems)."""
    root = as_location(dataset, endpoint)
    problems: list[str] = []

    def problem(msg):
        if len(problems) < max_problems:
            problems.append(msg)

    if not root.exists("dataset.json"):
        return {"dataset": root.url, "problems": [f"{root.child_url('dataset.json')} is missing"], "samples": 0,
                "shards": 0}
    info = json.loads(root.read_text("dataset.json"))
    if info.get("complete") is False:
        problem("dataset.json says the build did not complete (run build --resume)")
    layout = info.get("layout") or info.get("fingerprint", {}).get("layout")
    tokenizers = info.get("tokenizers") or info.get("fingerprint", {}).get("tokenizers") or {}
    tok_sha = {k: v["sha256"] for k, v in tokenizers.items()}
    records = read_records(root, split)
    if address is not None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(verify_shard).options(num_cpus=1)
        results = ray.get([task.remote(root, r, layout, tok_sha, max_problems) for r in records])
    else:
        results = [verify_shard(root, r, layout, tok_sha, max_problems) for r in records]
    samples = 0
    for result in results:
        samples += result["samples"]
        for msg in result["problems"]:
            problem(msg)
    all_hashes = np.concatenate([r["key_hashes"] for r in results]) if results else np.zeros(0, np.uint64)
    uniq, counts = np.unique(all_hashes, return_counts=True)
    if (counts > 1).any():
        problem(f"{int((counts > 1).sum())} keys appear more than once across shards")
    for wids_name in root.list("wids", ".json"):
        listed = json.loads(root.read_text(f"wids/{wids_name}"))["shardlist"]
        by_tar = {r["files"]["tar"]["name"]: r for r in records}
        for entry in listed:
            tar = entry["url"].removeprefix("../")
            r = by_tar.get(tar)
            if r is None or r["samples"] != entry["nsamples"]:
                problem(f"wids/{wids_name}: {tar} lists {entry['nsamples']} samples, its record disagrees")
    funnel = info.get("funnel", {})
    report = {"dataset": root.url, "shards": len(records), "samples": samples,
              "ledger_rows": sum(sum(r.get("errors_by_reason", {}).values()) for r in records),
              "inputs": funnel.get("inputs"), "roundtrip_psnr": _psnr_summary(records), "problems": problems}
    if "inputs" not in funnel:   # a resharded dataset: no manifest to account for
        return report
    accounted = sum(r.get("inputs_with_samples", 0) + r.get("inputs_failed", 0) for r in records)
    if funnel.get("inputs") is not None and accounted != funnel["inputs"]:
        problem(f"{funnel['inputs']} inputs but {accounted} accounted for by samples and ledger rows")
    if funnel.get("samples") is not None and funnel["samples"] != samples:
        problem(f"dataset.json counts {funnel['samples']} samples, the shards hold {samples}")
    report["problems"] = problems
    return report


def _psnr_summary(records: list[dict]) -> dict:
    values = [v for r in records for v in r.get("roundtrip_psnr", []) if v is not None and v >= 0]
    if not values:
        return {"clips": 0}
    return {"clips": len(values), "mean_db": round(float(np.mean(values)), 2), "min_db": round(float(np.min(values)), 2)}
