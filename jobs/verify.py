"""`clipforge verify DATASET`: every committed part's bytes, every sample, and the dataset's accounting.

The per-shard check is `clipforge.pipeline.storage.verify.verify_shard`; this job runs it over the accepted
commit records through the one executor (in process, or as Ray tasks with `--address`), then checks keys
across shards, the wids index against the records, and the funnel against the manifest's inputs.
"""
from __future__ import annotations

import json

import numpy as np

from clipforge.jobs.executor import run_tasks
from clipforge.pipeline.storage.dataset import DatasetError, DatasetInfo
from clipforge.pipeline.storage.fs import as_location
from clipforge.pipeline.storage.progress import ProgressTracker
from clipforge.pipeline.storage.shards import read_records
from clipforge.pipeline.storage.verify import verify_shard


def verify_dataset(dataset, split: str | None = None, max_problems: int = 50, address: str | None = None,
                   endpoint: str | None = None, runner: str | None = None, progress: bool = False) -> dict:
    """Check a dataset end to end, reading every byte of every committed part. With `address` (or
    `runner="ray"`), the shards are checked by Ray tasks (the driver only gathers key hashes and problems),
    through the same executor as the build: retried, with progress."""
    root = as_location(dataset, endpoint)
    problems: list[str] = []

    def problem(msg):
        if len(problems) < max_problems:
            problems.append(msg)

    if not root.exists("dataset.json"):
        return {"dataset": root.url, "problems": [f"{root.child_url('dataset.json')} is missing"], "samples": 0,
                "shards": 0}
    try:
        info = DatasetInfo.read(root)
    except DatasetError as err:
        return {"dataset": root.url, "problems": [str(err)], "samples": 0, "shards": 0}
    if not info.complete:
        problem("dataset.json says the build did not complete (run build --resume)")
    layout, tok_sha = info.layout, info.tokenizer_hashes
    records = read_records(root, split)
    results: list[dict] = []
    tracker = ProgressTracker(None, len(records), len(records), progress, unit="shard")
    run_tasks(_verify_task, (root, layout, tok_sha, max_problems), iter(records),
              on_result=lambda r, result: (results.append(result), tracker.add({"inputs": 1})),
              on_failure=lambda r, err: {"samples": 0, "key_hashes": np.zeros(0, np.uint64),
                                         "problems": [f"{r['shard']}: could not be checked: {type(err).__name__}: {err}"]},
              progress=tracker, runner=runner or ("ray" if address is not None else "local"), address=address,
              name=lambda r: r["shard"])
    tracker.close()
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
    funnel = info.funnel
    report = {"dataset": root.url, "shards": len(records), "samples": samples,
              "ledger_rows": sum(sum(r.get("errors_by_reason", {}).values()) for r in records),
              "inputs": funnel.get("inputs"), "roundtrip_psnr": _psnr_summary(records), "problems": problems}
    if funnel.get("samples") is not None and funnel["samples"] != samples:
        problem(f"dataset.json counts {funnel['samples']} samples, the shards hold {samples}")
    if "inputs" not in funnel:   # a resharded dataset: no manifest to account for
        report["problems"] = problems
        return report
    accounted = sum(r.get("inputs_with_samples", 0) + r.get("inputs_failed", 0) for r in records)
    if funnel.get("inputs") is not None and accounted != funnel["inputs"]:
        problem(f"{funnel['inputs']} inputs but {accounted} accounted for by samples and ledger rows")
    report["problems"] = problems
    return report



def _verify_task(context: tuple, record: dict) -> dict:
    root, layout, tok_sha, max_problems = context
    return verify_shard(root, record, layout, tok_sha, max_problems)


def _psnr_summary(records: list[dict]) -> dict:
    values = [v for r in records for v in r.get("roundtrip_psnr", []) if v is not None and v >= 0]
    if not values:
        return {"clips": 0}
    return {"clips": len(values), "mean_db": round(float(np.mean(values)), 2), "min_db": round(float(np.min(values)), 2)}
