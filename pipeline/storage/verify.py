"""`clipforge verify DATASET`: check a built dataset end to end, reading every byte of every shard.

Tars are read with the standard library's `tarfile` and every member name is checked before anything is
used: absolute paths, `..`, links and devices are refused, and nothing is unpickled.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from clipforge.pipeline.storage.samples import REQUIRED_MEMBERS, decode_sample
from clipforge.pipeline.storage.shards import read_index, read_ledger, read_stats, sha256_file


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


def iter_tar_samples(path: Path):
    """Yield raw samples {"__key__", member suffix: bytes} from one tar, refusing unsafe members."""
    current, key = None, None
    with tarfile.open(path, "r:") as tar:
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


def verify_dataset(dataset: str | Path, split: str | None = None, max_problems: int = 50) -> dict:
    root = Path(dataset)
    problems: list[str] = []

    def problem(msg):
        if len(problems) < max_problems:
            problems.append(msg)

    info_path = root / "dataset.json"
    if not info_path.exists():
        return {"dataset": str(root), "problems": [f"{info_path} is missing"], "samples": 0, "shards": 0}
    info = json.loads(info_path.read_text())
    layout = info["layout"]
    expected_shape = (layout["frames"], layout["tokens_h"], layout["tokens_w"])
    vocab = layout.get("image_vocab")
    tok_ids = {k: v["sha256"] for k, v in info["tokenizers"].items()}
    index, ledger = read_index(root), read_ledger(root)
    stats = read_stats(root, split)
    keys: Counter = Counter()
    samples = 0
    for st in stats:
        tar = root / "shards" / f"{st['shard']}.tar"
        if not tar.exists():
            problem(f"{tar.name}: missing (stats exist)")
            continue
        if sha256_file(tar) != st["sha256"]:
            problem(f"{tar.name}: sha256 differs from its stats")
        n = 0
        try:
            for raw in iter_tar_samples(tar):
                n += 1
                keys[raw["__key__"]] += 1
                missing = [m for m in REQUIRED_MEMBERS if m not in raw]
                if missing:
                    problem(f"{tar.name}:{raw['__key__']}: incomplete sample, lacks {missing}")
                    continue
                s = decode_sample(raw)
                if tuple(s["vtok"].shape) != expected_shape:
                    problem(f"{tar.name}:{s['key']}: vtok shape {s['vtok'].shape} != layout {expected_shape}")
                if vocab is not None and s["vtok"].size and int(s["vtok"].max()) >= vocab:
                    problem(f"{tar.name}:{s['key']}: image code {int(s['vtok'].max())} outside codebook {vocab}")
                hashes = {k: v.get("sha256") for k, v in (s["meta"].get("tokenizers") or {}).items()}
                if hashes != tok_ids:
                    problem(f"{tar.name}:{s['key']}: tokenizer hashes differ from dataset.json")
        except (tarfile.TarError, ValueError, OSError) as err:
            problem(f"{tar.name}: unreadable: {err}")
        if n != st["samples"]:
            problem(f"{tar.name}: {n} samples but its stats say {st['samples']}")
        idx_n = int((index["shard"] == st["shard"]).sum()) if len(index) else 0
        if idx_n != n:
            problem(f"{tar.name}: {n} samples but the index lists {idx_n}")
        samples += n
    dupes = [k for k, c in keys.items() if c > 1]
    if dupes:
        problem(f"{len(dupes)} duplicate keys across shards, e.g. {dupes[:3]}")
    funnel = info.get("funnel", {})
    for wids_file in sorted((root / "wids").glob("*.json")):
        listed = json.loads(wids_file.read_text())["shardlist"]
        for entry in listed:
            name = Path(entry["url"]).stem
            st = next((s for s in stats if s["shard"] == name), None)
            if st is None or st["samples"] != entry["nsamples"]:
                problem(f"{wids_file.name}: {name} lists {entry['nsamples']} samples, its stats disagree")
    if "inputs" not in funnel:   # a resharded dataset: no manifest to account for
        return {"dataset": str(root), "shards": len(stats), "samples": samples, "ledger_rows": len(ledger),
                "inputs": None, "problems": problems}
    accounted = (index["row_index"].nunique() if len(index) else 0) + len(set(ledger["row_index"]) - set(index["row_index"]))
    if funnel.get("inputs") is not None and accounted != funnel["inputs"]:
        problem(f"{funnel['inputs']} inputs but {accounted} accounted for by samples and ledger rows")
    if funnel.get("samples") is not None and funnel["samples"] != samples:
        problem(f"dataset.json counts {funnel['samples']} samples, the shards hold {samples}")
    return {"dataset": str(root), "shards": len(stats), "samples": samples, "ledger_rows": len(ledger),
            "inputs": funnel.get("inputs"), "problems": problems}
