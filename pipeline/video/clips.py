"""Clip planning: which source frames make each sample (CogVideo's multi-frame-rate sampling).

Pure functions over frame timestamps, so the policy is testable without a decoder. Sampling is by
*time*: the targets are instants, and each picks the frame on screen at that instant, so variable frame
rates, start offsets and dropped frames give the frames a viewer would see.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from clipforge.pipeline.errors import ClipforgeError

SEQUENTIAL = "sequential"
INTERPOLATION = "interpolation"
COGVIDEO = "cogvideo"
MODES = (SEQUENTIAL, INTERPOLATION, "both", COGVIDEO)


@dataclass(frozen=True)
class ClipConfig:
    frames: int = 5                       # frames per sample
    rates: tuple = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)   # predefined frame rates (fps)
    mode: str = SEQUENTIAL                # sequential | interpolation | both
    max_span: float = 16.0                # seconds between first and last frame, at most
    trim: float = 0.0                     # seconds dropped at both ends before sampling
    interpolation_rates: tuple = (2.0, 4.0, 8.0)
    clips_per_video: int = 4              # interpolation and cogvideo modes: clips per video, at most
    size: int = 160                       # output frames are size x size
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ClipforgeError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.frames < 1 or self.size < 8 or not self.rates:
            raise ClipforgeError("frames >= 1, size >= 8 and at least one rate are required")
        if self.mode == COGVIDEO and self.frames < 2:
            raise ClipforgeError("the cogvideo mode spreads a clip over its frames: it needs at least 2")
        object.__setattr__(self, "rates", tuple(sorted(float(r) for r in self.rates)))
        object.__setattr__(self, "interpolation_rates", tuple(sorted(float(r) for r in self.interpolation_rates)))


@dataclass
class ClipPlan:
    mode: str
    rate: float
    span: float                           # seconds from the first to the last frame: (frames-1)/rate
    frame_indices: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)   # presentation times (s) of the chosen frames

    def as_dict(self) -> dict:
        return {"mode": self.mode, "rate": self.rate, "span": self.span,
                "frame_indices": list(self.frame_indices), "timestamps": list(self.timestamps)}


def sane_timestamps(pts: np.ndarray, duration: float | None) -> bool:
    """decord returns garbage (about -3e17 s) on some AVI/MPEG-PS files: trust only finite,
    non-decreasing times that lie within the container's duration (with a little slack)."""
    if pts.size == 0 or not np.all(np.isfinite(pts)):
        return False
    if np.any(np.diff(pts) < -1e-6) or pts[0] < -1.0:
        return False
    limit = (duration if duration and duration > 0 else pts[-1]) + 2.0
    return bool(pts[-1] <= limit)


def usable_window(pts: np.ndarray, frame_end: float, config: ClipConfig,
                  start: float | None = None, end: float | None = None) -> tuple[float, float]:
    """[t0, t1]: the part of the video samples may come from (manifest start/end, then trim)."""
    t0, t1 = float(pts[0]), float(frame_end)
    if start is not None and np.isfinite(start):
        t0 = max(t0, float(start))
    if end is not None and np.isfinite(end):
        t1 = min(t1, float(end))
    return t0 + config.trim, t1 - config.trim


def frames_at(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last frame whose pts <= t (1 ms slack for rounding)."""
    idx = np.searchsorted(pts, times + 1e-3, side="right") - 1
    return np.clip(idx, 0, len(pts) - 1)


def plan_clips(pts: np.ndarray, frame_end: float, config: ClipConfig, key: str = "",
               start: float | None = None, end: float | None = None,
               source_fps: float | None = None) -> list[ClipPlan]:
    """All clips for one video, per the configured mode. Empty when the video is too short.

    pts: presentation time (s) of every frame in display order; frame_end: when the last frame stops
    being shown (its pts plus its duration).
    """
    t0, t1 = usable_window(pts, frame_end, config, start, end)
    length = t1 - t0
    plans: list[ClipPlan] = []
    if length <= 0:
        return plans
    if config.mode in (SEQUENTIAL, "both"):
        seq = _plan_sequential(pts, t0, t1, config)
        if seq is not None:
            plans.append(seq)
    if config.mode in (INTERPOLATION, "both"):
        plans.extend(_plan_interpolation(pts, t0, t1, config, key, source_fps))
    if config.mode == COGVIDEO:
        plans.extend(_plan_cogvideo(pts, t0, t1, config, source_fps))
    return plans


def cogvideo_frames(frame_count: int, fps: float, frames: int = 5, max_clips: int = 4,
                    max_seconds: float = 16.0) -> tuple[int, int, list[list[int]]]:
    """(clip seconds, interval, frame indices per clip) as cogdata's video task chooses them: the clip
    covers `min(whole seconds - 1, 16)` seconds with `frames` frames `interval = int(fps * seconds /
    (frames - 1))` apart; the video, strided by that interval, holds `strided // frames` clips (at most
    `max_clips`), taken in a row from `(strided - clips * frames) // 2`. That start counts strided frames
    but is used as a frame index, as cogdata does: a video's clips begin near its start, not centred in
    it. No clips when the video is shorter than 2 seconds (cogdata's interval would be 0)."""
    seconds = min(int(frame_count / fps) - 1, int(max_seconds))
    interval = int(fps * (seconds / (frames - 1))) if seconds >= 1 else 0
    if interval < 1:
        return seconds, interval, []
    strided = int((frame_count + interval - 1) / interval)
    clips = min(strided // frames, max_clips)
    start = (strided - clips * frames) // 2
    indices = list(range(start, interval * clips * frames + start, interval))
    return seconds, interval, [indices[k * frames:(k + 1) * frames] for k in range(clips)]


def _plan_cogvideo(pts, t0, t1, config: ClipConfig, source_fps) -> list[ClipPlan]:
    """cogdata's frames on the frame-exact timeline: its frame index i is the frame on screen at i / fps
    after the window's start (on a constant-rate video, frame i itself; on a variable-rate one, what a
    viewer sees at the time cogdata's formula means, not the i-th decoded picture). `span` is cogdata's
    clip seconds, the duration its text names ("4.0秒")."""
    inside = np.flatnonzero((pts >= t0 - 1e-6) & (pts < t1 - 1e-6))
    if len(inside) < config.frames:
        return []
    fps = source_fps if source_fps and source_fps > 0 else len(inside) / max(t1 - t0, 1e-6)
    seconds, interval, clips = cogvideo_frames(len(inside), fps, config.frames, config.clips_per_video,
                                               config.max_span)
    start = float(pts[inside[0]])
    plans = []
    for clip in clips:
        idx = frames_at(pts, start + np.asarray(clip, dtype=np.float64) / fps)
        plans.append(ClipPlan(COGVIDEO, round(fps / interval, 6), float(seconds), idx.tolist(),
                              [round(float(pts[i]), 6) for i in idx]))
    return plans


def _clip_at(pts: np.ndarray, center: float, rate: float, config: ClipConfig, mode: str) -> ClipPlan | None:
    offsets = (np.arange(config.frames) - (config.frames - 1) / 2.0) / rate
    idx = frames_at(pts, center + offsets)
    if len(set(idx.tolist())) < config.frames:   # the source is too sparse for this rate: frames would repeat
        return None
    return ClipPlan(mode, rate, (config.frames - 1) / rate, idx.tolist(), [round(float(pts[i]), 6) for i in idx])


def _plan_sequential(pts, t0, t1, config: ClipConfig) -> ClipPlan | None:
    """The lowest rate whose frames fit, so the sample spans as much of the video as possible."""
    length = t1 - t0
    for rate in config.rates:
        span = (config.frames - 1) / rate
        if span > config.max_span + 1e-9 or span > length + 1e-9:
            continue
        plan = _clip_at(pts, (t0 + t1) / 2.0, rate, config, SEQUENTIAL)
        if plan is not None:
            return plan
    return None


def _plan_interpolation(pts, t0, t1, config: ClipConfig, key: str, source_fps) -> list[ClipPlan]:
    """Non-overlapping clips at one of the higher rates, chosen per video from a key-derived seed."""
    length = t1 - t0
    fitting = [r for r in config.interpolation_rates
               if (config.frames - 1) / r <= length + 1e-9 and (not source_fps or r <= source_fps * 1.01)]
    if not fitting:
        return []
    rng = np.random.default_rng(_seed_for(config.seed, key))
    rate = float(fitting[rng.integers(len(fitting))])
    span = (config.frames - 1) / rate
    count = int(min(config.clips_per_video, max(1, np.floor((length + 1e-9) / (span + 1.0 / rate)))))
    plans = []
    part = length / count
    for i in range(count):   # one clip centred in each of `count` equal parts: never overlapping
        plan = _clip_at(pts, t0 + part * (i + 0.5), rate, config, INTERPOLATION)
        if plan is not None:
            plans.append(plan)
    return plans


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


# --- geometry -------------------------------------------------------------------------------------

def display_size(width: int, height: int, sar: float, rotation: int) -> tuple[int, int]:
    """Size as shown to a viewer: sample aspect ratio applied, then rotation."""
    w = width * (sar or 1.0)
    if rotation % 180:
        return int(round(height)), int(round(w))
    return int(round(w)), int(height)


def resize_for_short_side(width: int, height: int, sar: float, rotation: int, size: int) -> tuple[int, int]:
    """Stored-orientation (width, height) to decode at, so that the displayed short side is `size`."""
    disp_w = width * (sar or 1.0)
    scale = size / min(disp_w, height)
    return max(size, int(round(disp_w * scale))), max(size, int(round(height * scale)))


def crop_box(disp_w: int, disp_h: int, size: int) -> list[float]:
    """Centre-crop box [x, y, w, h] in display pixels of the source."""
    side = min(disp_w, disp_h)
    return [round((disp_w - side) / 2.0, 3), round((disp_h - side) / 2.0, 3), float(side), float(side)]


def orient_for_display(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate stored frames [T,H,W,3] as a viewer sees them.

    `rotation` is the display matrix angle as PyAV/ffmpeg report it (counter-clockwise degrees):
    -90 means turn the picture 90° clockwise.
    """
    k = (rotation // 90) % 4
    return np.rot90(frames, k=k, axes=(1, 2)) if k else frames


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    _, h, w, _ = frames.shape
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(frames[:, y:y + size, x:x + size])


def orient_and_crop(frames: np.ndarray, rotation: int, size: int) -> np.ndarray:
    """Rotate stored frames [T,H,W,3] for display, then centre-crop to [T,size,size,3]."""
    return center_crop(orient_for_display(frames, rotation), size)
