"""Decoding: one reader per video serves all its clips, decord first, PyAV when decord cannot.

`decode_video` is the worker-side function (probe → plan → read the planned frames → orient and crop);
it raises `DecodeFailure(reason, message)` for bad input. `DecodeVideo` is the stage: it runs
`decode_video` in an isolated child process (see `pipeline/isolate.py`), because a decord hang cannot be
interrupted from Python, and turns every failure into an error row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from clipforge.pipeline.video.clips import (ClipConfig, center_crop, crop_box, display_size, orient_for_display, plan_clips,
                            resize_for_short_side, sane_timestamps)
from clipforge.pipeline.video.isolate import IsolatedCall
from clipforge.pipeline.schema import is_ok, make_key, mark_error

STAGE = "decode"


class DecodeFailure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def probe(path: str) -> dict:
    """Container and stream facts from PyAV (decord exposes neither rotation nor the stream choice)."""
    import av

    if not os.path.exists(path):
        raise DecodeFailure("missing", f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise DecodeFailure("empty", f"zero-byte file: {path}")
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise DecodeFailure("not_a_video", f"cannot open: {err}") from None
    with container:
        streams = list(container.streams.video)
        if not streams:
            raise DecodeFailure("not_a_video", "no video stream")
        # Deterministic choice among several video streams: the largest picture, then the lowest index.
        stream = max(streams, key=lambda s: ((s.codec_context.width or 0) * (s.codec_context.height or 0), -s.index))
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise DecodeFailure("unsupported_codec", f"stream has no picture size (codec {ctx.name})")
        rotation = 0
        try:
            first = next(container.decode(stream))
            rotation = int(round(getattr(first, "rotation", 0) or 0))
        except (StopIteration, av.error.FFmpegError):
            pass  # the real decode reports the failure with its reason
        sar = float(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else 1.0
        duration = float(container.duration) / 1e6 if container.duration else None
        fps = float(stream.average_rate) if stream.average_rate else None
        return {"width": ctx.width, "height": ctx.height, "sar": sar, "rotation": rotation,
                "codec": ctx.name, "fps": fps, "duration": duration, "stream_index": stream.index,
                "video_streams": len(streams), "frames": int(stream.frames or 0)}


@dataclass
class Timeline:
    """Every frame's presentation time, from a demux pass (packets only, nothing decoded).

    PyAV's pts × time base is the one clock for every decoder: decord's own timestamps are garbage on
    some AVI/MPEG-PS files and drop the start offset on others, so they are never used.
    """
    raw_pts: list            # stream time-base pts of frame i, display order
    key_index: list          # display indices of key frames
    pts: np.ndarray          # seconds
    frame_end: float         # when the last frame stops being shown


def demux_timeline(path: str, stream_index: int, fps: float | None, duration: float | None) -> Timeline:
    import av

    try:
        with av.open(path) as container:
            stream = container.streams[stream_index]
            tb = float(stream.time_base)
            packets = [(p.pts, p.duration or 0, p.is_keyframe) for p in container.demux(stream) if p.pts is not None]
    except av.error.FFmpegError as err:
        raise DecodeFailure("decode_error", f"demux: {err}") from None
    if not packets:
        raise DecodeFailure("unsupported_codec", "no timed packets in the video stream")
    packets.sort(key=lambda p: p[0])
    raw = [p[0] for p in packets]
    pts = np.asarray(raw, dtype=np.float64) * tb
    last = packets[-1][1] * tb or (1.0 / fps if fps else 0.04)
    if not sane_timestamps(pts, duration):   # no usable clock: a regular grid at the average rate
        pts = np.arange(len(raw)) / (fps or 25.0)
    return Timeline(raw, [i for i, p in enumerate(packets) if p[2]], pts, float(pts[-1] + last))


def decode_video(path: str, config: ClipConfig, key: str = "", start=None, end=None) -> dict:
    """Probe, plan and read one video. Returns {"source": facts, "decoder", "clips": [plan + frames]}."""
    facts = probe(path)
    size = config.size
    timeline = demux_timeline(path, facts["stream_index"], facts["fps"], facts["duration"])
    pts = timeline.pts
    plans = plan_clips(pts, timeline.frame_end, config, key=key, start=start, end=end, source_fps=facts["fps"])
    if not plans:
        raise DecodeFailure("too_short", f"{timeline.frame_end - pts[0]:.2f} s and {len(pts)} frames: too short "
                                         f"for {config.frames} frames at any configured rate")
    wanted = sorted({i for p in plans for i in p.frame_indices})   # sorted: decord is much faster so
    stored_w, stored_h = resize_for_short_side(facts["width"], facts["height"], facts["sar"], facts["rotation"], size)
    frames, reader = None, None
    if facts["video_streams"] == 1:   # decord cannot choose among several streams; PyAV can
        # decord applies the display rotation itself, so it is asked for the displayed size
        quarter = facts["rotation"] % 180 != 0
        reader = DecordReader.open(path, *((stored_h, stored_w) if quarter else (stored_w, stored_h)))
        if reader is not None and reader.agrees_with(pts):   # same frames, same order as the demux pass
            try:
                frames = reader.read(wanted)
            except DecodeFailure:
                frames = None   # decord failed mid-file: PyAV may still read the planned frames
    if frames is None:
        reader = PyAVReader(path, facts["stream_index"], stored_w, stored_h, timeline)
        frames = orient_for_display(reader.read(wanted), facts["rotation"])
    lookup = {idx: n for n, idx in enumerate(wanted)}
    disp_w, disp_h = display_size(facts["width"], facts["height"], facts["sar"], facts["rotation"])
    box = crop_box(disp_w, disp_h, size)
    clips = []
    for plan in plans:
        clip = center_crop(frames[[lookup[i] for i in plan.frame_indices]], size)
        clips.append({**plan.as_dict(), "crop": box, "frames": clip})
    facts.update(frames=len(pts), duration=facts["duration"] or float(timeline.frame_end - pts[0]))
    return {"source": facts, "decoder": reader.name, "clips": clips, "frames_decoded": reader.frames_decoded}


class DecordReader:
    name = "decord"

    def __init__(self, vr):
        self.vr = vr
        self.frames_decoded = 0

    @classmethod
    def open(cls, path: str, width: int, height: int):
        import decord

        try:
            # width/height make the decoder resize (far cheaper than resizing afterwards); one thread,
            # because many workers with many decode threads each oversubscribe a node.
            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=width, height=height)
            if len(vr) == 0:
                return None
            return cls(vr)
        except Exception:   # decord raises its own untyped errors; PyAV gets a second chance
            return None

    def agrees_with(self, pts: np.ndarray) -> bool:
        """decord indexes frames its own way; on some files (MPEG-PS with B-frames) its order is not the
        presentation order, and its timestamps are garbage there. Trust its indices only when its
        timestamps match the demux pass frame for frame (up to the start offset it drops)."""
        if len(self.vr) != len(pts):
            return False
        ts = np.asarray(self.vr.get_frame_timestamp(np.arange(len(self.vr))), dtype=np.float64)[:, 0]
        if not np.all(np.isfinite(ts)):
            return False
        step = np.median(np.diff(pts)) if len(pts) > 1 else 0.04
        return bool(np.max(np.abs((ts - ts[0]) - (pts - pts[0]))) <= max(0.25 * step, 2e-3))

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            out = self.vr.get_batch(indices).asnumpy()
        except Exception as err:
            raise DecodeFailure("decode_error", f"decord get_batch: {err}") from None
        self.frames_decoded = len(indices)   # decord seeks to key frames; exact counts are not exposed
        return out


class PyAVReader:
    """PyAV decoding for what decord cannot open. Reading seeks to the key frame before each planned
    frame and decodes forward, so the frames decoded stay close to the minimum the GOP structure
    allows (`frames_decoded` counts them)."""
    name = "pyav"

    def __init__(self, path: str, stream_index: int, width: int, height: int, timeline: Timeline):
        self.path, self.stream_index, self.width, self.height = path, stream_index, width, height
        self.frames_decoded = 0
        self.raw_pts, self.key_index = timeline.raw_pts, timeline.key_index

    def read(self, indices: list[int]) -> np.ndarray:
        import av

        got: dict[int, np.ndarray] = {}
        try:
            with av.open(self.path) as container:
                stream = container.streams[self.stream_index]
                stream.thread_count = 1
                if len(set(self.raw_pts)) == len(self.raw_pts) and self.key_index:
                    self._read_seeking(container, stream, indices, got)
                missing = [i for i in indices if i not in got]
                if missing:   # seeking is unreliable in some containers: one forward pass from the start
                    container.seek(0, stream=stream, backward=True)
                    self._read_forward(container, stream, set(missing), max(missing), got)
        except av.error.FFmpegError as err:
            if not got:
                raise DecodeFailure("unsupported_codec" if self.frames_decoded == 0 else "decode_error",
                                    f"pyav: {err}") from None
        missing = [i for i in indices if i not in got]
        if missing:
            raise DecodeFailure("decode_error", f"pyav decoded {self.frames_decoded} frames; "
                                                f"{len(missing)} planned frames missing (first {missing[0]})")
        return np.stack([got[i] for i in indices])

    def _convert(self, frame) -> np.ndarray:
        return frame.to_ndarray(width=self.width, height=self.height, format="rgb24")

    def _read_seeking(self, container, stream, indices, got) -> None:
        index_of = {pts: i for i, pts in enumerate(self.raw_pts)}
        position = -1   # display index of the last frame decoded
        frames = None
        for target in indices:
            if target in got:
                continue
            key = self.key_index[max(0, np.searchsorted(self.key_index, target, side="right") - 1)]
            if frames is None or key > position + 1 or target <= position:
                container.seek(self.raw_pts[key], stream=stream, backward=True)
                frames = self._frames(container, stream)
            for frame in frames:
                self.frames_decoded += 1
                position = index_of.get(frame.pts, position)
                if position in indices and position not in got:
                    got[position] = self._convert(frame)
                if position >= target:
                    break
            else:
                return

    def _frames(self, container, stream):
        """Decoded frames, packet by packet, skipping packets the decoder rejects (as ffmpeg does:
        a corrupt NAL unit costs a frame, not the rest of the video)."""
        import av

        self.bad_packets = getattr(self, "bad_packets", 0)
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.InvalidDataError:
                self.bad_packets += 1
                if self.bad_packets > 50:
                    raise

    def _read_forward(self, container, stream, wanted: set, last: int, got) -> None:
        for n, frame in enumerate(self._frames(container, stream)):
            self.frames_decoded += 1
            if n in wanted and n not in got:
                got[n] = self._convert(frame)
            if n >= last:
                break


class DecodeVideo:
    """Stage: one manifest row in, one row per clip out (or one error row).

    Input keys: video_id, source, start?, end?. Output keys per clip: key, clip_index, clips_total, mode,
    rate, span, frame_indices, timestamps, crop, decoder, source_info, frames (uint8 [T,S,S,3]).
    Reasons: missing, empty, not_a_video, unsupported_codec, too_short, decode_error, timeout, worker_crash.
    """

    def __init__(self, config: ClipConfig = ClipConfig(), timeout_s: float = 120.0,
                 memory_limit_mb: int | None = 8192, isolate: bool = True):
        self.config = config
        self.call = IsolatedCall(decode_video, timeout_s, memory_limit_mb) if isolate else None

    def __call__(self, rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            if not is_ok(row):
                yield row
                continue
            yield from self._decode(row)

    def _decode(self, row: dict) -> Iterator[dict]:
        args = (row["source"], self.config, row["video_id"], row.get("start"), row.get("end"))
        if self.call is None:
            try:
                outcome = ("ok", decode_video(*args))
            except DecodeFailure as err:
                outcome = ("failure", err.reason, str(err))
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
            out.update(key=make_key(row["video_id"], f"{clip['mode'][:3]}{n:02d}"), clip_index=n,
                       clips_total=len(clips), decoder=result["decoder"], source_info=result["source"])
            yield out

    def close(self):
        if self.call is not None:
            self.call.close()

