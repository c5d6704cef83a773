"""The ground-truth reader of synthetic videos (`clipforge synth`): a pixel detector that knows nothing
about any model, used by `clipforge eval-synth`, the demo's check and the tests.

    foreground  pixels far from the background colour (the median of the frame borders), largest
                connected blob per frame
    colour      the synth palette colour nearest in direction (angle between RGB vectors) to the median
                RGB of the blobs' inner pixels (one pixel eroded) over all frames: a VQ decoder darkens
                colours by 10-25 % and blends the rim into the background, which moved a darkened
                orange nearer to red than to orange by plain RGB distance, but leaves its hue alone
    shape       medians over frames (those whose blob touches the border only when no other frame has
                a blob) of the taper (mean width of the blob's top third over its bottom third: ~0.4 for
                the synth's apex-up triangle, ~1 otherwise) and the fill of its bounding box (a square
                ~1.0, a circle pi/4 ~ 0.79); thresholds set on held-out videos passed through the demo's
                8x8-code tokenizer, whose soft corners bring squares down to ~0.85
    direction   the dominant axis and sign of the blob centroid's least-squares motion across frames;
                less than MIN_MOTION of the frame side in total counts as "none" (always wrong)
"""
from __future__ import annotations

import numpy as np


MIN_MOTION = 0.08         # of the frame side: the synth shapes cross most of the frame in a sequential clip
FG_DISTANCE = 70          # max channel difference from the background that makes a pixel foreground
ATTRIBUTES = ("color", "shape", "direction")


# ----------------------------------------------------------------------------------------- detector


def _largest_blob(mask: np.ndarray) -> np.ndarray | None:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def background_distance(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> int16 [T, H, W]: each pixel's largest channel difference from the background
    colour, the median of all frames' border pixels (a synthetic video's background is one flat colour)."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]]).reshape(-1, 3)
    background = np.median(border, axis=0)
    return np.abs(frames.astype(np.int16) - background.astype(np.int16)).max(axis=-1)


def detect(frames: np.ndarray, palette: dict[str, tuple] | None = None) -> dict:
    """frames uint8 [T, S, S, 3] -> {"color", "shape", "direction", "fill", "motion": [dx, dy] px, "found"}."""
    from scipy import ndimage

    if palette is None:
        from clipforge.pipeline.video.synth import COLORS as palette
    frames = np.asarray(frames)
    T, H, W, _ = frames.shape
    fg = background_distance(frames) > FG_DISTANCE                                              # (T, H, W)
    pixels, outlines, centroids = [], {True: [], False: []}, []
    for t in range(T):
        blob = _largest_blob(fg[t])
        if blob is None or blob.sum() < 4:
            continue
        ys, xs = np.nonzero(blob)
        inner = ndimage.binary_erosion(blob)
        pixels.append(frames[t][inner if inner.sum() >= 4 else blob])
        centroids.append((t, xs.mean(), ys.mean()))
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        third = max(1, h // 3)
        rows = blob[ys.min():ys.max() + 1].sum(axis=1)                       # blob width per row
        taper = rows[:third].mean() / max(rows[-third:].mean(), 1e-9)
        touches = ys.min() == 0 or xs.min() == 0 or ys.max() == H - 1 or xs.max() == W - 1
        outlines[bool(touches)].append((blob.sum() / (h * w), taper))
    if not pixels:
        return {"color": None, "shape": None, "direction": None, "fill": None, "motion": None, "found": False}
    rgb = np.median(np.concatenate(pixels), axis=0)
    names = list(palette)
    unit = np.asarray([palette[n] for n in names], float)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    color = names[int(np.argmax(unit @ (rgb / max(np.linalg.norm(rgb), 1e-9))))]
    fill, taper = np.median(np.asarray(outlines[False] or outlines[True]), axis=0)
    shape = "triangle" if taper < 0.7 else "square" if fill >= 0.83 else "circle"
    fill = float(fill)
    direction, motion = None, None
    if len(centroids) >= 2:
        t, cx, cy = (np.asarray(c, float) for c in zip(*centroids))
        span = t.max() - t.min()
        dx = np.polyfit(t, cx, 1)[0] * span                  # total displacement along the fitted line
        dy = np.polyfit(t, cy, 1)[0] * span
        motion = [round(float(dx), 2), round(float(dy), 2)]
        if max(abs(dx), abs(dy)) >= MIN_MOTION * max(H, W):
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"      # image rows grow downwards
        else:
            direction = "none"
    return {"color": color, "shape": shape, "direction": direction, "fill": round(fill, 3),
            "taper": round(float(taper), 3), "motion": motion, "found": True}


def score(rows: list[dict]) -> dict:
    """Fractions right per attribute and all three, over rows with "truth" and "detected"."""
    out = {"n": len(rows)}
    if not rows:
        return out
    for a in ATTRIBUTES:
        out[a] = round(sum(r["detected"][a] == r["truth"][a] for r in rows) / len(rows), 4)
    out["all"] = round(sum(all(r["detected"][a] == r["truth"][a] for a in ATTRIBUTES) for r in rows) / len(rows), 4)
    return out


# ---------------------------------------------------------------------------------------- ceiling


def read_clip(path: str, size: int, frames: int) -> np.ndarray:
    """`frames` frames evenly spread over the middle 90% of a video, short side resized to `size` and
    centre-cropped: close to a sequential training clip, decoded with PyAV alone."""
    import av
    from PIL import Image

    with av.open(path) as container:
        pictures = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    n = len(pictures)
    picks = np.linspace(0.05 * (n - 1), 0.95 * (n - 1), frames).round().astype(int)
    out = []
    for i in picks:
        img = Image.fromarray(pictures[i])
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size))))
    return np.stack(out)


# ------------------------------------------------------------------------------------------- job
