"""`DecodeVideo`, the build's decode stage: a manifest row in, its clip rows out.

A remote video is fetched to a temporary folder here (`clipforge.pipeline.storage.fetch`); every video is
then decoded in the isolated child (`decode.isolated_decoder`), which reads, sniffs and plans it
(`decode.decode_video`). This module is the stage: rows, reasons and fetching; `decode.py` holds the
readers and clocks.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterator

from clipforge.pipeline.schema import make_key, mark_error
from clipforge.pipeline.stages import Stage
from clipforge.pipeline.storage.fetch import FetchError, fetch
from clipforge.pipeline.storage.fs import is_remote as is_remote_video
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.admit import VIDEO_EXTENSIONS, DecodeFailure
from clipforge.pipeline.video.decode import STAGE, decode_video, isolated_decoder

FETCH_PREFIX = "clipforge-fetch-"   # + the fetching process's pid: a folder whose process is gone is stale


def remove_stale_fetches() -> int:
    """Remove the fetch folders (up to 4 GB each) of processes that were killed before they could clean up."""
    import shutil

    removed = 0
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(FETCH_PREFIX):].split("-", 1)[0] if name.startswith(FETCH_PREFIX) else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue   # its process still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed += 1
    return removed


class DecodeVideo(Stage):
    """Stage: one manifest row in, one row per clip out (or one error row).

    Input keys: video_id, source, start?, end?. Output keys per clip: key, clip_index, clips_total, mode,
    rate, span, frame_indices, timestamps, crop, decoder, clock, source_info, frames (uint8 [T,S,S,3]).
    Reasons: bad_manifest_row (outside video_root), missing, empty, not_a_video, unsupported_codec,
    too_short, decode_error, timeout, worker_crash, internal_error (an exception that is not a
    DecodeFailure: a bug in our code, retryable).
    cpu_limit_s: CPU seconds per video in the child (default: twice the time limit plus 10 s).
    video_root: when set, a local source whose real path (symlinks resolved) is not under this folder is
    refused (`bad_manifest_row`, "outside the video root"), and the decoder is given the resolved path.
    """

    def __init__(self, config: ClipConfig = ClipConfig(), timeout_s: float = 120.0,
                 memory_limit_mb: int | None = 8192, isolate: bool = True, cpu_limit_s: float | None = None,
                 video_root: str | None = None):
        super().__init__()
        self.config = config
        self.fetch_max_bytes, self.fetch_timeout_s = 4 << 30, max(timeout_s, 60.0)
        self.video_root = os.path.realpath(video_root) if video_root else None
        self.call = isolated_decoder(timeout_s, memory_limit_mb, cpu_limit_s) if isolate else None
        remove_stale_fetches()

    name = STAGE
    produces_clips = True

    def process(self, row: dict) -> Iterator[dict]:
        self.counts["inputs"] += 1
        if is_remote_video(row["source"]):   # s3://, gs://, http(s)://: fetched here, decoded locally
            with tempfile.TemporaryDirectory(prefix=f"{FETCH_PREFIX}{os.getpid()}-") as tmp:
                ext = os.path.splitext(row["source"].split("?")[0].split("#")[0])[1].lower()
                local = os.path.join(tmp, "video" + (ext if ext in VIDEO_EXTENSIONS else ""))
                try:
                    fetch(row["source"], local, max_bytes=self.fetch_max_bytes, timeout_s=self.fetch_timeout_s)
                except FetchError as err:
                    yield mark_error(row, STAGE, err.reason, str(err))
                    return
                yield from self._decode_local(row, local)
            return
        path = row["source"]
        if self.video_root is not None:
            path = os.path.realpath(path)
            if os.path.commonpath([path, self.video_root]) != self.video_root:
                yield mark_error(row, STAGE, "bad_manifest_row",
                                 f"{row['source']}: outside the video root {self.video_root}")
                return
        yield from self._decode_local(row, path)

    def _decode_local(self, row: dict, path: str) -> Iterator[dict]:
        args = (path, self.config, row["video_id"], row.get("start"), row.get("end"))
        if self.call is None:
            try:
                outcome = ("ok", decode_video(*args))
            except DecodeFailure as err:
                outcome = ("failure", err.reason, str(err))
            except Exception as err:   # noqa: BLE001 — a bug in our code, not in the video: retryable
                outcome = ("failure", "internal_error", f"{type(err).__name__}: {err}")
        else:
            outcome = self.call(*args)
        if outcome[0] != "ok":
            reason, message = outcome[1], outcome[2]
            yield mark_error(row, STAGE, reason, message)
            return
        result = outcome[1]
        clips = result["clips"]
        for n, clip in enumerate(clips):
            out = dict(row)
            out.update(clip)
            out.update(key=make_key(row.get("row_key") or row["video_id"], f"{clip['mode'][:3]}{n:02d}"), clip_index=n,
                       clips_total=len(clips), decoder=result["decoder"], clock=result["clock"],
                       source_info=result["source"])
            yield out

    def close(self):
        if self.call is not None:
            self.call.close()

