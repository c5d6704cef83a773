"""Row conventions shared by every stage.

A row is a plain dict, because rows cross Arrow, Ray and tar boundaries. Every row carries the reserved
keys below; a stage that fails on a row does not raise, it returns the row marked as an error with a
reason from the closed vocabulary `REASONS`, and later stages pass such rows through untouched.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import TypedDict

import numpy as np

OK = "ok"
ERROR = "error"

# The closed vocabulary of failure reasons. `TRANSIENT` ones may succeed on a retry.
REASONS = {
    # input
    "bad_manifest_row": "the manifest row lacks a usable video path or caption",
    "missing": "the video file does not exist",
    "fetch_error": "a remote video could not be fetched (network, size limit): may succeed on a retry",
    "fetch_refused": "the remote video's URL redirects where clipforge will not follow (private address, non-http)",
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
    "tokenize_transient": "the tokenizer hit a device error (CUDA, out of memory) that a retry may not hit",
    # anything unexpected, caught at a stage boundary so the job survives
    "internal_error": "an unexpected exception in a stage (a bug: please report)",
}
TRANSIENT = frozenset({"timeout", "worker_crash", "internal_error", "tokenize_transient", "fetch_error"})


class Row(TypedDict, total=False):
    """Every key a row can carry on its way from manifest to shard (stages add keys, never rename)."""
    # reserved keys, present on every row
    key: str            # stable, unique, dot-free and slash-free sample key
    source: str         # the video path or URL from the manifest
    status: str         # "ok" or "error"
    reason: str         # one of REASONS when status == "error"
    error: str          # short human-readable message for the ledger
    stage: str          # the stage that produced the error
    # manifest (clipforge.pipeline.manifest)
    row_index: int      # position of the input row in the manifest
    row_id: str         # the manifest's own `id`, else "r<row_index>"
    row_key: str        # the sample keys' prefix: unique per manifest row
    video_id: str       # hash of the normalised source: shared by all rows of one video
    caption: str
    start: float        # trim, seconds (None: from the start)
    end: float          # trim, seconds (None: to the end)
    extra: dict         # extra manifest columns, carried into sample metadata
    # captions (clipforge.pipeline.text.captions.CleanCaption)
    caption_raw: str
    caption_flags: list
    caption_script: str
    caption_language: str
    # decode (clipforge.pipeline.video.decode_stage.DecodeVideo): one row per clip
    clip_index: int
    clips_total: int
    mode: str           # "sequential" or "interpolation"
    rate: float         # frames per second of the clip
    span: float         # seconds the clip's frames cover
    frame_indices: list  # source frame indices (display order)
    timestamps: list    # the returned pictures' pts x time base, seconds
    crop: list          # crop box in the displayed, resized picture
    decoder: str        # "decord" or "pyav"
    clock: str          # how timestamps were obtained
    source_info: dict   # width, height, fps, frames, duration, rotation, codec, ...
    frames: np.ndarray  # uint8 [T, S, S, 3]
    # tokenize (clipforge.pipeline.tokenize.TokenizeClips)
    vtok: np.ndarray    # uint16 [T, h, w]
    ttok: np.ndarray    # int32 [n]
    caption_tokens: int
    caption_cut: bool   # the caption did not fit the whole text slot
    tokenizers: dict    # {"image": {"id", "sha256"}, "text": {...}}


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


def normalise_source(source: str) -> str:
    """One spelling per video: an absolute, normalised local path, or a URL with its scheme and host in
    lower case and its path normalised (query kept: signed URLs differ by their query)."""
    import posixpath
    from urllib.parse import urlsplit, urlunsplit

    source = str(source).strip()
    if "://" in source:
        parts = urlsplit(source)
        path = posixpath.normpath(parts.path) if parts.path else ""
        if parts.path.endswith("/") and not path.endswith("/"):
            path += "/"
        if parts.scheme.lower() == "file":
            return os.path.normpath(parts.path)
        return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))
    return os.path.normpath(os.path.abspath(source))


def video_id_for(source: str) -> str:
    """The source video's id: a stable hash of its normalised location. Every manifest row that names the
    same video shares it (MSR-VTT lists 20 captions per video), so splits grouped by it never leak."""
    return hashlib.sha1(normalise_source(source).encode("utf-8")).hexdigest()[:16]


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
