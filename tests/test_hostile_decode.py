"""Untrusted files: playlists and lists that name other files are refused by content before any decoder
opens them, only allowlisted containers are opened, the decode child keeps no credentials and is the OOM
killer's first choice, and `video_root` keeps local sources inside one folder. Real files (PyAV), a real
HTTP server on loopback, a real isolated child."""
from __future__ import annotations

import functools
import http.server
import os
import sys
import threading

import av
import numpy as np
import pytest

from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.admit import CONTAINER_ALLOWLIST, DecodeFailure, container_allowed, open_container
from clipforge.pipeline.video.decode import decode_video, isolated_decoder
from clipforge.pipeline.video.decode_stage import DecodeVideo
from clipforge.pipeline.video.isolate import IsolatedCall

CONFIG = ClipConfig(size=32, rates=(4.0,))
SECRET = "wJalrXUtnFEMI-not-a-real-secret-4711"


def _write(path, fmt: str, codec: str = "libx264", seconds: float = 2.0):
    """A real video of a moving bar, 64×48 at 25 fps."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for n in range(int(seconds * 25)):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, (n * 2) % 64:(n * 2) % 64 + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _rows(stage, source, **extra):
    try:
        return list(stage([{"status": "ok", "source": str(source), "video_id": "v", "row_index": 0, **extra}]))
    finally:
        stage.close()


def _refused(rows, reason="not_a_video"):
    assert len(rows) == 1 and rows[0]["status"] == "error", rows
    assert rows[0]["reason"] == reason, rows[0]
    assert not any("frames" in r for r in rows)   # nothing was sampled
    return rows[0]["error"]


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """A real MPEG-TS segment, long enough to give a sample if anything opened it."""
    folder = tmp_path_factory.mktemp("hls")
    return _write(folder / "seg0.ts", "mpegts")


def _m3u8(segment) -> str:
    return ("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
            f"#EXTINF:2.0,\n{segment.name}\n#EXT-X-ENDLIST\n")


@pytest.mark.parametrize("name", ["list.m3u8", "list.mp4"])
def test_hls_playlist_naming_a_real_segment_is_refused(segment, name):
    playlist = segment.parent / name
    playlist.write_text(_m3u8(segment))
    assert decode_video(str(segment), CONFIG, "seg")["clips"]   # the segment itself is a good video
    message = _refused(_rows(DecodeVideo(CONFIG, timeout_s=60), playlist))
    assert "HLS" in message and "name other files" in message


def test_hls_playlist_with_bom_and_blank_lines_is_refused(segment):
    playlist = segment.parent / "bom.mp4"
    playlist.write_bytes(b"\xef\xbb\xbf\n  \r\n" + _m3u8(segment).encode())
    with pytest.raises(DecodeFailure) as err:
        decode_video(str(playlist), CONFIG, "bom")
    assert err.value.reason == "not_a_video" and "HLS" in str(err.value)


def test_even_a_playlist_that_passed_the_sniff_is_not_opened(segment):
    """The second layer: PyAV opens only allowlisted demuxers, so the hls demuxer never runs."""
    playlist = segment.parent / "direct.m3u8"
    playlist.write_text(_m3u8(segment))
    with av.open(str(playlist)) as container:   # plain PyAV would follow the playlist to the segment
        assert "hls" in container.format.name
    with pytest.raises(av.error.FFmpegError):
        open_container(str(playlist))


def test_ffconcat_list_naming_a_real_video_is_refused(segment):
    concat = segment.parent / "list.ffconcat"
    concat.write_text(f"ffconcat version 1.0\nfile '{segment}'\n")
    message = _refused(_rows(DecodeVideo(CONFIG, timeout_s=60), concat))
    assert "ffconcat" in message


def test_concat_file_lines_are_refused_even_with_binary_bytes(tmp_path, segment):
    listing = tmp_path / "list.mp4"
    listing.write_bytes(b"\x01\x02\x03\n" + f"file '{segment}'\n".encode() + bytes(range(1, 32)))
    with pytest.raises(DecodeFailure) as err:
        decode_video(str(listing), CONFIG, "lines")
    assert err.value.reason == "not_a_video" and "ffconcat" in str(err.value)


@pytest.mark.parametrize("text", ["v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                                  "m=video 5004 RTP/AVP 96\r\n",
                                  '<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011"></MPD>\n',
                                  "<MPD></MPD>\n", "[playlist]\nFile1=seg0.ts\n"])
def test_sdp_dash_and_pls_are_refused(tmp_path, text):
    path = tmp_path / "x.mp4"
    path.write_text(text)
    with pytest.raises(DecodeFailure) as err:
        decode_video(str(path), CONFIG, "x")
    assert err.value.reason == "not_a_video" and "name other files" in str(err.value)


def test_plain_text_is_refused_by_content(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("1\n00:00:01,000 --> 00:00:02,000\nnot a video, a subtitle — ünïcode too\n" * 40)
    message = _refused(_rows(DecodeVideo(CONFIG, timeout_s=60), path))
    assert "plain text" in message


def test_a_container_off_the_allowlist_is_refused(tmp_path):
    path = _write(tmp_path / "x.nut", "nut")
    with av.open(str(path)) as container:
        assert container.format.name == "nut"    # a real video plain PyAV opens and decodes
    message = _refused(_rows(DecodeVideo(CONFIG, timeout_s=60), path), "unsupported_codec")
    assert "not a container we decode" in message


def test_allowlist_names_cover_the_corpus_and_nothing_that_references_files():
    for name in ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "flv", "mpeg", "mpegts", "ogg", "asf", "gif"):
        assert container_allowed(name), name
    for name in ("hls", "concat", "sdp", "rtp", "rtsp", "image2", "lavfi", "tty", "dash", "imf", "nut", "h264",
                 "hevc", "", None):
        assert not container_allowed(name), name
    assert "hls" not in CONTAINER_ALLOWLIST


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_fetched_m3u8_is_never_decoded_as_a_playlist(http_folder, segment):
    root, url = http_folder
    (root / "seg0.ts").write_bytes(segment.read_bytes())
    (root / "live.m3u8").write_text(_m3u8(segment))
    message = _refused(_rows(DecodeVideo(CONFIG, timeout_s=60), f"{url}/live.m3u8"))
    assert "HLS" in message
    # a real video behind a URL that ends in .m3u8 is saved without that extension and decodes as what it is
    (root / "video.m3u8").write_bytes(_write(root / "v.mp4", "mp4").read_bytes())
    rows = _rows(DecodeVideo(CONFIG, timeout_s=60), f"{url}/video.m3u8")
    assert rows and all(r["status"] == "ok" for r in rows), rows[0]


def _child_facts(_):
    """Runs in the decode child: what it can see of its environment and its OOM score."""
    with open("/proc/self/environ", "rb") as f:
        initial = f.read()
    adj = None
    if os.path.exists("/proc/self/oom_score_adj"):
        with open("/proc/self/oom_score_adj") as f:
            adj = f.read().strip()
    return {"environ": dict(os.environ), "initial": initial, "oom_score_adj": adj, "pid": os.getpid()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_decode_child_keeps_no_credentials(monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": SECRET + "hf", "my_api_key": SECRET + "k",
               "GOOGLE_APPLICATION_CREDENTIALS": "/tmp/" + SECRET + ".json", "DB_PASSWORD": SECRET + "pw"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLIPFORGE_HARMLESS", "kept")
    call = IsolatedCall(_child_facts, timeout_s=60)
    try:
        outcome = call(None)
    finally:
        call.close()
    assert outcome[0] == "ok", outcome
    facts = outcome[1]
    assert facts["pid"] != os.getpid()
    for name in secrets:
        assert name not in facts["environ"], name
    assert SECRET.encode() not in facts["initial"]    # not even in /proc/<child>/environ
    assert facts["environ"].get("CLIPFORGE_HARMLESS") == "kept" and b"CLIPFORGE_HARMLESS=kept" in facts["initial"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET    # the parent keeps its own


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="oom_score_adj is Linux's")
def test_the_decode_child_is_the_oom_killers_first_choice(tmp_path):
    call = IsolatedCall(_child_facts, timeout_s=60)
    try:
        outcome = call(None)
    finally:
        call.close()
    assert outcome[0] == "ok" and outcome[1]["oom_score_adj"] == "1000", outcome


def test_the_decode_stage_and_clips_use_the_limited_child(tmp_path):
    """DecodeVideo and `clipforge clips` share one factory: time, CPU and memory limits, decoders imported."""
    call = isolated_decoder(30.0)
    assert call.fn is decode_video and call.timeout_s == 30.0 and call.memory_limit_mb == 8192
    assert call.cpu_limit_s == 70.0 and call.init is not None
    stage = DecodeVideo(CONFIG, timeout_s=30.0)
    assert (stage.call.timeout_s, stage.call.memory_limit_mb, stage.call.cpu_limit_s) == (30.0, 8192, 70.0)
    stage.close()


def test_clips_refuses_a_playlist_and_runs_under_the_limits(segment, tmp_path):
    from clipforge.jobs.clips import plan_video

    playlist = segment.parent / "clips.mp4"
    playlist.write_text(_m3u8(segment))
    result = plan_video(str(playlist), size=32, timeout_s=60)
    assert result["clips"] == [] and result["failure"]["reason"] == "not_a_video", result
    good = plan_video(str(segment), size=32, timeout_s=60)
    assert good["failure"] is None and good["clips"]
    # the memory limit reaches the child: 64 MiB of address space cannot even import the decoders
    starved = plan_video(str(segment), size=32, timeout_s=60, memory_limit_mb=64)
    assert starved["failure"]["reason"] == "worker_crash", starved


def test_video_root_refuses_paths_and_symlinks_outside_it(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    inside = _write(root / "in.mp4", "mp4")
    foreign = _write(outside / "out.mp4", "mp4")
    (root / "link.mp4").symlink_to(foreign)
    (root / "sub").mkdir()
    stage = lambda: DecodeVideo(CONFIG, isolate=False, video_root=str(root))   # noqa: E731
    rows = _rows(stage(), inside)
    assert rows and all(r["status"] == "ok" for r in rows), rows[0]
    for source in (foreign, root / "link.mp4", root / "sub" / ".." / ".." / "outside" / "out.mp4"):
        message = _refused(_rows(stage(), source), "bad_manifest_row")
        assert "outside the video root" in message
    # a sibling folder whose name merely starts with the root's is outside too
    (tmp_path / "root2").mkdir()
    sibling = _write(tmp_path / "root2" / "x.mp4", "mp4")
    _refused(_rows(stage(), sibling), "bad_manifest_row")
    # without a root, the same symlink decodes as before
    rows = _rows(DecodeVideo(CONFIG, isolate=False), root / "link.mp4")
    assert rows and all(r["status"] == "ok" for r in rows)
