"""Synthetic corpus behind `clipforge synth OUT [--videos N] [--seed S]`.

Each video is a real H.264 mp4 of one coloured shape (circle, square or triangle) crossing a plain dark
background in one direction, so every later stage (decode, tokenize, train, sample) can be checked against
a known ground truth: the manifest keeps `color`, `shape` and `direction` beside a caption worded in many
ways. Optional dirty captions and broken files exercise the cleaning and failure paths.

Everything is derived from the configured seed and the row index (`default_rng([seed, index])`), so one
seed gives a byte-identical manifest and identical video files, and video i does not depend on how many
videos were asked for.
"""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import numpy as np
import pandas as pd
from clipforge.pipeline.errors import ClipforgeError

# Saturated, well separated colours: they must stay distinguishable after yuv420p + x264 loss, and each
# has a luma well above the dark background so "the shape" is simply "the bright pixels".
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 210, 220),
    "orange": (245, 135, 25),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Broken rows cycle through these, in this order; each maps to a failure reason in clipforge.pipeline.schema.REASONS.
BROKEN_KINDS = ("empty", "truncated", "not_a_video", "missing")


@dataclass(frozen=True)
class SynthConfig:
    videos: int = 24
    seed: int = 0
    sizes: tuple = ((96, 64), (128, 96), (160, 120), (120, 160), (176, 144))  # (width, height)
    fps_choices: tuple = (24, 25, 30)
    min_seconds: float = 1.0
    max_seconds: float = 20.0      # durations are drawn uniformly in [min_seconds, max_seconds]
    dirty_captions: float = 0.0    # fraction of the good videos whose caption is made dirty
    broken: int = 0                # extra broken rows, kinds cycling through BROKEN_KINDS
    leave_out: tuple = ()          # (color, shape, direction) combinations no video of this corpus shows
    only: tuple = ()               # if given, the only combinations its videos show (e.g. a training set's left-out ones)
    cross_band: float = 1.0        # paths run within this middle fraction of the other axis (1.0: anywhere)

    def __post_init__(self):
        for name in ("leave_out", "only"):
            combos = tuple(tuple(c) for c in getattr(self, name))
            for color, shape, direction in combos:
                if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
                    raise ClipforgeError(f"unknown combination {color!r} {shape!r} {direction!r}: colours are "
                                     f"{', '.join(COLORS)}; shapes {', '.join(SHAPES)}; directions "
                                     f"{', '.join(DIRECTIONS)}")
            object.__setattr__(self, name, combos)
        if not 0.0 <= self.cross_band <= 1.0:
            raise ClipforgeError(f"cross_band is a fraction of the frame in [0, 1], not {self.cross_band}")
        if len(set(self.leave_out)) >= len(COLORS) * len(SHAPES) * len(DIRECTIONS) or (
                self.only and set(self.only) <= set(self.leave_out)):
            raise ClipforgeError("leave_out and only leave no combination to draw")

    def allows(self, color: str, shape: str, direction: str) -> bool:
        combo = (color, shape, direction)
        return combo not in self.leave_out and (not self.only or combo in self.only)


@dataclass(frozen=True)
class SyntheticVideoPlan:
    """Everything needed to render one video; the manifest's truth columns come from here."""
    index: int
    color: str
    shape: str
    direction: str
    fps: int
    n_frames: int
    width: int
    height: int
    radius: float          # half the shape's side / diameter, in pixels
    start: tuple           # (x, y) centre at the first frame
    end: tuple             # (x, y) centre at the last frame
    background: tuple      # RGB
    gop: int
    caption: str

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps

    def center(self, k: int) -> tuple:
        """Centre (x, y) at frame k: constant speed from `start` to `end`."""
        t = k / max(1, self.n_frames - 1)
        return (self.start[0] + t * (self.end[0] - self.start[0]),
                self.start[1] + t * (self.end[1] - self.start[1]))


def _shape_mask(shape, cx, cy, r, xs, ys):
    # xs: (1, W), ys: (H, 1) pixel coordinates; broadcasting gives an (H, W) mask without a meshgrid.
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "triangle":
        # apex up at (cx, cy - r), base on y = cy + r with half-width r
        return (ys <= cy + r) & (np.abs(xs - cx) <= (ys - cy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_frame(shape, color_rgb, center_xy, radius, width, height, background) -> np.ndarray:
    """One frame as uint8 (H, W, 3): `shape` in `color_rgb` centred at `center_xy` on `background`."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = background
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    frame[_shape_mask(shape, center_xy[0], center_xy[1], radius, xs, ys)] = color_rgb
    return frame


# ---- captions: several templates and synonyms, so a model must learn the words, not one sentence ----
_SHAPE_WORDS = {"circle": ("circle", "ball", "disc", "dot"),
                "square": ("square", "box", "block"),
                "triangle": ("triangle", "wedge")}
_VERBS = (("moves", "moving"), ("slides", "sliding"), ("drifts", "drifting"),
          ("glides", "gliding"), ("travels", "traveling"))
_DIR_WORDS = {"left": ("to the left", "leftward", "left", "toward the left edge"),
              "right": ("to the right", "rightward", "right", "toward the right edge"),
              "up": ("upward", "up", "toward the top"),
              "down": ("downward", "down", "toward the bottom")}
_SIZES = ("small ", "little ", "", "")
_BACKGROUNDS = ("a dark screen", "a black background", "a dark backdrop", "a plain dark background")
_TEMPLATES = ("a {color} {shape} {verb} {dir}",
              "{color} {shape} {ving} {dir}",
              "A {size}{color} {shape} {verb} {dir} across {bg}",
              "{Color} {shape} {ving} {dir} on {bg}",
              "a {size}{shape} in {color} {verb} {dir}",
              "on {bg}, a {color} {shape} {verb} {dir}")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def make_caption(color: str, shape: str, direction: str, rng: np.random.Generator) -> str:
    verb, ving = _pick(rng, _VERBS)
    text = _pick(rng, _TEMPLATES).format(
        color=color, Color=color.capitalize(), shape=_pick(rng, _SHAPE_WORDS[shape]), verb=verb,
        ving=ving, dir=_pick(rng, _DIR_WORDS[direction]), size=_pick(rng, _SIZES), bg=_pick(rng, _BACKGROUNDS))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


# ---- dirty captions: the noise that web alt-text really has, for the caption cleaner to remove ----
def _prefix(c, rng):
    return _pick(rng, ("The video shows ", "This video shows ", "The video shows: ")) + c[0].lower() + c[1:]


def _html(c, rng):
    words = c.split(" ")
    i = int(rng.integers(len(words)))
    words[i] = f"<b>{words[i]}</b>"
    return _pick(rng, ("<p>{}</p>", "{} &amp; more", "&quot;{}&quot;", "{}&nbsp;<br/>")).format(" ".join(words))


def _url(c, rng):
    return c + _pick(rng, (" https://example.com/clips/{}", " (via http://t.co/{})", " www.shapes.test/v?id={}")
                     ).format(int(rng.integers(10**5, 10**6)))


def _handle(c, rng):
    return _pick(rng, ("@shapebot: {}", "{} via @clip_fan", "{} cc @user{}")).format(c, int(rng.integers(100)))


def _zero_width(c, rng):
    for _ in range(2):
        i = int(rng.integers(1, len(c)))
        c = c[:i] + _pick(rng, ("\u200b", "\u200d", "\u2060")) + c[i:]
    return "\ufeff" + c


def _whitespace(c, rng):
    return "  " + re.sub(" ", lambda _m: _pick(rng, (" ", " ", " ", "  ", "\t", " \n ")), c) + " \n"


def _mojibake(c, rng):
    # Non-ASCII punctuation encoded as UTF-8 and decoded as latin-1: the classic "â€œ" that ftfy repairs.
    c = _pick(rng, ("\u201c{}\u201d", "{} \u2014 nice", "{} \u2026", "caf\u00e9 clip: {}")).format(c)
    return c.encode("utf-8").decode("latin-1")


# Applied in this order: zero-width chars go in before URLs and handles are added, so those stay intact.
_DIRTIERS = (_prefix, _zero_width, _html, _url, _handle, _whitespace, _mojibake)


def make_dirty(caption: str, rng: np.random.Generator) -> str:
    """Apply 2-3 kinds of noise; mojibake last, so it also garbles what the others added."""
    ops = sorted(rng.choice(len(_DIRTIERS), size=int(rng.integers(2, 4)), replace=False))
    for op in ops:
        caption = _DIRTIERS[op](caption, rng)
    return caption


def plan_synthetic_video(config: SynthConfig, index: int) -> SyntheticVideoPlan:
    """The ground truth and geometry of video `index`, from `default_rng([seed, index])` alone."""
    rng = np.random.default_rng([config.seed, index])
    color = _pick(rng, tuple(COLORS))
    shape = _pick(rng, SHAPES)
    direction = _pick(rng, DIRECTIONS)
    while not config.allows(color, shape, direction):   # redrawn from the same stream: still one seed per video
        color, shape, direction = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES), _pick(rng, DIRECTIONS)
    width, height = _pick(rng, config.sizes)
    width, height = int(width) // 2 * 2, int(height) // 2 * 2   # yuv420p needs even sizes
    fps = int(_pick(rng, config.fps_choices))
    n_frames = max(2, round(rng.uniform(config.min_seconds, config.max_seconds) * fps))
    radius = float(min(width, height) * rng.uniform(1 / 8, 1 / 6))   # size 1/4 .. 1/3 of the short side
    horizontal = direction in ("left", "right")
    along, across = (width, height) if horizontal else (height, width)
    # Start near one edge and end near the other (shape always fully inside), so frames sampled seconds
    # apart differ clearly and the direction is unambiguous.
    a0 = radius + 1 + rng.uniform(0, 0.1) * along
    a1 = along - 1 - radius - rng.uniform(0, 0.1) * along
    if direction in ("left", "up"):
        a0, a1 = a1, a0
    # Across the path: anywhere the shape fits, or within the middle `cross_band` of the frame. With a narrow
    # band a shape's position tells its axis (a left-mover is never low in the frame, an up-mover never at
    # the side), which a small model learns in far fewer steps than the axis from the caption's words.
    half_band = config.cross_band * across / 2
    lo, hi = max(radius + 1, across / 2 - half_band), min(across - 1 - radius, across / 2 + half_band)
    c = rng.uniform(lo, hi)
    start, end = ((a0, c), (a1, c)) if horizontal else ((c, a0), (c, a1))
    shade = int(rng.integers(14, 40))   # dark grey, slightly tinted per video
    background = tuple(int(v) for v in np.clip(shade + rng.integers(-6, 7, size=3), 0, 255))
    return SyntheticVideoPlan(index=index, color=color, shape=shape, direction=direction, fps=fps, n_frames=n_frames,
                     width=width, height=height, radius=radius,
                     start=(float(start[0]), float(start[1])), end=(float(end[0]), float(end[1])),
                     background=background, gop=int(rng.integers(12, 26)),
                     caption=make_caption(color, shape, direction, rng))


def write_synthetic_video(path, plan: SyntheticVideoPlan) -> None:
    """Encode the plan as H.264 mp4 (libx264, yuv420p, crf 23, preset veryfast, GOP `plan.gop`)."""
    import av  # imported here so that planning and captions work without PyAV

    xs = np.arange(plan.width, dtype=np.float32)[None, :]
    ys = np.arange(plan.height, dtype=np.float32)[:, None]
    frame = np.empty((plan.height, plan.width, 3), np.uint8)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=plan.fps)
        stream.width, stream.height, stream.pix_fmt = plan.width, plan.height, "yuv420p"
        stream.codec_context.gop_size = plan.gop
        # Byte-identical files for one seed: x264 writes its settings (thread count included) into the
        # stream, so the count is fixed (these tiny frames encode fast on one core); and with mbtree on,
        # x264 gave a different first frame in ~1 of 10 runs at these sizes (measured), so it is off.
        stream.options = {"crf": "23", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        for k in range(plan.n_frames):
            cx, cy = plan.center(k)
            frame[:] = plan.background
            frame[_shape_mask(plan.shape, cx, cy, plan.radius, xs, ys)] = COLORS[plan.color]
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = k, Fraction(1, plan.fps)
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))   # flush the encoder's delayed frames


def _write_broken(path: pathlib.Path, kind: str, plan: SyntheticVideoPlan) -> None:
    path.unlink(missing_ok=True)   # a rerun must not leave an old good file behind
    if kind == "empty":
        path.touch()
    elif kind == "truncated":
        # The mp4 muxer writes the index (moov) at the end, so the first 40% has frames but no index.
        write_synthetic_video(path, plan)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])
    elif kind == "not_a_video":
        path.write_text("this is not a video, only text with an .mp4 name\n" * 20)
    elif kind != "missing":
        raise ValueError(f"unknown broken kind {kind!r}")


def parse_combinations(text: str) -> tuple:
    """"red-square-left,blue-circle-up" -> (("red", "square", "left"), ("blue", "circle", "up"))."""
    combos = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split("-")
        if len(parts) != 3:
            raise ClipforgeError(f"{item!r}: a combination is COLOR-SHAPE-DIRECTION, e.g. red-square-left")
        combos.append(tuple(parts))
    return tuple(combos)


def parse_sizes(text: str) -> tuple:
    """"64x64,96x96" -> ((64, 64), (96, 96)): (width, height) pairs; even sizes of at least 16."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ClipforgeError(f"{item!r}: a size is WIDTHxHEIGHT, e.g. 96x96")
        width, height = int(parts[0]), int(parts[1])
        if min(width, height) < 16 or width % 2 or height % 2:
            raise ClipforgeError(f"{item!r}: width and height must be even and at least 16 (yuv420p, a visible shape)")
        sizes.append((width, height))
    return tuple(sizes)


def write_synthetic_corpus(out_dir, config: SynthConfig = SynthConfig(),
                           progress: Optional[Callable[[int, int], None]] = None) -> pathlib.Path:
    """Write OUT/videos/NNNNNN.mp4 and OUT/manifest.parquet; return the manifest's path.

    Rows 0..videos-1 are good videos; rows videos..videos+broken-1 are broken files (`broken=True`), whose
    truth columns describe the video that would have been written. `progress(i, n)` is called after each row.
    """
    out = pathlib.Path(out_dir).resolve()
    (out / "videos").mkdir(parents=True, exist_ok=True)
    n = config.videos + config.broken
    # Exactly round(fraction * videos) dirty captions, chosen by a seed-derived permutation.
    n_dirty = round(config.dirty_captions * config.videos)
    dirty = set(np.random.default_rng([config.seed, 2**32 - 1]).permutation(config.videos)[:n_dirty].tolist())
    rows = []
    for i in range(n):
        plan = plan_synthetic_video(config, i)
        path = out / "videos" / f"{i:06d}.mp4"
        is_broken = i >= config.videos
        if is_broken:
            _write_broken(path, BROKEN_KINDS[(i - config.videos) % len(BROKEN_KINDS)], plan)
        else:
            write_synthetic_video(path, plan)
        caption = plan.caption
        if i in dirty:
            caption = make_dirty(caption, np.random.default_rng([config.seed, i, 1]))
        rows.append({"id": f"synth-{i:06d}", "video": str(path), "caption": caption, "color": plan.color,
                     "shape": plan.shape, "direction": plan.direction, "fps": plan.fps,
                     "seconds": plan.seconds, "width": plan.width, "height": plan.height,
                     "broken": is_broken})
        if progress is not None:
            progress(i + 1, n)
    manifest = out / "manifest.parquet"
    df = pd.DataFrame(rows, columns=["id", "video", "caption", "color", "shape", "direction", "fps",
                                     "seconds", "width", "height", "broken"])
    df = df.astype({"fps": "int64", "seconds": "float64", "width": "int64", "height": "int64", "broken": "bool"})
    df.to_parquet(manifest, index=False)
    return manifest
