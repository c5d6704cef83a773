"""Display geometry on real encoded files: rotation metadata and non-square pixels, both decoders."""
import fractions

import av
import numpy as np

from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.decode import PyAVReader, decode_video, demux_timeline, probe
from clipforge.pipeline.video.clips import orient_for_display, resize_for_short_side


def _write(path, paint, rotation=0, sar=None, w=128, h=64, frames=30):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if sar:
            s.codec_context.sample_aspect_ratio = fractions.Fraction(*sar)
        if rotation:
            s.set_display_rotation(rotation)
        for _ in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            paint(img)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _top_half(img):
    img[:32] = 255


def _center_columns(img):
    img[:, 48:80] = 255


def test_rotation_metadata_is_applied(tmp_path):
    # stored 128x64 with a white top half; rotation -90 turns it clockwise: the top becomes the right
    path = _write(tmp_path / "rot.mp4", _top_half, rotation=-90)
    facts = probe(str(path))
    assert facts["rotation"] == -90
    result = decode_video(str(path), ClipConfig(size=32, rates=(2.0,)), "rot")
    frame = result["clips"][0]["frames"][2].mean(axis=2)
    assert result["decoder"] == "decord"
    assert frame[:, 20:].mean() > 200 and frame[:, :12].mean() < 40
    assert result["clips"][0]["crop"] == [0.0, 32.0, 64.0, 64.0]        # display is 64 wide, 128 tall


def test_rotation_through_the_pyav_path_matches(tmp_path):
    path = _write(tmp_path / "rot.mp4", _top_half, rotation=-90)
    facts = probe(str(path))
    timeline = demux_timeline(str(path), 0, facts["fps"], facts["duration"])
    w, h = resize_for_short_side(128, 64, 1.0, -90, 32)
    frame = orient_for_display(PyAVReader(str(path), 0, w, h, timeline).read([10]), -90)[0].mean(axis=2)
    assert frame.shape == (64, 32)
    assert frame[:, 20:].mean() > 200 and frame[:, :12].mean() < 40


def test_sample_aspect_ratio_widens_before_the_crop(tmp_path):
    # 2:1 pixels: displayed 256x64, so the centre crop is stored columns 48..80, all white
    path = _write(tmp_path / "sar.mp4", _center_columns, sar=(2, 1))
    result = decode_video(str(path), ClipConfig(size=32, rates=(2.0,)), "sar")
    frame = result["clips"][0]["frames"][0].mean(axis=2)
    assert probe(str(path))["sar"] == 2.0
    assert frame[:, 3:-3].mean() > 200
    assert result["clips"][0]["crop"] == [96.0, 0.0, 64.0, 64.0]
