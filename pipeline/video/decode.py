"""Decoding: one reader per video serves all its clips, decord where it is proven right, PyAV otherwise.

(One file over 400 lines on purpose: the clock and reader of every container, and the proof that
decord's frames are right, are one decision and are read together.)

`decode_video` is the worker-side function (probe → clock → plan → read the planned frames → orient and
crop); it raises `DecodeFailure(reason, message)` for bad input. Every result names its `decoder`
(decord | pyav) and its `clock` (demux | decode | grid, see `Timeline`); docs/decode.md says which
container gets which and why. `DecodeVideo` (`decode_stage.py`) is the stage: it runs
`decode_video` in an isolated child process (see `pipeline/video/isolate.py`), because a decord hang cannot be
interrupted from Python, and turns every failure into an error row.

Untrusted input (docs/decode.md, "Untrusted files"): before any decoder opens a file, `sniff` refuses
playlists and lists that name other files (HLS, ffconcat, SDP, DASH, PLS) and plain text, by content,
whatever the extension; PyAV opens only the demuxers in `CONTAINER_ALLOWLIST` and only the `file`
protocol (`open_container`), and `probe` checks the demuxer it got against the same list, so decord
(which cannot be given options) only ever sees a file PyAV accepted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


import numpy as np

from clipforge.pipeline.video.clips import (ClipConfig, center_crop, crop_box, display_size, orient_for_display, plan_clips,
                            resize_for_short_side, sane_timestamps)
from clipforge.pipeline.video.admit import CONTAINER_ALLOWLIST, DecodeFailure, container_allowed, open_container, sniff
from clipforge.pipeline.video.isolate import IsolatedCall

STAGE = "decode"


# Containers without a seek index: decord's seek lands late on them (a whole GOP on MPEG-PS and MPEG-TS,
# with timestamps that still look right), so they go to PyAV, which finds frames by their pts. Ogg and raw
# elementary streams seek by bisection or not at all. Names are ffmpeg demuxer names (probe's `container`).
NO_SEEK_INDEX = frozenset({"mpeg", "mpegts", "mpegtsraw", "mpegvideo", "vob", "svcd", "vcd", "dvd", "ogg",
                           "h264", "hevc", "m4v", "h263", "cavsvideo", "vc1"})
# Containers whose packet times are chunk counters, not presentation times: AVI. A chunk is not a picture
# there (N-VOP placeholders of packed B-frames, empty chunks for dropped frames), so the plan is made on
# the decoded pictures (the decode clock) from the start.
NO_PTS = frozenset({"avi"})
# decord's first planned picture against PyAV's, same size: mean absolute difference in grey levels.
# Different scalers and chroma paths measured at most 3.4 on the shared real files; a picture one frame
# off on a moving scene differs by tens, a GOP off by more.
PROOF_TOL = 8.0

class ClockMismatch(Exception):
    """The decoder's pictures do not carry the demux pass's timestamps (e.g. MPEG-4 Part 2 with packed
    B-frames in AVI): the plan must be made on the decoded pictures' own clock."""


def probe(path: str) -> dict:
    """Container and stream facts from PyAV (decord exposes neither rotation nor the stream choice).
    The file is sniffed first, and only an allowlisted container is accepted."""
    import av

    if not os.path.exists(path):
        raise DecodeFailure("missing", f"no such file: {path}")
    if not os.path.isfile(path):   # a FIFO or a device would block or never end
        raise DecodeFailure("not_a_video", f"not a regular file: {path}")
    if os.path.getsize(path) == 0:
        raise DecodeFailure("empty", f"zero-byte file: {path}")
    sniff(path)
    try:
        container = open_container(path)
    except av.error.ArgumentError as err:   # EINVAL: what the format whitelist answers
        raise DecodeFailure("unsupported_codec", f"cannot open: not a container we decode "
                                                 f"({', '.join(CONTAINER_ALLOWLIST)}): {err}") from None
    except av.error.FFmpegError as err:
        raise DecodeFailure("not_a_video", f"cannot open: {err}") from None
    with container:
        if not container_allowed(container.format.name):
            raise DecodeFailure("unsupported_codec", f"container {container.format.name}: not a container we "
                                                     f"decode ({', '.join(CONTAINER_ALLOWLIST)})")
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
                "container": container.format.name.split(",")[0], "codec": ctx.name, "fps": fps, "duration": duration, "stream_index": stream.index,
                "video_streams": len(streams), "frames": int(stream.frames or 0)}


@dataclass
class Timeline:
    """Every frame's presentation time in display order, on one of three clocks:

    - demux: packet pts × time base from a demux pass (nothing decoded). Used while every picture the
      decoder returns carries exactly one of these pts; `PyAVReader` checks that on every picture.
    - decode: the pts of the pictures a full decode pass returns, when the demux pts are unusable or the
      pictures do not carry them (MPEG-4 Part 2 with packed B-frames in AVI, field-coded H.264).
    - grid: neither pass gives usable pts (missing, repeated or out of order): the n-th decoded picture is
      shown at t0 + n / average rate, t0 being the first picture's pts when that one is usable (so an MPEG
      start offset survives), else 0.

    decord's own timestamps are never used: garbage on some AVI/MPEG-PS files, start offset dropped on others.
    """
    raw_pts: list            # stream time-base pts of frame i, display order
    key_index: list          # display indices of key frames
    pts: np.ndarray          # seconds
    frame_end: float         # when the last frame stops being shown
    clock: str = "demux"


def demux_timeline(path: str, stream_index: int, fps: float | None, duration: float | None) -> Timeline:
    """The demux clock; `clock` is "grid" when the packets carry no usable pts (see `decode_timeline`)."""
    import av

    try:
        with open_container(path) as container:
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
    clock = "demux"
    if not sane_timestamps(pts, duration) or len(set(raw)) != len(raw):
        pts, clock = grid_times(len(raw), pts[0], fps, duration), "grid"
    return Timeline(raw, [i for i, p in enumerate(packets) if p[2]], pts, float(pts[-1] + last), clock)


def decode_timeline(path: str, stream_index: int, fps: float | None, duration: float | None) -> Timeline:
    """The decode clock: one full decode pass, recording each returned picture's pts in output order.
    Falls back to the grid clock when the pictures carry no usable pts."""
    import av

    raw, keys, last = [], [], 0.0
    try:
        with open_container(path) as container:
            stream = container.streams[stream_index]
            stream.thread_count = 1
            tb = float(stream.time_base)
            for frame in decoded_frames(container, stream, [0]):
                if frame.key_frame:
                    keys.append(len(raw))
                raw.append(frame.pts)
                last = float(frame.duration or 0) * tb
    except av.error.FFmpegError as err:
        if not raw:
            raise DecodeFailure("unsupported_codec", f"pyav: {err}") from None
        # a damaged tail: the timeline ends at the last picture decoded
    if not raw:
        raise DecodeFailure("unsupported_codec", "the decoder returned no picture")
    last = last or (1.0 / fps if fps else 0.04)
    if all(p is not None for p in raw) and len(set(raw)) == len(raw):
        pts = np.asarray(raw, dtype=np.float64) * tb
        if sane_timestamps(pts, duration):
            return Timeline(raw, keys, pts, float(pts[-1] + last), "decode")
    first = raw[0] * tb if raw[0] is not None else 0.0
    pts = grid_times(len(raw), first, fps, duration)
    return Timeline(raw, keys, pts, float(pts[-1] + last), "grid")


def grid_times(n: int, first: float, fps: float | None, duration: float | None) -> np.ndarray:
    """n pictures at the average rate, from the first picture's time when that one is believable."""
    start = float(first) if np.isfinite(first) and 0.0 <= first <= (duration or 0.0) + 60.0 else 0.0
    return start + np.arange(n) / (fps or 25.0)


def decoded_frames(container, stream, bad_packets: list):
    """Decoded pictures, packet by packet, skipping packets the decoder rejects (as ffmpeg does: a
    corrupt NAL unit costs a frame, not the rest of the video). `bad_packets[0]` counts them."""
    import av

    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            bad_packets[0] += 1
            if bad_packets[0] > 50:
                raise


def _plan(timeline: Timeline, config: ClipConfig, key, start, end, fps) -> tuple[list, list[int]]:
    pts = timeline.pts
    plans = plan_clips(pts, timeline.frame_end, config, key=key, start=start, end=end, source_fps=fps)
    if not plans:
        raise DecodeFailure("too_short", f"{timeline.frame_end - pts[0]:.2f} s and {len(pts)} frames: too short "
                                         f"for {config.frames} frames at any configured rate")
    return plans, sorted({i for p in plans for i in p.frame_indices})   # sorted: decord is much faster so


def decode_video(path: str, config: ClipConfig, key: str = "", start=None, end=None) -> dict:
    """Probe, choose a clock, plan and read one video.

    Returns {"source": facts, "decoder", "clock", "clips": [plan + frames], "frames_decoded"}. Every clip's
    `timestamps` are the clock's times of the pictures returned (pts × time base on the demux and decode
    clocks), and on the decord path the first planned picture is proven against PyAV's by its pixels.
    """
    facts = probe(path)
    size = config.size
    fps, duration = facts["fps"], facts["duration"]
    timeline = demux_timeline(path, facts["stream_index"], fps, duration)
    if timeline.clock != "demux" or facts["container"] in NO_PTS:
        timeline = decode_timeline(path, facts["stream_index"], fps, duration)
    plans, wanted = _plan(timeline, config, key, start, end, fps)
    stored_w, stored_h = resize_for_short_side(facts["width"], facts["height"], facts["sar"], facts["rotation"], size)
    frames, reader = None, None
    # decord cannot choose among several streams (PyAV can), and lands late on containers without an index
    if timeline.clock == "demux" and facts["video_streams"] == 1 and facts["container"] not in NO_SEEK_INDEX:
        frames, reader = read_with_decord(path, facts, timeline, wanted, stored_w, stored_h)
    if frames is None:
        reader = PyAVReader(path, facts["stream_index"], stored_w, stored_h, timeline)
        try:
            frames = reader.read(wanted)
        except ClockMismatch:   # the pictures do not carry the demux pts: plan on their own clock
            timeline = decode_timeline(path, facts["stream_index"], fps, duration)
            plans, wanted = _plan(timeline, config, key, start, end, fps)
            decoded_before = reader.frames_decoded + len(timeline.pts)
            reader = PyAVReader(path, facts["stream_index"], stored_w, stored_h, timeline)
            frames = reader.read(wanted)
            reader.frames_decoded += decoded_before
        frames = orient_for_display(frames, facts["rotation"])
    pts = timeline.pts
    lookup = {idx: n for n, idx in enumerate(wanted)}
    disp_w, disp_h = display_size(facts["width"], facts["height"], facts["sar"], facts["rotation"])
    box = crop_box(disp_w, disp_h, size)
    clips = []
    for plan in plans:
        clip = center_crop(frames[[lookup[i] for i in plan.frame_indices]], size)
        clips.append({**plan.as_dict(), "crop": box, "frames": clip})
    facts.update(frames=len(pts), duration=facts["duration"] or float(timeline.frame_end - pts[0]),
                 decoder=reader.name, clock=timeline.clock)
    return {"source": facts, "decoder": reader.name, "clock": timeline.clock, "clips": clips,
            "frames_decoded": reader.frames_decoded}


def read_with_decord(path: str, facts: dict, timeline: Timeline, wanted: list[int], stored_w: int, stored_h: int):
    """(frames, reader) from decord, or (None, None) when decord cannot open the file, disagrees with the
    demux clock, fails, or returns a first planned picture that is not PyAV's picture for that index."""
    # decord applies the display rotation itself, so it is asked for the displayed size
    quarter = facts["rotation"] % 180 != 0
    reader = DecordReader.open(path, *((stored_h, stored_w) if quarter else (stored_w, stored_h)))
    if reader is None or not reader.agrees_with(timeline.pts):   # same frames, same order as the demux pass
        return None, None
    try:
        frames = reader.read(wanted)
    except DecodeFailure:
        return None, None   # decord failed mid-file: PyAV may still read the planned frames
    # Timestamps agreeing is not pixels agreeing: decord's seek can land a GOP late while its timestamps
    # look right. One PyAV picture (a seek and at most one GOP decoded) proves the index.
    check = PyAVReader(path, facts["stream_index"], stored_w, stored_h, timeline)
    try:
        ref = orient_for_display(check.read(wanted[:1]), facts["rotation"])
    except (ClockMismatch, DecodeFailure):
        return None, None
    reader.frames_decoded += check.frames_decoded
    if ref.shape[1:] != frames.shape[1:]:
        return None, None
    reader.proof_diff = float(np.abs(ref[0].astype(np.int16) - frames[0].astype(np.int16)).mean())
    if reader.proof_diff > PROOF_TOL:
        return None, None
    return frames, reader


def isolated_decoder(timeout_s: float, memory_limit_mb: int | None = 8192,
                     cpu_limit_s: float | None = None) -> IsolatedCall:
    """`decode_video` in a persistent isolated child (wall-clock, CPU-time and address-space limits, a
    scrubbed environment; see `isolate.py`); cpu_limit_s defaults to twice the time limit plus 10 s.
    Used by `DecodeVideo` and by `clipforge clips`."""
    cpu = cpu_limit_s if cpu_limit_s is not None else 2 * timeout_s + 10
    return IsolatedCall(decode_video, timeout_s, memory_limit_mb, cpu_limit_s=cpu, init=import_decoders)


def import_decoders() -> None:
    """Run once in each decode child before it reports ready, so import time never counts against a video."""
    import av  # noqa: F401
    import decord  # noqa: F401


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
    """PyAV decoding. On the demux clock, reading seeks to the key frame before each planned frame and
    decodes forward, so the frames decoded stay close to the minimum the GOP structure allows
    (`frames_decoded` counts them). Every picture is identified by its own pts, never by counting (except
    on the grid clock, where there is no pts). On the demux clock, `ClockMismatch` is raised for a picture
    with a pts the demux pass does not know, for pictures whose pts go backwards in output order (H.264
    in AVI: pictures come out in display order carrying decode-order pts), for a demux position skipped
    inside a decode run (a packet that gave no picture), and for a planned pts that no picture carries."""
    name = "pyav"

    def __init__(self, path: str, stream_index: int, width: int, height: int, timeline: Timeline):
        self.path, self.stream_index, self.width, self.height = path, stream_index, width, height
        self.frames_decoded = 0
        self.bad_packets = [0]
        self.clock = timeline.clock
        self.raw_pts, self.key_index = timeline.raw_pts, timeline.key_index
        self.index_of = {pts: i for i, pts in enumerate(self.raw_pts)} if self.clock != "grid" else {}

    def read(self, indices: list[int]) -> np.ndarray:
        import av

        got: dict[int, np.ndarray] = {}
        failed = None
        try:
            with open_container(self.path) as container:
                stream = container.streams[self.stream_index]
                stream.thread_count = 1
                if self.clock == "demux" and self.key_index:
                    self._read_seeking(container, stream, indices, got)
                missing = [i for i in indices if i not in got]
                if missing:   # seeking is unreliable in some containers: one forward pass from the start
                    container.seek(0, stream=stream, backward=True)
                    self._read_forward(container, stream, set(missing), max(missing), got)
        except av.error.FFmpegError as err:
            if not got:
                raise DecodeFailure("unsupported_codec" if self.frames_decoded == 0 else "decode_error",
                                    f"pyav: {err}") from None
            failed = err
        missing = [i for i in indices if i not in got]
        if missing and self.clock == "demux" and failed is None:
            raise ClockMismatch(f"no decoded picture carries the pts of planned frame {missing[0]}")
        if missing:
            raise DecodeFailure("decode_error", f"pyav decoded {self.frames_decoded} frames; "
                                                f"{len(missing)} planned frames missing (first {missing[0]})")
        return np.stack([got[i] for i in indices])

    def _convert(self, frame) -> np.ndarray:
        return frame.to_ndarray(width=self.width, height=self.height, format="rgb24")

    def _index(self, frame, n: int, previous: int) -> int:
        """Display index of a decoded picture: by its pts, or its ordinal `n` on the grid clock.
        `previous` is the index of the picture decoded just before in the same run (-1 after a seek)."""
        if self.clock == "grid":
            return n
        index = self.index_of.get(frame.pts)
        if index is not None and index <= previous:
            index = None   # pictures come out in display order: a pts going backwards belongs to another
        if index is not None and previous >= 0 and index > previous + 1 and self.clock == "demux":
            # a packet in between gave no picture (an N-VOP, a rejected packet): the demux positions are
            # not picture positions any more
            raise ClockMismatch(f"no decoded picture for demux frames {previous + 1}..{index - 1}")
        if index is None:
            if self.clock == "demux":
                raise ClockMismatch(f"decoded picture with pts {frame.pts} is not in the demux pass")
            raise DecodeFailure("decode_error", f"decoded picture with pts {frame.pts} differs from the decode pass")
        return index

    def _read_seeking(self, container, stream, indices, got) -> None:
        wanted = set(indices)
        position = -1   # display index of the last frame decoded
        frames = None
        for target in indices:
            if target in got:
                continue
            key = self.key_index[max(0, np.searchsorted(self.key_index, target, side="right") - 1)]
            if frames is None or key > position + 1 or target <= position:
                container.seek(self.raw_pts[key], stream=stream, backward=True)
                frames = decoded_frames(container, stream, self.bad_packets)
                position = -1
            for frame in frames:
                self.frames_decoded += 1
                position = self._index(frame, -1, position)
                if position in wanted and position not in got:
                    got[position] = self._convert(frame)
                if position >= target:
                    break
            else:
                return

    def _read_forward(self, container, stream, wanted: set, last: int, got) -> None:
        index = -1
        for n, frame in enumerate(decoded_frames(container, stream, self.bad_packets)):
            self.frames_decoded += 1
            index = self._index(frame, n, index)
            if index in wanted and index not in got:
                got[index] = self._convert(frame)
            if index >= last:
                break
