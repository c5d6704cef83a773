"""Conformance corpus: every container and codec we accept, encoded here with a frame counter burned into
the picture, decoded by `decode_video` and the `DecodeVideo` stage; every sampled picture's counter must
equal its recorded frame index, and its recorded timestamp must be that picture's pts × time base.

The counter is the picture's ordinal in the encoded stream (0, 1, 2, …), written as 10 bits, each bit a
pair of 24-pixel blocks (the bit, then its complement) inside the centre square, so it survives yuv420p,
lossy coding, the centre crop and the scale to 160 px; a frame that is not one of ours (grey, smeared,
half-decoded) fails the complement check instead of reading as some number. Timings cover start offsets,
variable frame rate and dropped frames (gaps in the pts); codecs cover B-frames (H.264, MPEG-4 Part 2,
MPEG-2), VP9's hidden alt-ref frames and Sorenson H.263.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import pytest

from clipforge.pipeline.video.clips import ClipConfig, resize_for_short_side
from clipforge.pipeline.video.decode import (ClockMismatch, PyAVReader, decode_video, demux_timeline, probe, read_with_decord)
from clipforge.pipeline.video.decode_stage import DecodeVideo

W, H = 192, 144          # 4:3, so the centre crop really cuts
SIDE = min(W, H)
BITS, BLOCK = 10, 24
X0, Y0 = (W - SIDE) // 2 + 12, (H - SIDE) // 2 + 24   # the 5 x 4 block grid inside the centre square
SIZE = 160
N = 80
# "both" modes: one sequential clip and up to 4 interpolation clips, so about 25 pictures per file
CONFIG = ClipConfig(size=SIZE, mode="both", rates=(1.0, 2.0, 4.0, 8.0))


def paint(n: int) -> np.ndarray:
    img = np.full((H, W, 3), 128, np.uint8)
    for b in range(BITS):
        bit = (n >> b) & 1
        row, col = divmod(b, 5)
        for k, value in enumerate((bit, 1 - bit)):
            y, x = Y0 + (2 * row + k) * BLOCK, X0 + col * BLOCK
            img[y:y + BLOCK, x:x + BLOCK] = 235 if value else 20
    return img


def read_counter(frame: np.ndarray) -> int | None:
    """The counter of an output frame [SIZE, SIZE, 3] (centre square of the source scaled to SIZE);
    None when a bit's two blocks do not clearly disagree (not a picture of ours)."""
    scale = SIZE / SIDE
    n = 0
    for b in range(BITS):
        row, col = divmod(b, 5)
        means = []
        for k in (0, 1):   # the inner half of each block, away from ringing and chroma bleed
            y = (Y0 - (H - SIDE) // 2 + (2 * row + k) * BLOCK + BLOCK // 4) * scale
            x = (X0 - (W - SIDE) // 2 + col * BLOCK + BLOCK // 4) * scale
            half = BLOCK // 2 * scale
            means.append(frame[int(y):int(y + half), int(x):int(x + half)].mean())
        if abs(means[0] - means[1]) < 80:
            return None
        n |= int(means[0] > means[1]) << b
    return n


def with_gaps(every=9):
    """25 fps slots; after every `every`-th frame one slot stays empty (a dropped frame)."""
    return tuple((n + n // every) / 25 for n in range(N))


def not_coded_vop(time_increment: int, bits: int = 5) -> bytes:
    """An MPEG-4 Part 2 N-VOP: a P-VOP header with vop_coded = 0, the placeholder packed B-frames and
    frame-rate padding put in a packet that must give no picture (`bits`: 5 for a time base of 1/25)."""
    header = "01" + "0" + "1" + format(time_increment, f"0{bits}b") + "1" + "0"
    header += "0" + "1" * ((8 - (len(header) + 1) % 8) % 8)     # next_start_code stuffing
    return bytes([0, 0, 1, 0xB6]) + int(header, 2).to_bytes(len(header) // 8, "big")


def cfr(fps=25.0, start=0.0):
    return [start + n / fps for n in range(N)]


def vfr_with_drops(start=0.3):
    """30 fps for 40 frames, then 12.5 fps; every 9th frame is dropped (its slot stays empty)."""
    times, t = [], start
    for n in range(N):
        times.append(t)
        step = 1 / 30 if n < 40 else 0.08
        t += 2 * step if n % 9 == 8 else step
    return times


@dataclass(frozen=True)
class Case:
    name: str
    suffix: str
    fmt: str                  # ffmpeg muxer
    codec: str                # encoder
    time_base: Fraction
    times: tuple
    options: dict = field(default_factory=dict)
    b_frames: int | None = None
    gop: int = 12
    decoder: str = "decord"   # the decoder decode_video must choose, and why is in docs/decode.md
    clock: str = "demux"
    nvops: bool = False       # MPEG-4 Part 2 only: a not-coded VOP (no picture) in every skipped slot


CASES = [
    Case("mp4-h264-bframes-vfr-drops", "mp4", "mp4", "libx264", Fraction(1, 1000), tuple(vfr_with_drops()),
         {"bf": "3"}),
    Case("mkv-h264-offset", "mkv", "matroska", "libx264", Fraction(1, 1000), tuple(cfr(25, 1.2)), {"bf": "2"}),
    Case("webm-vp9-vfr-drops", "webm", "webm", "libvpx-vp9", Fraction(1, 1000), tuple(vfr_with_drops()),
         {"deadline": "realtime", "cpu-used": "8"}),
    Case("mov-h264-offset", "mov", "mov", "libx264", Fraction(1, 600), tuple(cfr(30, 0.5)), {"bf": "2"}),
    # AVI is constant-rate: a dropped frame is a skipped slot (every 9th here)
    Case("avi-mpeg4-bframes-drops", "avi", "avi", "mpeg4", Fraction(1, 25), with_gaps(), b_frames=2,
         decoder="pyav", clock="decode"),
    # a packet that gives no picture, the class of packed B-frames: in AVI (no pts) and in Matroska (pts)
    Case("avi-mpeg4-nvop", "avi", "avi", "mpeg4", Fraction(1, 25), with_gaps(), b_frames=0, nvops=True,
         decoder="pyav", clock="decode"),
    Case("mkv-mpeg4-nvop", "mkv", "matroska", "mpeg4", Fraction(1, 25), with_gaps(), b_frames=0, nvops=True,
         decoder="pyav", clock="decode"),
    # H.264 in AVI: pictures come out in display order carrying decode-order pts, so no pts is usable
    Case("avi-h264-bframes", "avi", "avi", "libx264", Fraction(1, 25), tuple(cfr(25)), {"bf": "3"},
         decoder="pyav", clock="grid"),
    # MPEG-PS adds its own 0.5 s offset; its last packets repeat pts, the decoded pictures do not: the
    # decode clock
    Case("mpg-mpeg2-ps", "mpg", "mpeg", "mpeg2video", Fraction(1, 25), tuple(cfr(25)), b_frames=2,
         decoder="pyav", clock="decode"),
    Case("ts-h264-vfr-drops", "ts", "mpegts", "libx264", Fraction(1, 90000), tuple(vfr_with_drops()), {"bf": "3"},
         decoder="pyav"),
    Case("ts-mpeg2-offset", "ts", "mpegts", "mpeg2video", Fraction(1, 25), tuple(cfr(25, 0.72)), b_frames=2,
         decoder="pyav"),
    Case("flv-h264-vfr-drops", "flv", "flv", "libx264", Fraction(1, 1000), tuple(vfr_with_drops()), {"bf": "2"}),
    Case("flv-sorenson", "flv", "flv", "flv", Fraction(1, 25), tuple(cfr(25))),
    Case("ogg-theora", "ogg", "ogg", "libtheora", Fraction(1, 25), tuple(cfr(25)), decoder="pyav"),
    # the Ogg container (no seek index) even where Theora cannot be encoded: VP8 in Ogg
    Case("ogg-vp8-offset", "ogg", "ogg", "libvpx", Fraction(1, 25), tuple(cfr(25, 0.4)),
         {"deadline": "realtime", "cpu-used": "8"}, decoder="pyav"),
]


def encoder_missing(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return False
    except Exception:   # noqa: BLE001 — PyAV raises UnknownCodecError or ValueError depending on version
        return True


def write(path, case: Case) -> None:
    with av.open(str(path), "w", format=case.fmt) as container:
        stream = container.add_stream(case.codec, rate=25, options=dict(case.options))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = case.time_base
        stream.codec_context.gop_size = case.gop
        if case.b_frames is not None:
            stream.codec_context.max_b_frames = case.b_frames
        for n, t in enumerate(case.times):
            frame = av.VideoFrame.from_ndarray(paint(n), format="rgb24")
            frame.pts, frame.time_base = int(round(t / case.time_base)), case.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
            if case.nvops and n + 1 < N and case.times[n + 1] - t > 1.5 * case.time_base:
                slot = frame.pts + 1
                packet = av.Packet(not_coded_vop(slot % case.time_base.denominator))
                packet.pts = packet.dts = slot
                packet.time_base, packet.stream = case.time_base, stream
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance")
    paths = {}
    for case in CASES:
        if not encoder_missing(case.codec):
            paths[case.name] = out / f"{case.name}.{case.suffix}"
            write(paths[case.name], case)
    return paths


@functools.lru_cache(maxsize=None)
def reference(path) -> tuple[dict, bool, float]:
    """An independent full PyAV decode: counter → pts (s) of the picture carrying it; whether the pts are
    coherent (unique and increasing in output order, as display times must be); the first pts."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        pictures = [(read_counter(_crop(f.to_ndarray(format="rgb24"))), f.pts) for f in container.decode(stream)]
    assert [c for c, _ in pictures] == list(range(N)), "the encoder or the counter reader is broken"
    raw = [p for _, p in pictures]
    coherent = None not in raw and all(a < b for a, b in zip(raw, raw[1:]))
    return {c: float(p * tb) for c, p in pictures if p is not None}, coherent, float(raw[0] * tb)


def _crop(img):
    """A picture of any size with the source's aspect → the output geometry (centre square scaled to
    SIZE), for read_counter."""
    h, w = img.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    square = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[y:y + side, x:x + side]), format="rgb24")
    return square.to_ndarray(width=SIZE, height=SIZE, format="rgb24")


def check_clips(case: Case, path, clips, clock: str, fps: float) -> int:
    pts_of, coherent, first = reference(path)
    checked = 0
    for clip in clips:
        counters = [read_counter(f) for f in clip["frames"]]
        assert counters == clip["frame_indices"], (case.name, clip["mode"], clip["rate"])
        for index, t in zip(clip["frame_indices"], clip["timestamps"]):
            if coherent:   # the recorded time is the returned picture's pts × time base
                assert t == pytest.approx(pts_of[index], abs=1e-6), (case.name, index)
            else:          # no coherent pts exists: the grid from the first picture's time
                assert clock == "grid" and t == pytest.approx(first + index / fps, abs=1e-6), (case.name, index)
            checked += 1
    return checked


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_sampled_picture_is_its_recorded_frame(files, case):
    if case.name not in files:
        pytest.skip(f"this PyAV/ffmpeg build has no {case.codec} encoder")
    path = files[case.name]
    result = decode_video(str(path), CONFIG, case.name)
    assert (result["decoder"], result["clock"]) == (case.decoder, case.clock)
    assert result["source"]["clock"] == result["clock"] and result["source"]["frames"] == N
    checked = check_clips(case, path, result["clips"], result["clock"], result["source"]["fps"])
    assert checked >= 10   # a sequential clip and at least one interpolation clip


STAGE_CASES = {"mp4-h264-bframes-vfr-drops", "ts-h264-vfr-drops", "avi-mpeg4-nvop", "avi-h264-bframes",
               "mpg-mpeg2-ps"}


def test_the_decode_stage_records_decoder_clock_and_the_right_pictures(files):
    """The isolated stage (child process, pickled results) gives the same pictures and records how: one
    file per decoder and clock (decode_video itself is run on every file above)."""
    stage = DecodeVideo(CONFIG, timeout_s=120)
    seen = set()
    try:
        for case in CASES:
            if case.name not in STAGE_CASES or case.name not in files:
                continue
            seen.add(case.name)
            rows = list(stage([{"status": "ok", "source": str(files[case.name]), "video_id": case.name,
                                "row_index": 0}]))
            assert all(r["status"] == "ok" for r in rows), rows[0]
            assert {(r["decoder"], r["clock"]) for r in rows} == {(case.decoder, case.clock)}
            assert rows[0]["source_info"]["clock"] == case.clock
            check_clips(case, files[case.name], rows, case.clock, rows[0]["source_info"]["fps"])
    finally:
        stage.close()
    assert seen == STAGE_CASES


@pytest.mark.parametrize("name", ["ts-h264-vfr-drops", "ts-mpeg2-offset", "mp4-h264-bframes-vfr-drops"])
def test_the_decord_path_never_returns_a_late_picture(files, name):
    """Called directly (past the container routing), decord either proves its first picture against
    PyAV's or is refused; on MPEG-TS its seek lands a GOP late, so it must be refused there."""
    path = str(files[name])
    facts = probe(path)
    timeline = demux_timeline(path, facts["stream_index"], facts["fps"], facts["duration"])
    wanted = [30, 45, 60]
    w, h = resize_for_short_side(facts["width"], facts["height"], facts["sar"], facts["rotation"], SIZE)
    frames, reader = read_with_decord(path, facts, timeline, wanted, w, h)
    if name.startswith("ts-"):
        assert frames is None
    else:
        assert frames is not None and reader.proof_diff < 8.0
    if frames is not None:
        assert [read_counter(_crop(f)) for f in frames] == wanted


def test_pyav_reader_identifies_pictures_by_pts_not_by_count(files):
    """Reading planned indices straight from the demux clock: a dropped slot or a late seek must not
    shift what comes back."""
    path = str(files["mp4-h264-bframes-vfr-drops"])
    facts = probe(path)
    timeline = demux_timeline(path, facts["stream_index"], facts["fps"], facts["duration"])
    wanted = [0, 8, 9, 17, 41, 79]                       # around dropped slots, and the last picture
    frames = PyAVReader(path, 0, W, H, timeline).read(wanted)
    assert [read_counter(_crop(f)) for f in frames] == wanted


def test_a_packet_without_a_picture_abandons_the_demux_clock(files):
    """In the Matroska N-VOP file, demux position 9 is a placeholder packet: the picture after it (counter
    9) sits at demux position 10. Reading position 10 on the demux clock must refuse (the caller then
    plans on the decode clock) rather than call counter 9 "frame 10"."""
    path = str(files["mkv-mpeg4-nvop"])
    facts = probe(path)
    timeline = demux_timeline(path, facts["stream_index"], facts["fps"], facts["duration"])
    assert timeline.clock == "demux" and len(timeline.pts) > N       # the placeholders have packets
    with pytest.raises(ClockMismatch):
        PyAVReader(path, facts["stream_index"], W, H, timeline).read([10])
