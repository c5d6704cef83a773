"""Row conventions shared by every stage.

A row is a plain dict, because rows cross Arrow, Ray and tar boundaries. Every row carries the reserved
keys below; a stage that fails on a row does not raise, it returns the row marked as an error with a
reason from the closed vocabulary `REASONS`, and later stages pass such rows through untouched.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Iterator, TypedDict

import numpy as np

OK = "ok"
ERROR = "error"

# The closed vocabulary of failure reasons. `TRANSIENT` ones may succeed on a retry.
REASONS = {
    # input
    "bad_manifest_row": "the manifest row lacks a usable video path or caption",
    "missing": "the video file does not exist",
    "empty": "the video file has zero bytes",
    "not_a_video": "the file has no video stream or is not a media file",
    "unsupported_codec": "no decoder could open the video stream",
    "too_short": "the video (after trimming) is too short for one sample",
    "decode_error": "the decoder failed while reading frames",
    "timeout": "decoding the video exceeded the per-video time limit",
    "worker_crash": "the isolated decode worker died (crash or memory limit)",
    # captions and tokens
    "empty_caption": "the caption is empty after cleaning",
    "tokenize_error": "the image or text tokenizer failed on this sample",
    # anything unexpected, caught at a stage boundary so the job survives
    "internal_error": "an unexpected exception in a stage (a bug: please report)",
}
TRANSIENT = frozenset({"timeout", "worker_crash", "internal_error"})


class Row(TypedDict, total=False):
    # reserved keys, present on every row
    key: str            # stable, unique, dot-free and slash-free sample key
    source: str         # the video path or URL from the manifest
    status: str         # "ok" or "error"
    reason: str         # one of REASONS when status == "error"
    error: str          # short human-readable message for the ledger
    stage: str          # the stage that produced the error
    # manifest
    row_index: int      # position of the input row in the manifest
    video_id: str
    caption: str
    caption_raw: str
    caption_flags: list
    start: float
    end: float
    extra: dict         # extra manifest columns, carried into sample metadata
    # decode / sampling
    clip_index: int
    clips_total: int
    frames: np.ndarray  # uint8 [T, S, S, 3]
    # tokens
    vtok: np.ndarray    # uint16 [T, h, w]
    ttok: np.ndarray    # int32 [n]


def mark_error(row: dict, stage: str, reason: str, message: str) -> dict:
    """Return `row` marked as failed; heavy arrays are dropped so ledger rows stay small."""
    if reason not in REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")  # a programming error, not a data error
    out = {k: v for k, v in row.items() if k not in ("frames", "vtok", "ttok")}
    out.update(status=ERROR, reason=reason, error=_one_line(message)[:500], stage=stage)
    return out


def is_ok(row: dict) -> bool:
    return row.get("status", OK) == OK


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def video_id_for(source: str, given: Any = None) -> str:
    """A stable id for a manifest row: the manifest's own `id` when given, else a hash of the source."""
    if given is not None and str(given) not in ("", "nan", "None"):
        return str(given)
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


def make_key(video_id: str, clip: str) -> str:
    """Sample key derived from the source and the clip only (never from worker order).

    webdataset splits member names at the first dot, so keys are dot- and slash-free; long ids are
    shortened with a hash so keys stay short and unique.
    """
    safe = _KEY_UNSAFE.sub("_", video_id).strip("_") or "v"
    if len(safe) > 48 or safe != video_id:
        digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:10]
        safe = f"{safe[:36]}_{digest}"
    return f"{safe}_{_KEY_UNSAFE.sub('_', clip)}"


def passthrough_errors(rows: Iterable[dict], fn) -> Iterator[dict]:
    """Apply `fn(row) -> iterable of rows` to ok rows; error rows pass through unchanged."""
    for row in rows:
        if is_ok(row):
            yield from fn(row)
        else:
            yield row
