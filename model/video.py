"""Write generated frames as a viewable video: mp4 (PyAV, libx264, yuv420p) or gif (Pillow, else PyAV)."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from clipforge.pipeline.errors import ClipforgeError


def upscale(frames: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [T, H, W, 3] by the smallest integer factor that makes the
    short side >= min_side (tiny 64x64 samples are unreadable at their size), then cropped to even sizes
    (yuv420p needs them)."""
    t, h, w, _ = frames.shape
    k = max(1, -(-min_side // min(h, w)))
    if k > 1:
        frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    return np.ascontiguousarray(frames[:, :h, :w])


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float = 8.0) -> str:
    """uint8 [T, H, W, 3] -> `path`; the format follows the extension (.mp4, .gif). Returns the path."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ClipforgeError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    if ext == ".gif":
        _write_gif(frames, path, fps)
    elif ext in (".mp4", ".mov", ".mkv"):
        _write_x264(frames, path, fps)
    else:
        raise ClipforgeError(f"unsupported video extension {ext!r} (use .mp4 or .gif)")
    return str(path)


def _write_x264(frames: np.ndarray, path: Path, fps: float) -> None:
    import av

    frames = upscale(frames, 2)  # even sizes only
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    try:
        from PIL import Image
    except ImportError:  # PyAV's gif encoder, with its default palette
        import av

        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb8"
            for frame in frames:
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="rgb8")
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0)
