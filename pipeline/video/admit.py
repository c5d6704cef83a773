"""Which files may reach a demuxer, and how one is opened: every video is untrusted.

`sniff` refuses by content, whatever the name, what must never be demuxed (playlists and lists that make
FFmpeg open other files or sockets, plain text); `open_container` opens with only the allowlisted
demuxers and only local files. `pipeline/video/decode.py` calls both before reading a frame.
"""
from __future__ import annotations

import re

from clipforge.pipeline.errors import InputFailure

# The demuxers we open (ffmpeg names; PyAV's `container.format.name` is a comma list of them, e.g.
# "mov,mp4,m4a,3gp,3g2,mj2"). Everything the conformance corpus and the shared real files use, plus ASF
# (wmv) and GIF. Not raw elementary streams (h264, hevc, …), images, and above all no demuxer that opens
# other files or sockets (hls, concat, dash, sdp, rtp, rtsp, image2, imf, lavfi, tty).
CONTAINER_ALLOWLIST = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "mpeg",
                       "mpegts", "ogg", "asf", "gif")
# Given to every av.open: ffmpeg refuses any other demuxer after probing and before reading the header,
# and any protocol but local files, also for files a demuxer would open on its own.
OPEN_OPTIONS = {"format_whitelist": ",".join(CONTAINER_ALLOWLIST), "protocol_whitelist": "file"}
# A fetched file keeps its URL's extension only when it is one of these (a URL ending in .m3u8 is saved
# without one): ffmpeg's probing uses the name as a hint.
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mj2", ".mkv", ".webm", ".avi", ".flv",
                              ".mpg", ".mpeg", ".vob", ".ts", ".m2ts", ".mts", ".ogg", ".ogv", ".asf", ".wmv",
                              ".gif"})
SNIFF_BYTES = 4096
# Text formats that make ffmpeg open other files or sockets, by how they start (after an optional BOM
# and whitespace, compared case-insensitively).
REFERENCING_PREFIXES = (
    (b"#extm3u", "an HLS/M3U playlist"),
    (b"#ext-x-", "an HLS playlist"),
    (b"ffconcat version", "an ffconcat list"),
    (b"v=0", "an SDP session description"),
    (b"[playlist]", "a PLS playlist"),
    (b"<?xml", "an XML document (DASH/IMF manifest)"),
    (b"<mpd", "a DASH manifest"),
)
FILE_LINE = re.compile(rb"^[ \t]*file[ \t]+['\"]", re.IGNORECASE | re.MULTILINE)   # concat's `file '…'`


class DecodeFailure(InputFailure):
    """Bad input: the reason (one of schema.REASONS) goes to the ledger."""



def container_allowed(format_name: str) -> bool:
    """Whether a demuxer name as PyAV reports it ("mov,mp4,m4a,3gp,3g2,mj2") is on the allowlist."""
    return any(name.strip() in CONTAINER_ALLOWLIST for name in (format_name or "").split(","))


def open_container(path: str):
    """av.open restricted to the allowlisted demuxers and to local files (see `OPEN_OPTIONS`)."""
    import av

    return av.open(path, container_options=dict(OPEN_OPTIONS))


def _is_plain_text(head: bytes) -> bool:
    """No NUL byte, valid UTF-8 (a character cut at the end excepted), every character printable or
    whitespace. Every container we accept has binary bytes in its first KiB."""
    if b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return False
        text = head[:err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def sniff(path: str) -> None:
    """Refuse, by content and whatever the name, what must never reach a demuxer: playlists and lists
    that make ffmpeg open other files or sockets (HLS .m3u8, ffconcat, SDP, DASH, PLS) and plain text.
    Raises DecodeFailure("not_a_video", …)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as err:
        raise DecodeFailure("not_a_video", f"cannot read: {err}") from None
    start = head
    while True:   # BOMs and whitespace, in any order
        stripped = start.lstrip(b" \t\r\n\f\v")
        stripped = stripped[3:] if stripped.startswith(b"\xef\xbb\xbf") else stripped
        if stripped == start:
            break
        start = stripped
    lowered = start[:32].lower()
    for prefix, what in REFERENCING_PREFIXES:
        if lowered.startswith(prefix):
            raise DecodeFailure("not_a_video", f"{what}, not a video: files that name other files are refused")
    if FILE_LINE.search(head):
        raise DecodeFailure("not_a_video", "an ffconcat list (`file '…'` lines), not a video: files that name "
                                           "other files are refused")
    if _is_plain_text(head):
        raise DecodeFailure("not_a_video", "plain text, not a video")
