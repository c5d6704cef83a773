"""CogVideo's training rows, as cogdata writes them, from a clipforge dataset built with icetk tokenizers.

cogdata's video task (`icetk_video_text_length_tokenization_task`) saves every clip as one fixed-length
row of int32 with `BinarySaver` (raw bytes, no header); SwissArmyTransformer's and cogdata's
`BinaryDataset` memory-map the file as `(rows, row_length)`. A row is, in this order:

    text_len text ids   the duration ("4.0秒", icetk ids), `<n>`, the caption's icetk ids cut to
                        `text_len - len(duration) - 3` with every `<n>` turned into `<pad>`, then `<pad>`
                        up to `text_len` (64 by default)
    frames x h x w      the clip's image codes, frame after frame, each frame row by row (20 x 20 per
                        160px frame at icetk's compression 8)

Text ids are icetk's (sentencepiece id + 20,000), image codes are icetk's (0..19,999): one token space,
CogView2's. A sidecar `OUT.bin.json` says the row length, dtype, the number of rows and where they came
from; `clipforge verify DATASET --export OUT.bin` rebuilds every row from the dataset and compares.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from clipforge.pipeline.errors import ClipforgeError

DTYPE = "int32"
SIDECAR_SUFFIX = ".json"
FORMAT = "cogdata-binary"
MIN_SEPARATION = 3          # cogdata keeps at least this many <pad> after the caption


def sidecar_path(bin_path: str) -> str:
    return str(bin_path) + SIDECAR_SUFFIX


def check_exportable(info: dict, text_len: int) -> None:
    """Refuse, with one line, a dataset whose tokenizers or layout cannot make CogVideo rows."""
    tokenizers, layout = info.get("tokenizers") or {}, info.get("layout") or {}
    for kind in ("image", "text"):
        tid = str((tokenizers.get(kind) or {}).get("id", ""))
        if not tid.startswith(f"icetk-{kind}"):
            raise ClipforgeError(f"the dataset's {kind} tokenizer is {tid or 'unknown'}, not icetk's: CogVideo "
                                 f"rows need icetk tokens (build with --{kind}-tokenizer icetk:PATH)")
    if text_len < 8:
        raise ClipforgeError(f"--text-len {text_len} leaves no room for the duration and a caption")
    slot = int(layout.get("text_slot", 0))
    if slot < text_len - MIN_SEPARATION - 1:
        raise ClipforgeError(f"captions were cut to {slot} tokens at build time: --text-len can be at most "
                             f"{slot + MIN_SEPARATION + 1}")


def row_length(layout: dict, text_len: int) -> int:
    return text_len + int(layout["frames"]) * int(layout["tokens_h"]) * int(layout["tokens_w"])


def cogvideo_row(duration_ids: list[int], caption_ids, codes: np.ndarray, text_len: int, pad_id: int,
                 sep_id: int) -> np.ndarray:
    """One row (int32): cogdata's text part, then every frame's codes in order."""
    text = np.full(text_len, pad_id, dtype=np.int64)
    caption = np.asarray(caption_ids, dtype=np.int64)[:max(0, text_len - len(duration_ids) - MIN_SEPARATION)]
    caption = np.where(caption == sep_id, pad_id, caption)
    head = len(duration_ids)
    text[:head] = duration_ids
    text[head] = sep_id
    text[head + 1:head + 1 + len(caption)] = caption
    return np.concatenate([text, np.asarray(codes, dtype=np.int64).reshape(-1)]).astype(np.int32)


def sidecar(rows: int, length: int, text_len: int, layout: dict, tokenizers: dict, dataset: str,
            fingerprint: str | None, digest: str, keys_digest: str, modes: dict) -> dict:
    return {"format": FORMAT, "dtype": DTYPE, "row_length": length, "rows": rows, "bytes": rows * length * 4,
            "text_len": text_len, "frames": int(layout["frames"]), "tokens_h": int(layout["tokens_h"]),
            "tokens_w": int(layout["tokens_w"]), "sha256": digest, "keys_sha256": keys_digest,
            "modes": modes, "tokenizers": tokenizers, "dataset": dataset, "dataset_fingerprint": fingerprint,
            "read_with": f"cogdata.datasets.BinaryDataset(path, length_per_sample={length}, dtype='{DTYPE}')"}


def read_sidecar(bin_path: str) -> dict:
    from clipforge.pipeline.storage.fs import open_url

    try:
        with open_url(sidecar_path(bin_path)) as f:
            meta = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ClipforgeError(f"{sidecar_path(bin_path)} is missing: it says how to read {bin_path}") from None
    if meta.get("format") != FORMAT:
        raise ClipforgeError(f"{sidecar_path(bin_path)} is not a clipforge CogVideo export sidecar")
    return meta


class KeyDigest:
    """sha256 over the exported keys in order: says which samples, in which order, a file holds."""

    def __init__(self):
        self.h = hashlib.sha256()

    def add(self, key: str) -> None:
        self.h.update(key.encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return self.h.hexdigest()
