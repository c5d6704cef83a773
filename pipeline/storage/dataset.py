"""`dataset.json` and `wids/<split>.json`: rebuilt from the committed shards' stats, index and ledger.

Recomputing from what is on disk (not from the run's memory) keeps them right after `--resume` and
`--retry-failed`, which only redo some shards.
"""
from __future__ import annotations

import platform
from collections import Counter
from importlib import metadata
from pathlib import Path

from clipforge.pipeline.storage.shards import read_index, read_ledger, read_stats, write_json_atomic

FORMAT_VERSION = 1
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


def funnel(dataset: Path, inputs: int) -> dict:
    """inputs → videos decoded → clips → samples written, and failures by stage and reason."""
    index, ledger = read_index(dataset), read_ledger(dataset)
    input_failures = ledger[ledger["stage"].isin(["manifest", "captions", "decode", "build"])]
    clip_failures = ledger[~ledger.index.isin(input_failures.index)]
    inputs_with_samples = index["row_index"].nunique() if len(index) else 0
    inputs_without = len(set(ledger["row_index"]) - set(index["row_index"]))
    return {
        "inputs": inputs,
        "videos_decoded": inputs - len(input_failures),
        "clips": len(index) + len(clip_failures),
        "samples": len(index),
        "inputs_with_samples": int(inputs_with_samples),
        "inputs_without_samples": int(inputs_without),
        "accounted": int(inputs_with_samples) + int(inputs_without) == inputs,
        "failures": {f"{st}/{rs}": int(n) for (st, rs), n in
                     sorted(Counter(zip(ledger["stage"], ledger["reason"])).items())},
    }


def write_dataset_info(out_dir: Path, manifest: str, config: dict, layout: dict, image_tokenizer: str,
                       text_tokenizer: str, inputs: int, split: str = "train") -> dict:
    from clipforge.tokenizer.image import ImageTokenizer
    from clipforge.tokenizer.text import TextTokenizer

    out_dir = Path(out_dir)
    stats = read_stats(out_dir, split)
    img, txt = ImageTokenizer.load(image_tokenizer), TextTokenizer(text_tokenizer)
    info = {
        "format": "clipforge-dataset", "format_version": FORMAT_VERSION,
        "manifest": str(manifest),
        "config": config,
        "layout": layout,
        "sequence": {"text_slot": layout["text_slot"], "frames": layout["frames"],
                     "tokens_per_frame": layout["tokens_h"] * layout["tokens_w"],
                     "tokens": layout["text_slot"] + layout["frames"] * layout["tokens_h"] * layout["tokens_w"]},
        "tokenizers": {
            "image": {"id": img.tokenizer_id, "sha256": img.sha256, "path": str(Path(image_tokenizer).resolve())},
            "text": {"id": txt.tokenizer_id, "sha256": txt.sha256, "path": str(Path(text_tokenizer).resolve())},
        },
        "packages": package_versions(),
        "shards": [{"name": s["shard"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                   for s in stats],
        "funnel": funnel(out_dir, inputs),
    }
    write_json_atomic(out_dir / "dataset.json", info)
    write_wids_index(out_dir, stats, split)
    return info


def write_wids_index(out_dir: Path, stats: list[dict], split: str = "train") -> None:
    """The shard list wids reads for random access (empty shards are left out: wids cannot index them)."""
    (out_dir / "wids").mkdir(exist_ok=True)
    shardlist = [{"url": f"../shards/{s['shard']}.tar", "nsamples": s["samples"]} for s in stats if s["samples"]]
    write_json_atomic(out_dir / "wids" / f"{split}.json",
                      {"__kind__": "wids-shard-index-v1", "name": f"clipforge-{split}", "wids_version": 1,
                       "shardlist": shardlist})
