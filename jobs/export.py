"""`clipforge export cogvideo DATASET OUT.bin`, and its check (`clipforge verify DATASET --export OUT.bin`).

Wiring only: the row layout is `clipforge.pipeline.storage.cogvideo`'s. The dataset streams shard by shard
in commit order from any filesystem; its text tokenizer (checked against dataset.json's sha256) makes the
duration ids. The rows go to `OUT.bin.partial` and are renamed into place with the sidecar written
first-to-last, so a reader never sees a half file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from clipforge.model.data import open_pinned_tokenizers, read_dataset_info
from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.atomic import atomic_write, fsync_dir
from clipforge.pipeline.storage.cogvideo import (KeyDigest, check_exportable, cogvideo_row, read_sidecar,
                                                 row_length, sidecar, sidecar_path)
from clipforge.pipeline.storage.shards import dataset_samples
from clipforge.tokenizer.icetk import duration_text


def exported_rows(dataset: str, text_len: int, endpoint: str | None = None, progress: bool = False
                  ) -> tuple[dict, Iterator[tuple[str, str, np.ndarray]]]:
    """(dataset info, iterator of (key, mode, row)) in the order an export writes them."""
    info = read_dataset_info(dataset)
    check_exportable(info, text_len)
    text = open_pinned_tokenizers(dataset, info, kinds=("text",))[1]["text"]
    layout = info["layout"]
    shape = (int(layout["frames"]), int(layout["tokens_h"]), int(layout["tokens_w"]))
    durations: dict[float, list[int]] = {}

    def rows():
        from tqdm import tqdm

        total = (info.get("funnel") or {}).get("samples")
        for sample in tqdm(dataset_samples(dataset, "train", endpoint), total=total, unit="row",
                           desc="export", disable=not progress):
            meta = sample["meta"]
            if tuple(sample["vtok"].shape) != shape:
                raise ClipforgeError(f"{sample['key']}: codes of shape {sample['vtok'].shape}, the layout says {shape}")
            span = float(meta["span"])
            if span not in durations:
                durations[span] = text.encode(duration_text(span))
            yield sample["key"], str(meta.get("mode")), cogvideo_row(
                durations[span], sample["ttok"], sample["vtok"], text_len, text.pad_id, text.sep_id)

    return info, rows()


def export_cogvideo(dataset: str, out: str, text_len: int = 64, overwrite: bool = False,
                    endpoint: str | None = None, progress: bool = True) -> dict:
    """Write every training sample of `dataset` as one cogdata row to `out`, and `out.json` beside it."""
    if "://" in str(out):
        raise ClipforgeError(f"{out}: the export is written to a local file (CogVideo's loader memory-maps "
                             f"it); copy it to object storage afterwards")
    target = Path(out)
    for path in (target, Path(sidecar_path(out))):
        if path.exists() and not overwrite:
            raise ClipforgeError(f"{path} exists: pass --overwrite to replace it")
    info, rows = exported_rows(dataset, text_len, endpoint, progress)
    length = row_length(info["layout"], text_len)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest, keys, modes, count = hashlib.sha256(), KeyDigest(), Counter(), 0
    try:
        with open(partial, "wb") as f:
            for key, mode, row in rows:
                blob = row.tobytes()
                f.write(blob)
                digest.update(blob)
                keys.add(key)
                modes[mode] += 1
                count += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if count == 0:
        partial.unlink(missing_ok=True)
        raise ClipforgeError(f"{dataset}: no training samples to export")
    meta = sidecar(count, length, text_len, info["layout"], info.get("tokenizers") or {}, str(dataset),
                   info.get("fingerprint_sha256"), digest.hexdigest(), keys.hexdigest(), dict(modes))
    os.replace(partial, target)
    atomic_write(Path(sidecar_path(out)), json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8"))
    fsync_dir(target.parent)
    return {"out": str(target), **{k: meta[k] for k in ("rows", "row_length", "dtype", "bytes", "modes")}}


def verify_export(dataset: str, bin_path: str, endpoint: str | None = None, max_problems: int = 20) -> dict:
    """Rebuild every row from the dataset and compare it with the file, row by row; the sidecar's counts
    and digests must agree too."""
    meta = read_sidecar(bin_path)
    problems: list[str] = []
    size = os.path.getsize(bin_path)
    length = int(meta["row_length"])
    if size != int(meta["rows"]) * length * 4:
        problems.append(f"{bin_path}: {size} bytes, the sidecar says {meta['rows']} rows of {length} int32")
    stored = np.memmap(bin_path, dtype=np.int32, mode="r", shape=(size // (4 * length), length))
    info, rows = exported_rows(dataset, int(meta["text_len"]), endpoint)
    keys, n = KeyDigest(), 0
    for key, _, row in rows:
        if n < len(stored) and (len(row) != length or not np.array_equal(stored[n], row)) and len(problems) < max_problems:
            problems.append(f"row {n} ({key}) differs from the dataset's sample")
        keys.add(key)
        n += 1
    if n != len(stored):
        problems.append(f"the dataset makes {n} rows, {bin_path} holds {len(stored)}")
    if keys.hexdigest() != meta.get("keys_sha256"):
        problems.append("the dataset's keys (or their order) differ from the ones exported")
    digest = hashlib.sha256()
    with open(bin_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != meta.get("sha256"):
        problems.append(f"{bin_path}: sha256 differs from the sidecar's")
    return {"export": str(bin_path), "rows": int(len(stored)), "row_length": length, "problems": problems}
