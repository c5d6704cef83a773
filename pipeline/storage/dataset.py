"""Dataset-level files: the funnel and `wids/<split>.json`, computed from the shards' commit records.

Recomputing from the records on disk (not from a run's memory) keeps them right after `--resume` and
`--retry-failed`, which only redo some shards, and reads no tar or index bytes.
"""
from __future__ import annotations

import platform
from collections import Counter
from importlib import metadata

from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.shards import write_json

FORMAT_VERSION = 2
PACKAGES = ("clipforge", "torch", "numpy", "decord", "av", "webdataset", "ray", "pandas", "pyarrow", "ftfy",
            "sentencepiece")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def funnel_from_records(records: list[dict], inputs: int) -> dict:
    """inputs → videos decoded → clips → samples written, and failures by stage/reason.

    `videos_decoded` counts inputs whose video was decoded into clips (caption failures were never
    decoded and are not subtracted from anything else); `clips` counts every clip cut, whether it
    became a sample or failed later.
    """
    with_samples = sum(r["inputs_with_samples"] for r in records)
    without = sum(r["inputs_failed"] for r in records)
    failures: Counter = Counter()
    for r in records:
        failures.update(r.get("errors_by_stage_reason", {}))
    return {
        "inputs": inputs,
        "shards": len(records),
        "videos_decoded": sum(r.get("videos_decoded", 0) for r in records),
        "clips": sum(r.get("clips", r["samples"]) for r in records),
        "samples": sum(r["samples"] for r in records),
        "inputs_with_samples": with_samples,
        "inputs_without_samples": without,
        "accounted": with_samples + without == inputs,
        "failures": dict(sorted(failures.items())),
    }


def write_wids_index(out: Location, records: list[dict], split: str = "train") -> None:
    """The shard list wids reads for random access (empty shards are left out: wids cannot index them).
    URLs are relative to the index file, so the dataset can be moved or read from an object store."""
    shardlist = [{"url": f"../{r['files']['tar']['name']}", "nsamples": r["samples"]} for r in records if r["samples"]]
    out.makedirs("wids")
    write_json(out, f"wids/{split}.json", {"__kind__": "wids-shard-index-v1", "name": f"clipforge-{split}",
                                            "wids_version": 1, "shardlist": shardlist})
